"""Atomic file writes: a temp file in the same folder, fsync, ``os.replace``. A crash or a Colab
disconnect never leaves a half-written file under the real name."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union


def atomic_write(path: Union[str, Path], write: Callable[[str], None],
                 before_replace: Optional[Callable[[], None]] = None) -> None:
    """Call ``write(tmp_path)``, then move the finished file onto ``path`` in one step. ``before_replace`` runs
    once the new file is complete (e.g. keeping the old one under another name): a failed write leaves
    ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


# Preparing text in memory (lines, the tokenizer's counts, token tensors) peaks at about 13 times the file's
# size for windows and 6 for streams (tests/test_bounded_input.py measures it); 16 leaves a margin.
PREPARE_MEMORY_MULTIPLE = 16
_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def available_memory() -> Optional[int]:
    """Bytes of memory this machine can still give (MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def text_size_limit() -> Optional[int]:
    """The largest text file read whole into memory: ``NEWLLM_MAX_TEXT_BYTES`` if set, else what the available
    memory allows at ``PREPARE_MEMORY_MULTIPLE`` (None: no limit known)."""
    given = os.environ.get("NEWLLM_MAX_TEXT_BYTES", "").strip()
    if given:
        try:
            return int(float(given))
        except ValueError:
            raise ValueError(f"NEWLLM_MAX_TEXT_BYTES={given!r}: give a number of bytes, e.g. 2e9") from None
    free = available_memory()
    return None if free is None else free // PREPARE_MEMORY_MULTIPLE


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def check_regular_file(path: Union[str, Path], what: str = "file", max_bytes: Optional[int] = None,
                       error: type = ValueError) -> int:
    """Refuse, before anything is read, what is not a regular file of at most ``max_bytes`` (links are followed):
    a named pipe can block forever and a device never ends. Raises ``error`` with one line; returns the size."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except OSError as e:
        raise error(f"{what} {shown_path(p)} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"expected a file, got a directory: {p}")
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise error(f"{what} {p} is {kind}: only regular files are read (a pipe can block forever and a device "
                    f"never ends); save the data to a file first")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {p} is {_size(st.st_size)}: preparing it in memory takes about "
                    f"{PREPARE_MEMORY_MULTIPLE} times that, more than the {_size(max_bytes)} this machine allows "
                    f"(set NEWLLM_MAX_TEXT_BYTES to raise the limit, or stream it through a token cache)")
    return st.st_size


def shown_path(path: Union[str, Path], limit: int = 120) -> str:
    """A path for a one-line message: a name too long for the OS is cut, saying how long it was."""
    s = str(path)
    return s if len(s) <= limit else f"{s[:80]}... ({len(s)} characters)"

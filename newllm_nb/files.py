"""Atomic file writes: a temp file in the same folder, fsync, ``os.replace``. A crash or a Colab
disconnect never leaves a half-written file under the real name."""

from __future__ import annotations

import os
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

"""A run folder belongs to one configuration: its fingerprint, its lock, and the check that it can be written.

The fingerprint covers everything that changes a run's result: the model, data and training settings
(not the path the data came from, nor progress bars, checkpoint timing or the device), the content of
the training and validation data, and the tokenizer. Folder names carry its short id; checkpoints
carry it whole, so a resume can say exactly what differs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

from ..config import RENAMED_CLIP, RENAMED_TRAIN_FIELDS, RunConfig
from ..data.batching import Dataset
from ..data.tokenizer import tokenizer_hash

# Settings that do not change what a run computes.
# Where the data came from is not a setting: its content (and the tokenizer's) is hashed instead.
NOT_IN_FINGERPRINT = {"data": {"path", "hub_name", "source", "hub_revision", "hub_config", "hub_split", "text_field",
                               "tokenizer_sample_mb", "cache_dir"},
                      "train": {"show_progress", "checkpoint_every_minutes", "keep_every", "device", "fast_path",
                                "max_nonfinite"}}


class RunFolderError(ValueError):
    """A run folder that cannot be used: another configuration's run, in use by a process, or not writable."""


def _short(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# Renamed settings keep the key and value the fingerprint was first computed with, so a run folder keeps its
# name and a run started under the former names still resumes.
FINGERPRINT_KEYS = {f"train.{new}": f"train.{old}" for old, new in RENAMED_TRAIN_FIELDS.items()}
FINGERPRINT_VALUES = {"train.clip": {new: old for old, new in RENAMED_CLIP.items()}}


def settings_fingerprint(cfg: RunConfig) -> dict:
    """The result-changing settings, flattened to ``section.field`` keys."""
    out = {}
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            if name not in NOT_IN_FINGERPRINT.get(section, ()):
                key = f"{section}.{name}"
                value = FINGERPRINT_VALUES.get(key, {}).get(value, value) if isinstance(value, str) else value
                out[FINGERPRINT_KEYS.get(key, key)] = value
    return out


def run_fingerprint(cfg: RunConfig, train: Dataset, valid: Dataset, tokenizer) -> dict:
    """Settings + a SHA-256 of the training and validation tokens + one of the tokenizer."""
    fp = settings_fingerprint(cfg)
    fp["data.train_sha256"] = train.content_hash()
    fp["data.valid_sha256"] = valid.content_hash()
    fp["tokenizer.sha256"] = tokenizer_hash(tokenizer)
    return fp


def fingerprint_id(fp: dict) -> str:
    """The short id a folder name carries (10 hex digits)."""
    return _short(fp)[:10]


def differences(stored: dict, current: dict, limit: int = 6) -> str:
    """'field: stored vs current' for the fields that differ (hashes shortened)."""
    def show(v):
        return v[:10] if isinstance(v, str) and len(v) == 64 else repr(v)
    keys = sorted(k for k in set(stored) | set(current) if stored.get(k, "(absent)") != current.get(k, "(absent)"))
    parts = [f"{k}: {show(stored.get(k, '(absent)'))} there vs {show(current.get(k, '(absent)'))} now" for k in keys]
    more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def check_writable(run_dir: Union[str, Path]) -> Path:
    """Create ``run_dir`` if needed and prove a file can be written there, before any training starts."""
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"run folder {p} is a file, not a folder: choose another --run-dir")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"run folder {p} is not writable ({e.strerror or e}): choose another --run-dir") from e
    return p


class RunLock:
    """An OS file lock on ``run_dir/.lock`` for as long as a process trains there.

    The OS releases it when the process exits or is killed, so a stale lock never blocks. A second
    process asking for it gets ``RunFolderError`` naming the process that holds it.
    """

    def __init__(self, run_dir: Union[str, Path]) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; Colab and Linux have them
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a folder or a read-only file in the lock's place
            raise RunFolderError(f"run folder {self.path.parent} cannot be locked: {self.path} is "
                                 f"{'a folder' if self.path.is_dir() else 'not writable'} ({e.strerror}): remove it, "
                                 f"or choose another run folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"run folder {self.path.parent} is in use by {holder}: wait for it to finish "
                                     f"or choose another run folder") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

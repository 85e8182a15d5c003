"""Content hashes: the SHA-256 a run's data fingerprint and a checkpoint's checksum are built from."""

from __future__ import annotations

import hashlib

import torch


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (the data a run trained on, for its fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

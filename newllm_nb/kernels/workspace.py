"""Buffers the CPU training step keeps from one call to the next.

PyTorch's CPU allocator has no cache: a tensor of megabytes comes from glibc, which returns large freed blocks to
the system (unmapping them, or trimming the heap's top), so the next step's tensor of that size is paged in
again, one page fault per 4 KiB. A New-LLM step holds a few hundred MB of such buffers (every step's layer
outputs, gates and their gradients), and on the 2-core machine measured their faults cost as much as a third of
the step (benchmarks/RESULTS.md, "The main job on a CPU"). A buffer kept here is handed out again once nothing
else refers to its memory (no tensor, view or tensor saved for a backward pass), else a new one is made.
"""

from __future__ import annotations

import math
import threading

import torch

_local = threading.local()  # one workspace per thread: two threads never share a buffer


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _free_count() -> int:
    """The count of a buffer held by the workspace alone (measured once, so it holds for any torch version)."""
    if not hasattr(_local, "free"):
        probe = torch.empty(1)
        _local.free = _use_count(probe)
    return _local.free


def empty(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape``: on CPU the buffer kept under ``name`` when it fits and nothing else
    refers to it, else a new one (kept from then on); off CPU ``torch.empty`` (CUDA has its caching allocator, and a
    captured CUDA graph must own its buffers)."""
    if device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _buffers()
    numel = math.prod(shape)
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel or _use_count(buf) != _free_count():
        buf = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)  # a view: whoever holds it (autograd included) is seen in the storage's count


def release() -> None:
    """Drop this thread's kept buffers (their memory goes back once nothing else refers to it)."""
    _buffers().clear()


def _buffers() -> dict:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers

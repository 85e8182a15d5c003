"""Whether the fused Triton kernels run here: the one check the training step and the decoders share."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch


def fused_kernels(device: torch.device, precision: Optional[str] = None) -> tuple[Optional[ModuleType], str]:
    """``kernels.fused`` where its kernels run on ``device`` (at ``precision``, where given), else None; the
    string says in one line what runs or why not."""
    try:
        from . import fused  # optional: needs triton
    except ImportError as e:
        return None, f"Triton is not importable ({e})"
    ok, why = fused.fused_available(device)
    if ok and precision == "bf16" and not fused.bf16_supported(device):
        ok, why = False, "this GPU's Triton kernels have no bf16 (use fp16)"
    return (fused if ok else None), why

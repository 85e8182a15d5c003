"""What machine is this, and what batch / LR / precision suit it (the original's GPU table)."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..config import original_lr

# The original's table: GPU -> batch size (lr follows from lr = 1e-4 * sqrt(batch / 32)).
ORIGINAL_GPU_TABLE = {"T4": 512, "L4": 2048, "A100": 4096, "H100": 4096}


@dataclass
class HardwareInfo:
    kind: str  # CPU | T4 | L4 | A100 | H100 | H200 | other
    name: str
    device: str
    memory_gb: float
    compute_capability: Optional[str]
    bf16: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Recommendation:
    batch_size: int
    lr: float
    precision: str


def classify(name: str) -> str:
    n = name.upper()
    for kind in ("H200", "H100", "A100", "L4", "T4"):
        if kind in n.replace("-", " ").split() or kind in n:
            return kind
    return "other"


def detect(device: Optional[str] = None) -> HardwareInfo:
    """Describe the CUDA device (or the CPU when there is none)."""
    if device != "cpu" and torch.cuda.is_available():
        idx = (torch.device(device).index if device and device.startswith("cuda") else None) or 0
        p = torch.cuda.get_device_properties(idx)
        return HardwareInfo(classify(p.name), p.name, f"cuda:{idx}", round(p.total_memory / 2**30, 1),
                            f"{p.major}.{p.minor}", bool(torch.cuda.is_bf16_supported()))
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    return HardwareInfo("CPU", platform.processor() or platform.machine() or "CPU", "cpu", round(mem, 1),
                        None, False)


def recommend(info: Optional[HardwareInfo] = None) -> Recommendation:
    """Batch by the original's table (H100/H200 4096; unknown GPUs by memory; CPU 64), lr by its rule."""
    info = info or detect()
    if info.kind == "CPU":
        batch = 64  # small batches: more updates per epoch where every step is slow
    elif info.kind in ORIGINAL_GPU_TABLE:
        batch = ORIGINAL_GPU_TABLE[info.kind]
    elif info.kind == "H200":
        batch = 4096
    else:
        batch = 512 if info.memory_gb < 20 else 2048 if info.memory_gb < 40 else 4096
    return Recommendation(batch, original_lr(batch), pick_precision(info))


def pick_precision(info: HardwareInfo) -> str:
    """bf16 where supported, fp16 (+GradScaler) on other CUDA GPUs, fp32 on CPU."""
    if info.kind == "CPU":
        return "fp32"
    return "bf16" if info.bf16 else "fp16"


def original_table() -> list[dict]:
    """The original's published GPU table, for display beside this machine's recommendation."""
    return [{"gpu": g, "batch_size": b, "lr": round(original_lr(b), 6)} for g, b in ORIGINAL_GPU_TABLE.items()
            if g != "H100"]


def resolve_device(device: str = "auto") -> torch.device:
    """auto: the GPU where there is one; a named GPU that is not there is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"invalid config value device={device!r}: CUDA is not available on this machine")
    if device.startswith("cuda:"):
        index, count = device.split(":", 1)[1], torch.cuda.device_count()
        if not (index.isdigit() and int(index) < count):
            raise ValueError(f"invalid config value device={device!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"invalid config value device={device!r}: Apple's MPS is not available on this machine "
                         f"(use cpu{' or cuda' if torch.cuda.is_available() else ''})")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid config value device={device!r}: {e}") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 where the GPU supports it, fp16 (+GradScaler) on other GPUs, fp32 on CPU."""
    if precision == "auto":
        return pick_precision(detect(str(device)))
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("invalid config value precision='fp16': fp16 training needs a CUDA GPU (use fp32 or bf16)")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)

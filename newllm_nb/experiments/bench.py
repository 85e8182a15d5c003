"""Throughput probe: time whole training steps through the trainer's own step (fast path included on CUDA)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Optional

import torch

from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ..data.batching import Batch
from ..models.build import build_model
from ..models.newllm import count_parameters
from ..train.trainer import Trainer


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


@contextlib.contextmanager
def environment(values: dict[str, Optional[str]]) -> Iterator[None]:
    """The environment variables ``values`` set for the block (None or "" unsets one), each restored after: how
    benchmarks pick a kernel's tiles or schedule (``NEWLLM_FUSED_*``, ``NEWLLM_DEC_*``) for one measurement."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v:
                os.environ[k] = str(v)
            else:
                os.environ.pop(k, None)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def probe_throughput(model_cfg: ModelConfig, batch_size: int, seq_len: int, steps: int = 10,
                     precision: str = "auto", fast_path: str = "auto", device: str = "auto",
                     warmup: int = 2, model: Optional[torch.nn.Module] = None) -> dict:
    """Median time of whole training steps (forward, backward, clip, Adam) on random tokens.
    ``model`` (optional) replaces the model ``model_cfg`` describes, e.g. a benchmark's original-loop variant."""
    cfg = RunConfig(model_cfg, DataConfig(max_seq_length=seq_len + 1),
                    TrainConfig(batch_size=batch_size, precision=precision, fast_path=fast_path, device=device,
                                show_progress=False))
    torch.manual_seed(0)
    model = model if model is not None else build_model(model_cfg)
    t = Trainer(model, None, None, cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(4, model_cfg.vocab_size, (batch_size, seq_len + 1), generator=gen)
    b = Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), None, False)
    sync = torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        t.step(b, None, 1.0)
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        t.step(b, None, 1.0)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    tokens = b.x.numel()
    return {"device": device_name(t.device), "path": t.step.used, "precision": t.precision,
            "params": count_parameters(model), "step_ms": 1000 * step_s,
            "tokens_per_s": tokens / step_s, "warmup_s": warm_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated(t.device) / 2**30 if t.device.type == "cuda" else None}

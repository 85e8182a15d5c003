"""Throughput probe: time real training steps (the trainer's own step, fast path included on CUDA)."""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .baselines import build_model
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .data import Batch
from .trainer import Trainer


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


class SeedLoop(nn.Module):
    """The seed's training loop shape, for comparison: every matmul inside the per-token loop,
    [embed ; context] concatenated per step, W_f / W_i / W_u as three matmuls, the head per token."""

    def __init__(self, model) -> None:
        super().__init__()
        self.m = model
        self.config = model.config

    def forward(self, ids, context=None, reset=None):
        m, C = self.m, self.config.context_dim
        c = m.init_context(ids.shape[0]) if context is None else context
        W, b = m.gates.weight, m.gates.bias
        outs = []
        for t in range(ids.shape[1]):
            h = torch.cat([m.embed(ids[:, t]), c], dim=-1)
            for layer in m.fnn:
                h = m.drop(F.relu(layer(h)))
            outs.append(m.head(h))
            f = torch.sigmoid(F.linear(h, W[:C], b[:C]))
            i = torch.sigmoid(F.linear(h, W[C:2 * C], b[C:2 * C]))
            u = F.linear(h, W[2 * C:], b[2 * C:])
            c = m.norm(f * c + i * u).clamp(-10, 10)
        return torch.stack(outs, 1), c


def probe_throughput(model_cfg: ModelConfig, batch_size: int, seq_len: int, steps: int = 10,
                     precision: str = "auto", fast_path: str = "auto", device: str = "auto",
                     warmup: int = 2, seed_loop: bool = False) -> dict:
    """Median step time of whole training steps (forward, backward, clip, Adam) on random tokens."""
    cfg = RunConfig(model_cfg, DataConfig(max_seq_length=seq_len + 1),
                    TrainConfig(batch_size=batch_size, precision=precision, fast_path=fast_path, device=device,
                                show_progress=False))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    if seed_loop:
        model = SeedLoop(model)
    t = Trainer(model, None, None, cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(4, model_cfg.vocab_size, (batch_size, seq_len + 1), generator=gen)
    b = Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), None, False)
    sync = torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        t._train_step(b, 1.0)
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        t._train_step(b, 1.0)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    tokens = b.x.numel()
    return {"device": device_name(t.device), "path": t.fast_path_used, "precision": t.precision,
            "params": sum(p.numel() for p in model.parameters()), "step_ms": 1000 * step_s,
            "tokens_per_s": tokens / step_s, "warmup_s": warm_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated(t.device) / 2**30 if t.device.type == "cuda" else None}

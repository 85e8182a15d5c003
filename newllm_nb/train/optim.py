"""The optimizer, its learning-rate schedule, and the weight average used for validation."""

from __future__ import annotations

import contextlib
import math

import torch

from ..config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Constant (original), or linear warm-up then cosine decay to ``min_lr_ratio`` of the peak."""
    base = cfg.effective_lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam (original) or AdamW over the parameters that train; one fused kernel for the update on CUDA."""
    kw = {"lr": cfg.effective_lr}
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        kw["fused"] = True
    if cfg.optimizer == "adamw":
        # No decay on biases, LayerNorm and other 1-D params.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, **kw)
    return torch.optim.Adam(params, weight_decay=cfg.weight_decay, **kw)


class WeightAverage:
    """Exponential moving average of the weights (Polyak averaging), for validation and ``best``.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates, so the average does not
    remember the random initialisation. ``applied()`` swaps the averaged weights in (in place, so a
    captured CUDA graph keeps its addresses) and restores the trained ones afterwards.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Keep the averaged weights in the model for good (no checkpoint to reload them from)."""
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @contextlib.contextmanager
    def applied(self):
        backup = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

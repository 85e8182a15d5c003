"""Everything about a run's progress that a resume needs, as one dataclass saved and restored whole.

The model, optimizer and GradScaler are saved beside it in the same checkpoint file (checkpoint.py);
the RNG streams are saved with every checkpoint and restored with the state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import Checkpoint, CheckpointError
from .metrics import Metrics
from .optim import WeightAverage


@dataclass
class TrainState:
    epoch: int = 0  # the next epoch to run (0-based)
    step_in_epoch: int = 0  # batches of that epoch already done (mid-epoch checkpoints)
    global_step: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0  # epochs since validation last improved (early stopping)
    finished: bool = False
    nonfinite_epoch: int = 0  # non-finite steps skipped in this epoch
    epochs_above_uniform: int = 0  # epochs in a row whose validation loss was far above log V (divergence)
    epoch_seconds: float = 0.0  # training time of this epoch so far
    history: list = field(default_factory=list)  # one record per finished epoch
    metrics: Metrics = field(default_factory=Metrics)  # this epoch's training loss / accuracy so far
    context: object = None  # the carried context of stateful streams (tensor, tuple or None)
    ema: Optional[WeightAverage] = None  # the weight average, when the recipe keeps one

    # JSON-safe fields, written as the checkpoint's trainer_state; the rest travel as tensors or apart.
    _OBJECT_FIELDS = ("history", "metrics", "context", "ema")
    # What a resume cannot do without (the rest has a safe default: zero non-finite steps, no seconds yet).
    REQUIRED = ("epoch", "step_in_epoch", "global_step", "best_val", "bad_epochs", "finished", "metrics")

    def start_epoch_over(self) -> None:
        """Reset what counts within one epoch (after the epoch's record is written)."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.metrics = Metrics(self.metrics.original_metrics)
        self.epoch_seconds = 0.0
        self.nonfinite_epoch = 0
        self.context = None

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(trainer_state JSON, extra tensors) for ``checkpoint.save_checkpoint``."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._OBJECT_FIELDS}
        meta["best_val"] = self.best_val if math.isfinite(self.best_val) else None
        meta["metrics"] = self.metrics.state()
        meta["ema_updates"] = self.ema.updates if self.ema is not None else 0
        tensors = {}
        if self.context is not None:
            for i, t in enumerate((self.context,) if torch.is_tensor(self.context) else self.context):
                tensors[f"state.{i}"] = t
        if self.ema is not None:
            tensors.update({f"ema.{i}": t for i, t in enumerate(self.ema.shadow)})
        return meta, tensors

    def restore(self, ckpt: Checkpoint, device: torch.device) -> None:
        """Take every field from a full checkpoint (and restore its RNG streams); a trainer state that lacks
        a field, or holds one of the wrong kind, is refused naming it (nothing is guessed)."""
        ts = dict(ckpt.trainer_state)
        missing = [name for name in self.REQUIRED if name not in ts]
        if missing:
            raise CheckpointError(f"{ckpt.path} cannot be resumed: its trainer state lacks {', '.join(missing)} "
                                  f"(written by another program or edited): choose another run folder, or "
                                  f"delete it to start over")
        try:
            self._restore(ckpt, ts, device)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{ckpt.path} cannot be resumed: its trainer state is malformed ({e!r})") from e

    def _restore(self, ckpt: Checkpoint, ts: dict, device: torch.device) -> None:
        for f in dataclasses.fields(self):
            if f.name not in self._OBJECT_FIELDS and f.name in ts:
                value, kind = ts[f.name], type(f.default)
                fits = (value is None and f.name == "best_val") or (
                    isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
                    else type(value) is kind)
                if not fits:
                    raise ValueError(f"{f.name}={value!r} is not a {kind.__name__}")
                setattr(self, f.name, value)
        self.best_val = math.inf if ts.get("best_val") is None else ts["best_val"]
        self.history = list(ckpt.history)
        lacking = sorted(set(self.metrics.state()) - set(ts["metrics"]))
        if lacking:
            raise ValueError(f"metrics lacks {', '.join(lacking)}")
        self.metrics.load(ts["metrics"])
        states = [ckpt.extra(f"state.{i}") for i in range(2)]
        states = [s.to(device) for s in states if s is not None]
        self.context = None if not states else states[0] if len(states) == 1 else tuple(states)
        if self.ema is not None:
            shadow = [ckpt.extra(f"ema.{i}") for i in range(len(self.ema.shadow))]
            if any(t is None for t in shadow):
                raise CheckpointError(f"{ckpt.path} has no weight average (ema_decay was 0 when it was written); "
                                      f"resume with ema_decay=0 or start a new run")
            self.ema.shadow = [t.to(device, p.dtype) for t, p in zip(shadow, self.ema.params)]
            self.ema.updates = ts.get("ema_updates", 0)
        ckpt.restore_rng()

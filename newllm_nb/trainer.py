"""One trainer for CPU and GPU: AMP, the seed's clip schedule, early stopping, checkpoints, resume.

Metrics: unless ``seed_compatible``, loss / PPL / accuracy are *token-weighted over all non-PAD
targets* (UNK targets included, BOS never a target): loss = sum of per-token cross-entropy / number
of such tokens, PPL = exp(loss), accuracy = share of those tokens predicted exactly.
``seed_compatible=True`` reproduces the seed's figures: the mean over batches of each batch's
mean loss / accuracy (PPL = exp of that), which weights short batches more.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .baselines import detach_state
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PAD_ID, RunConfig, TrainConfig
from .data import Batch, Dataset


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stopped, the last good checkpoint is kept."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"invalid config value device={device!r}: CUDA is not available on this machine")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 where the GPU supports it, fp16 (+GradScaler) on other GPUs, fp32 on CPU."""
    if precision == "auto":
        from .hardware import detect, pick_precision

        return pick_precision(detect(str(device)))
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("invalid config value precision='fp16': fp16 training needs a CUDA GPU (use fp32 or bf16)")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, number of non-PAD targets, number correct), all as tensors (no sync)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    y = targets.reshape(-1)
    loss_sum = F.cross_entropy(flat, y, ignore_index=PAD_ID, reduction="sum")
    mask = y != PAD_ID
    correct = ((flat.argmax(-1) == y) & mask).sum()
    return loss_sum, mask.sum(), correct


class Metrics:
    """Token-weighted (default) or per-batch-averaged (seed) loss / accuracy, accumulated as Python floats
    (one host sync per batch, which the non-finite check needs anyway)."""

    def __init__(self, seed_compatible: bool = False) -> None:
        self.seed_compatible = seed_compatible
        self.loss = self.n = self.correct = 0.0
        self.batch_loss = self.batch_acc = 0.0
        self.batches = 0

    def add(self, loss_sum: torch.Tensor, n: torch.Tensor, correct: torch.Tensor) -> None:
        ls, nn_, c = float(loss_sum), float(n), float(correct)
        if nn_ == 0:
            return
        self.loss += ls
        self.n += nn_
        self.correct += c
        self.batch_loss += ls / nn_
        self.batch_acc += c / nn_
        self.batches += 1

    def state(self) -> dict:
        return dict(vars(self))

    def load(self, d: dict) -> None:
        vars(self).update(d)

    def result(self) -> dict:
        if self.batches == 0:
            return {"loss": float("nan"), "ppl": float("nan"), "acc": float("nan"), "tokens": 0}
        if self.seed_compatible:
            loss, acc = self.batch_loss / self.batches, self.batch_acc / self.batches
        else:
            loss, acc = self.loss / self.n, self.correct / self.n
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": acc, "tokens": int(self.n)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, batch_size: int = 256, device: Union[str, torch.device] = "cpu",
             precision: str = "fp32", seed_compatible: bool = False) -> dict:
    """Loss, PPL, accuracy over ``data`` (see the module docstring for what is counted)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    m = Metrics(seed_compatible)
    state = None
    for b in data.batches(batch_size):
        x, y = b.x.to(device), b.y.to(device)
        r = None if b.reset is None else b.reset.to(device)
        with autocast(device, precision):
            logits, new_state = model(x, state if b.carry else None, r)
        m.add(*token_loss(logits, y))
        state = new_state
    model.train(was_training)
    return m.result()


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Constant (seed), or linear warm-up then cosine decay to ``min_lr_ratio`` of the peak."""
    base = cfg.effective_lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kw = {"lr": cfg.effective_lr}
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        kw["fused"] = True  # one kernel for the whole update
    if cfg.optimizer == "adamw":
        # No decay on biases, LayerNorm and embeddings' 1-D params.
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


class Trainer:
    """Train ``model`` on ``train`` and validate on ``valid`` according to ``config.train``.

    ``run_dir`` (optional) receives ``best.safetensors`` and ``last.safetensors`` (plus
    ``epoch_K.safetensors`` every ``keep_every`` epochs); a ``last`` there is resumed automatically.
    ``callbacks`` are called with each epoch's history record (live plots).
    """

    def __init__(self, model: torch.nn.Module, train: Dataset, valid: Dataset, config: RunConfig,
                 tokenizer=None, run_dir: Optional[Union[str, Path]] = None,
                 callbacks: Sequence[Callable[[dict], None]] = ()) -> None:
        self.cfg = config
        self.tc = config.train
        self.device = resolve_device(self.tc.device)
        self.precision = resolve_precision(self.tc.precision, self.device)
        self.model = model.to(self.device)
        self._freeze = None
        if self.tc.freeze_base:
            from .expansion import BaseFreeze

            self._freeze = BaseFreeze(self.model)  # before the optimizer: fully frozen params are left out
        self.train_data, self.valid_data = train, valid
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir) if run_dir else None
        self.callbacks = list(callbacks)
        self.optimizer = make_optimizer(self.model, self.tc, self.device)
        self.ema = WeightAverage(self.model, self.tc.ema_decay) if self.tc.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.history: list[dict] = []
        self.epoch = 0  # next epoch to run (0-based)
        self.step_in_epoch = 0  # batches of that epoch already done (mid-epoch checkpoints)
        self.global_step = 0
        self.best_val = float("inf")
        self.bad_epochs = 0
        self.finished = False
        self.nonfinite_epoch = 0
        self._state = None  # carried context (stateful data)
        self._metrics = Metrics(self.tc.seed_compatible)
        self._epoch_seconds = 0.0
        self._fast = None
        self.fast_path_used = "eager"
        self.loss_hook: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # tests inject NaN here

    # -- checkpoints --------------------------------------------------------------------------------
    @property
    def last_path(self) -> Optional[Path]:
        return self.run_dir / "last.safetensors" if self.run_dir else None

    @property
    def best_path(self) -> Optional[Path]:
        return self.run_dir / "best.safetensors" if self.run_dir else None

    def _trainer_state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best_val": self.best_val if math.isfinite(self.best_val) else None, "bad_epochs": self.bad_epochs,
                "finished": self.finished, "metrics": self._metrics.state(),
                "epoch_seconds": self._epoch_seconds, "nonfinite_epoch": self.nonfinite_epoch,
                "ema_updates": self.ema.updates if self.ema else 0}

    def save(self, path: Union[str, Path], full: bool = True) -> Path:
        extra = {}
        st = self._state
        if full and st is not None:
            for i, t in enumerate((st,) if torch.is_tensor(st) else st):
                extra[f"state.{i}"] = t
        if full and self.ema is not None:
            extra.update({f"ema.{i}": t for i, t in enumerate(self.ema.shadow)})
        return save_checkpoint(path, self.model, config=self.cfg.to_dict(), tokenizer=self.tokenizer,
                               history=self.history, optimizer=self.optimizer if full else None,
                               scaler=self.scaler if full else None, trainer_state=self._trainer_state(),
                               extra_tensors=extra)

    def resume(self, path: Union[str, Path]) -> None:
        """Continue a run from a full checkpoint: weights, optimizer, scaler, RNG, history, position."""
        ckpt = load_checkpoint(path)
        if ckpt.config.get("model") != self.cfg.to_dict()["model"]:
            raise CheckpointError(f"{ckpt.path} was written for another model config "
                                  f"({ckpt.config.get('model')}); use a new run name or the same settings")
        ckpt.load_into(self.model)
        if self._freeze is not None:
            self._freeze.snapshot()  # the frozen base is the checkpoint's, not the fresh model's
        opt = ckpt.optimizer_state()
        if opt is None:
            raise CheckpointError(f"{ckpt.path} has no optimizer state: it is a 'best' checkpoint, not resumable")
        self.optimizer.load_state_dict(opt)
        if "scaler" in ckpt.meta and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt.meta["scaler"])
        ts = ckpt.trainer_state
        self.history = list(ckpt.history)
        self.epoch, self.step_in_epoch = ts["epoch"], ts["step_in_epoch"]
        self.global_step, self.bad_epochs = ts["global_step"], ts["bad_epochs"]
        self.best_val = ts["best_val"] if ts["best_val"] is not None else float("inf")
        self.finished = ts.get("finished", False)
        self._metrics.load(ts["metrics"])
        self._epoch_seconds = ts.get("epoch_seconds", 0.0)
        self.nonfinite_epoch = ts.get("nonfinite_epoch", 0)
        states = [ckpt.extra(f"state.{i}") for i in range(2)]
        states = [s.to(self.device) for s in states if s is not None]
        self._state = None if not states else states[0] if len(states) == 1 else tuple(states)
        if self.ema is not None:
            shadow = [ckpt.extra(f"ema.{i}") for i in range(len(self.ema.shadow))]
            if any(t is None for t in shadow):
                raise CheckpointError(f"{ckpt.path} has no weight average (ema_decay was 0 when it was written); "
                                      f"resume with ema_decay=0 or start a new run")
            self.ema.shadow = [t.to(self.device, p.dtype) for t, p in zip(shadow, self.ema.params)]
            self.ema.updates = ts.get("ema_updates", 0)
        ckpt.restore_rng()

    # -- one optimisation step ----------------------------------------------------------------------
    def _forward_backward(self, b: Batch):
        """Eager forward + backward. Returns (loss_sum, n, correct, final_state)."""
        x, y = b.x.to(self.device, non_blocking=True), b.y.to(self.device, non_blocking=True)
        r = None if b.reset is None else b.reset.to(self.device, non_blocking=True)
        state = self._state if b.carry else None
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            logits, new_state = self.model(x, state, r)
        loss_sum, n, correct = token_loss(logits, y)
        if self.loss_hook is not None:
            loss_sum = self.loss_hook(loss_sum)
        loss = loss_sum / n.clamp(min=1)
        self.scaler.scale(loss).backward()
        return loss_sum.detach(), n, correct, detach_state(new_state)

    def _maybe_fast_path(self):
        if self._fast is not None or self.device.type != "cuda" or self.tc.fast_path == "off":
            return self._fast
        from .fastpath import GraphedStep

        self._fast = GraphedStep(self, compile_cell=self.tc.fast_path == "compile",
                                 fused_bptt=self.tc.fast_path in ("auto", "graph"))
        return self._fast

    def _train_step(self, b: Batch, clip: float) -> tuple:
        fast = self._maybe_fast_path()
        out = fast.run(b) if fast is not None and self.loss_hook is None else None
        if out is None:
            out = self._forward_backward(b)
        else:
            self.fast_path_used = fast.mode
        loss_sum, n, correct, new_state = out
        finite = bool(torch.isfinite(loss_sum))
        if finite:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], clip)
            self.scaler.step(self.optimizer)  # fp16: skipped by the scaler if the grads overflowed
            self.scaler.update()
            if self._freeze is not None:
                self._freeze.restore()
            if self.ema is not None:
                self.ema.update()
        self._state = new_state
        return finite, loss_sum, n, correct

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> list[dict]:
        """Train until ``epochs`` or early stopping; returns the history (one dict per epoch)."""
        from tqdm.auto import tqdm

        if self.run_dir is not None and self.run_dir.exists():
            for stale in self.run_dir.glob(".*.tmp"):  # left by a kill mid-write; never a checkpoint
                stale.unlink()
        if resume and self.last_path is not None and self.last_path.exists():
            self.resume(self.last_path)
            print(f"resumed {self.last_path} at epoch {self.epoch + 1}, step {self.step_in_epoch}")
        else:
            torch.manual_seed(self.tc.seed)
        if self.finished:
            return self.history
        tc = self.tc
        B = tc.batch_size
        steps_per_epoch = self.train_data.num_batches(B)
        total_steps = steps_per_epoch * tc.epochs
        last_save = time.monotonic()
        consecutive_bad = 0
        bar = tqdm(total=tc.epochs, initial=self.epoch, desc="epochs", disable=not tc.show_progress)
        try:
            while self.epoch < tc.epochs:
                clip = tc.clip_for_epoch(self.epoch)
                self.model.train()
                t0 = time.perf_counter()
                inner = tqdm(total=steps_per_epoch, initial=self.step_in_epoch, leave=False,
                             desc=f"epoch {self.epoch + 1}", disable=not tc.show_progress)
                for i, b in enumerate(self.train_data.batches(B, shuffle=True, seed=tc.seed + self.epoch)):
                    if i < self.step_in_epoch:
                        continue
                    lr = lr_at(tc, self.global_step, total_steps)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    finite, loss_sum, n, correct = self._train_step(b, clip)
                    if finite:
                        consecutive_bad = 0
                        self._metrics.add(loss_sum, n, correct)
                    else:
                        consecutive_bad += 1
                        self.nonfinite_epoch += 1
                        if consecutive_bad >= tc.max_nonfinite:
                            raise NonFiniteLossError(
                                f"{consecutive_bad} consecutive non-finite losses at epoch {self.epoch + 1}, "
                                f"step {i + 1} (lr={lr:.3g}, precision={self.precision}): the learning rate is "
                                f"probably too high (try lr/10 or a smaller clip) or fp16 overflowed (use bf16/fp32). "
                                f"Last good checkpoint: {self.last_path or 'none (no run_dir)'}")
                    self.global_step += 1
                    self.step_in_epoch = i + 1
                    inner.update(1)
                    if self.run_dir and time.monotonic() - last_save > 60 * tc.checkpoint_every_minutes:
                        self._epoch_seconds += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self.save(self.last_path)
                        last_save = time.monotonic()
                inner.close()
                self._epoch_seconds += time.perf_counter() - t0
                self._end_epoch(lr_at(tc, max(0, self.global_step - 1), total_steps), clip)
                last_save = time.monotonic()
                bar.update(1)
                rec = self.history[-1]
                bar.set_postfix(train=f"{rec['train_loss']:.3f}", val_ppl=f"{rec['val_ppl']:.2f}")
                if self.finished:
                    break
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError(
                f"CUDA out of memory at batch_size={B}: try batch_size={max(1, B // 2)} (and lr by the seed rule). "
                f"Last checkpoint kept: {self.last_path or 'none (no run_dir)'}") from e
        finally:
            bar.close()
        if not self.finished:  # ran out of epochs
            self.finished = True
            if self.run_dir:
                self.save(self.last_path)
        return self.history

    def _averaged(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _end_epoch(self, lr: float, clip: float) -> None:
        tc = self.tc
        train = self._metrics.result()
        with self._averaged():  # validation and `best` use the averaged weights when ema_decay > 0
            val = evaluate(self.model, self.valid_data, min(tc.batch_size, 1024), self.device, self.precision,
                           tc.seed_compatible)
        seconds = self._epoch_seconds
        rec = {"epoch": self.epoch + 1, "train_loss": train["loss"], "train_ppl": train["ppl"],
               "val_loss": val["loss"], "val_ppl": val["ppl"], "val_acc": val["acc"],
               "tokens_per_s": train["tokens"] / seconds if seconds > 0 else float("nan"),
               "seconds": seconds, "lr": lr, "clip": clip, "nonfinite_steps": self.nonfinite_epoch}
        improved = val["loss"] < self.best_val - tc.min_delta
        if improved:
            self.best_val, self.bad_epochs = val["loss"], 0
        else:
            self.bad_epochs += 1
        rec["best"] = improved
        self.history.append(rec)
        self.epoch += 1
        self.step_in_epoch = 0
        self._metrics = Metrics(tc.seed_compatible)
        self._epoch_seconds = 0.0
        self.nonfinite_epoch = 0
        self._state = None
        if self.bad_epochs >= tc.patience or self.epoch >= tc.epochs:
            self.finished = True
        if self.run_dir:
            if improved:
                with self._averaged():
                    self.save(self.best_path, full=False)
            if tc.keep_every and self.epoch % tc.keep_every == 0:
                self.save(self.run_dir / f"epoch_{self.epoch}.safetensors", full=False)
            self.save(self.last_path)
        for cb in self.callbacks:
            cb(rec)

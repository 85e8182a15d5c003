"""What training and evaluation count.

Unless ``original_metrics``, loss / PPL / accuracy are *token-weighted over all non-PAD targets* (UNK
targets included, BOS never a target): loss = sum of per-token cross-entropy / number of such tokens,
PPL = exp(loss), accuracy = share of those tokens predicted exactly. ``original_metrics=True``
reproduces the original's figures: the mean over batches of each batch's mean loss / accuracy (PPL = exp
of that), which weights short batches more.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

from ..config import PAD_ID
from ..data.batching import Dataset
from ..runtime.distributed import all_reduce_sums, rank, world_size
from ..runtime.hardware import autocast


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, number of non-PAD targets, number correct), all as tensors (no sync)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    y = targets.reshape(-1)
    loss_sum = F.cross_entropy(flat, y, ignore_index=PAD_ID, reduction="sum")
    mask = y != PAD_ID
    correct = ((flat.argmax(-1) == y) & mask).sum()
    return loss_sum, mask.sum(), correct


class Metrics:
    """Token-weighted (default) or per-batch-averaged (original) loss / accuracy, accumulated as Python floats
    (one host sync per batch, which the non-finite check needs anyway)."""

    def __init__(self, original_metrics: bool = False) -> None:
        self.original_metrics = original_metrics
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
        if self.original_metrics:
            loss, acc = self.batch_loss / self.batches, self.batch_acc / self.batches
        else:
            loss, acc = self.loss / self.n, self.correct / self.n
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": acc, "tokens": int(self.n)}


def eval_batch_size(batch_size: int) -> int:
    """The batch evaluation runs at: the training batch, at most 1024 rows (no gradients, so memory allows it)."""
    return min(batch_size, 1024)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, batch_size: int = 256, device: Union[str, torch.device] = "cpu",
             precision: str = "fp32", original_metrics: bool = False) -> dict:
    """Loss, PPL, accuracy over ``data`` (see the module docstring for what is counted).

    Under torchrun every rank evaluates its share of each batch (as in training) and the batch's sums are
    all-reduced before they count, so every rank gets the figures one process gets for the whole set:
    the same per-batch sums, in the same order, in both the token-weighted and the original's per-batch mode.
    Sharding rather than every rank evaluating everything keeps validation as fast as training scales.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    m = Metrics(original_metrics)
    state = None
    world = world_size()
    for b in data.batches(batch_size, rank=rank(), world=world):
        x, y = b.x.to(device), b.y.to(device)
        r = None if b.reset is None else b.reset.to(device)
        with autocast(device, precision):
            logits, new_state = model(x, state if b.carry else None, r)
        sums = token_loss(logits, y)
        m.add(*(all_reduce_sums(*sums) if world > 1 else sums))
        state = new_state
    model.train(was_training)
    return m.result()

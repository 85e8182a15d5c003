"""Context expansion (the seed's growth experiment): grow a trained model's context vector, e.g. 256 -> 512,
and keep training either everything ("fine-tune all") or only the new dimensions ("freeze base").

New weights start at zero, as the seed did: the new context entries feed nothing (their columns in
layer 1 are zero) and their candidate input is zero. The old dimensions still change slightly:
LayerNorm now normalises over the larger vector, and with its new gains at 1 the new entries come
out of it non-zero (which is also what lets them start learning). ``growth_gap`` measures the
effect instead of assuming it away.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
import torch

from .batching import Dataset
from .config import RunConfig, apply_overrides
from .metrics import evaluate
from .model import ContextVectorLLM
from .trainer import Trainer


@torch.no_grad()
def expand_context(model: ContextVectorLLM, new_dim: int) -> ContextVectorLLM:
    """A copy of ``model`` with context_dim ``new_dim``; every old weight kept, every new one zero
    (LayerNorm's new gains 1, as LayerNorm starts). ``config.grown_from`` records the old size."""
    cfg = model.config
    C, E = cfg.context_dim, cfg.embed_dim
    if not isinstance(new_dim, int) or new_dim <= C:
        raise ValueError(f"invalid new_dim={new_dim!r}: must be an integer larger than context_dim={C}")
    new_cfg = dataclasses.replace(cfg, context_dim=new_dim, grown_from=cfg.grown_from or C)
    big = ContextVectorLLM(new_cfg).to(model.embed.weight.device)
    old_sd, sd = model.state_dict(), big.state_dict()
    for k, v in old_sd.items():
        if sd[k].shape == v.shape:
            sd[k].copy_(v)
    sd["fnn.0.weight"].zero_()
    sd["fnn.0.weight"][:, : E + C] = old_sd["fnn.0.weight"]  # [embed | old ctx | new ctx=0]
    for name in ("gates.weight", "gates.bias"):  # blocks [forget | input | candidate], each grown
        sd[name].zero_()
        for j in range(3):
            sd[name][j * new_dim: j * new_dim + C] = old_sd[name][j * C:(j + 1) * C]
    sd["norm.weight"].fill_(1.0)
    sd["norm.weight"][:C] = old_sd["norm.weight"]
    sd["norm.bias"].zero_()
    sd["norm.bias"][:C] = old_sd["norm.bias"]
    big.load_state_dict(sd)
    return big


def trainable_masks(model: ContextVectorLLM) -> dict:
    """For a grown model: name -> bool mask of the entries that belong to the *new* dimensions."""
    cfg = model.config
    if not cfg.grown_from:
        raise ValueError("freeze_base needs a grown model (config.grown_from is not set): call expand_context first")
    C0, C, E = cfg.grown_from, cfg.context_dim, cfg.embed_dim
    masks = {}
    for name, p in model.named_parameters():
        m = torch.zeros_like(p, dtype=torch.bool)
        if name == "fnn.0.weight":
            m[:, E + C0:] = True
        elif name in ("gates.weight", "gates.bias"):
            for j in range(3):
                m[j * C + C0:(j + 1) * C] = True
        elif name in ("norm.weight", "norm.bias"):
            m[C0:] = True
        masks[name] = m
    return masks


class BaseFreeze:
    """A training hook that keeps every base entry of a grown model bit-identical while the new dimensions train.

    Gradients of base entries are zeroed by tensor hooks (so optimizer moments stay zero there), and after
    each optimizer step the base entries are restored from a copy, which also undoes weight decay.
    Parameters with no new entry at all stop requiring gradients, so make it before the optimizer.
    """

    def __init__(self, model: ContextVectorLLM) -> None:
        self.items = []
        masks = trainable_masks(model)
        for name, p in model.named_parameters():
            mask = masks[name].to(p.device)
            if not mask.any():
                p.requires_grad_(False)
                continue
            p.register_hook(lambda g, m=mask: g * m)
            self.items.append((p, mask, p.detach().clone()))

    @torch.no_grad()
    def after_resume(self) -> None:
        """Take the current base entries as the ones to keep (the checkpoint's, not the fresh model's)."""
        self.items = [(p, mask, p.detach().clone()) for p, mask, _ in self.items]

    @torch.no_grad()
    def after_update(self) -> None:
        for p, mask, base in self.items:
            p.copy_(torch.where(mask, p, base))


def freeze_hooks(model: torch.nn.Module, cfg: RunConfig) -> list:
    """The training hooks ``cfg`` asks for: ``BaseFreeze`` when ``train.freeze_base``, else none."""
    return [BaseFreeze(model)] if cfg.train.freeze_base else []


def growth_gap(model: ContextVectorLLM, grown: ContextVectorLLM, data: Dataset) -> dict:
    """Validation loss of the base model and of the grown model right after growth (same data)."""
    before = evaluate(model, data, 256, next(model.parameters()).device)["loss"]
    after = evaluate(grown, data, 256, next(grown.parameters()).device)["loss"]
    return {"loss_before": before, "loss_after": after, "relative_change": (after - before) / before}


def growth_experiment(result, new_dim: int, extra_epochs: int, run_root: Union[str, Path],
                      callbacks: Sequence[Callable[[dict], None]] = (),
                      step_callbacks: Sequence[Callable[[dict], None]] = (),
                      progress: Optional[Callable] = None) -> tuple[pd.DataFrame, dict]:
    """From a finished run (``experiment.RunResult``): continue ``extra_epochs`` with no growth, with
    growth + freeze base, with growth + fine-tune all, and train a ``new_dim`` model from scratch for the
    base's epochs + ``extra_epochs``. Returns (curves DataFrame, growth_gap dict). Each run resumes."""
    base_cfg = result.config
    prep, run_root = result.prepared, Path(run_root)
    base_epochs = len(result.history)
    base = copy.deepcopy(result.model).cpu().eval()
    grown = expand_context(base, new_dim)
    gap = growth_gap(base, grown, prep.valid)
    common = dict(train__epochs=extra_epochs, train__patience=max(extra_epochs, 1))
    runs = {
        "no growth": (copy.deepcopy(base), apply_overrides(base_cfg, **common)),
        "grow, freeze base": (copy.deepcopy(grown), apply_overrides(
            base_cfg, model__context_dim=new_dim, model__grown_from=grown.config.grown_from,
            train__freeze_base=True, **common)),
        "grow, fine-tune all": (copy.deepcopy(grown), apply_overrides(
            base_cfg, model__context_dim=new_dim, model__grown_from=grown.config.grown_from, **common)),
    }
    scratch_cfg = apply_overrides(base_cfg, model__context_dim=new_dim, train__epochs=base_epochs + extra_epochs,
                                  train__patience=base_epochs + extra_epochs)
    torch.manual_seed(scratch_cfg.train.seed)
    runs[f"context {new_dim} from scratch"] = (ContextVectorLLM(scratch_cfg.model), scratch_cfg)
    rows = [{"variant": v, "epoch": r["epoch"], "val_ppl": r["val_ppl"]}
            for v in list(runs)[:3] for r in result.history]
    for i, (name, (model, cfg)) in enumerate(runs.items()):
        t = Trainer(model, prep.train, prep.valid, cfg, prep.tokenizer, run_root / f"variant{i}", callbacks,
                    step_callbacks, hooks=freeze_hooks(model, cfg), progress=progress)
        offset = 0 if "scratch" in name else base_epochs
        rows += [{"variant": name, "epoch": r["epoch"] + offset, "val_ppl": r["val_ppl"]} for r in t.fit()]
    return pd.DataFrame(rows), gap

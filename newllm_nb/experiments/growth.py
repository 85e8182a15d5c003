"""Context expansion (the original's growth experiment): grow a trained model's context vector, e.g. 256 -> 512,
and keep training either everything ("fine-tune all") or only the new dimensions ("freeze base").

Every base parameter is copied exactly. The new context entries feed nothing at first: their columns in
layer 1, and in the gates when they read the context, are zero. What they hold comes from the new candidate
rows of W_u, which start as a freshly built model's (random): with zero rows every new channel would start
equal and get equal gradients, and stay a copy of the others. New biases and norm gains start as a freshly
built model's do: LayerNorm gains 1, and the new channels' forget / input biases as ``forget_bias``,
``chrono_init`` and ``slow_forget_bias`` set them, so the new channels get the timescales the option asks
for. The old dimensions still change slightly: after growth LayerNorm normalises over the larger vector,
new entries included. ``growth_gap`` measures the effect instead of assuming it away.

Every cell option grows:

* ``state_norm``: "layernorm" and "read" as above; "noaffine" has no gains to grow. "none" has no norm that
  couples the channels, and nothing reads the new entries yet, so there the grown model's outputs equal
  the base's exactly.
* ``gate_context``: the gates' columns that read the new context entries start at zero (full rank or
  ``gate_down`` with ``gate_rank``); ``gate_rank`` keeps its rank, and ``gates`` (U) gets new rows: zero
  for the forget and input gates, fresh random ones for the candidate, as above.
* ``slow_forget_bias``: the context is [fast half ; slow half], so each half grows at its own end,
  [old fast | new fast | old slow | new slow], and every channel keeps its timescale and its half's norm.
* ``fnn_residual``: layers 2..N and their norms do not depend on the context size and are copied whole.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
import torch

from ..config import ModelConfig, RunConfig, apply_overrides
from ..data.batching import Dataset
from ..models.newllm import NewLLM
from ..runtime.stopping import Interrupted
from ..train.metrics import evaluate
from ..train.trainer import Trainer


def channel_positions(config: ModelConfig, old_dim: int) -> torch.Tensor:
    """Where the ``old_dim`` channels of the model before growth sit in ``config``'s context vector."""
    if config.slow_forget_bias:  # each half grows at its own end: [old fast | new fast | old slow | new slow]
        half = torch.arange(old_dim // 2)
        return torch.cat([half, config.context_dim // 2 + half])
    return torch.arange(old_dim)


def _base_index(model: NewLLM, old_dim: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Parameter name -> one index per axis selecting the entries that hold the base model's parameters
    (``t[torch.meshgrid(*index)]``); parameters not named here do not depend on the context size."""
    cfg = model.config
    C, E, H = cfg.context_dim, cfg.embed_dim, cfg.hidden_dim
    pos = channel_positions(cfg, old_dim)
    rows = torch.cat([j * C + pos for j in range(3)])  # gate blocks [forget | input | candidate], each grown
    ctx_read = torch.cat([torch.arange(H), H + pos])  # the gates' input [h ; c] when they read the context
    index = {"fnn.0.weight": (torch.arange(H), torch.cat([torch.arange(E), E + pos])), "gates.bias": (rows,)}
    if model.gate_down is not None:
        index["gates.weight"] = (rows, torch.arange(cfg.gate_rank))
        if cfg.gate_context:
            index["gate_down.weight"] = (torch.arange(cfg.gate_rank), ctx_read)
    else:
        index["gates.weight"] = (rows, ctx_read if cfg.gate_context else torch.arange(H))
    if model.norm.weight is not None:
        index["norm.weight"] = index["norm.bias"] = (pos,)
    return index


@torch.no_grad()
def expand_context(model: NewLLM, new_dim: int) -> NewLLM:
    """A copy of ``model`` with context_dim ``new_dim``: every base parameter kept exactly, new weight-matrix
    entries zero except the new candidate rows of W_u, new biases and norm gains as a fresh model starts
    them (the module docstring gives the layout per cell option). ``config.grown_from`` records the size
    before the first growth."""
    if not isinstance(model, NewLLM):
        raise ValueError(f"expand_context grows a New-LLM (arch='newllm'), not a {type(model).__name__}")
    cfg = model.config
    C = cfg.context_dim
    if not isinstance(new_dim, int) or isinstance(new_dim, bool) or new_dim <= C:
        raise ValueError(f"invalid new_dim={new_dim!r}: must be an integer larger than context_dim={C}")
    new_cfg = dataclasses.replace(cfg, context_dim=new_dim, grown_from=cfg.grown_from or C)  # validates new_dim
    big = NewLLM(new_cfg).to(model.embed.weight.device)
    index = _base_index(big, C)
    old_sd, sd = model.state_dict(), big.state_dict()
    for name, fresh in sd.items():
        if name not in index:
            fresh.copy_(old_sd[name])
            continue
        grown = fresh.clone() if fresh.dim() == 1 else torch.zeros_like(fresh)
        if name == "gates.weight":  # the new candidate rows of W_u, as a fresh model's (module docstring)
            candidate = torch.arange(2 * new_dim, 3 * new_dim)
            candidate = candidate[~torch.isin(candidate, index[name][0])]
            grown[candidate] = fresh[candidate]
        grown[torch.meshgrid(*index[name], indexing="ij")] = old_sd[name]
        fresh.copy_(grown)
    big.load_state_dict(sd)
    return big


def trainable_masks(model: NewLLM) -> dict:
    """For a grown model: name -> bool mask of the entries that belong to the *new* dimensions."""
    cfg = model.config
    if not cfg.grown_from:
        raise ValueError("freeze_base needs a grown model (config.grown_from is not set): call expand_context first")
    index = _base_index(model, cfg.grown_from)
    masks = {}
    for name, p in model.named_parameters():
        m = torch.zeros_like(p, dtype=torch.bool)
        if name in index:
            m.fill_(True)
            m[torch.meshgrid(*index[name], indexing="ij")] = False
        masks[name] = m
    return masks


class BaseFreeze:
    """A training hook that keeps every base entry of a grown model bit-identical while the new dimensions train.

    Gradients of base entries are zeroed by tensor hooks (so optimizer moments stay zero there), and after
    each optimizer step the base entries are restored from a copy, which also undoes weight decay.
    Parameters with no new entry at all stop requiring gradients, so make it before the optimizer.
    """

    def __init__(self, model: NewLLM) -> None:
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


def growth_gap(model: NewLLM, grown: NewLLM, data: Dataset) -> dict:
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
    base's epochs + ``extra_epochs``. Returns (curves DataFrame, growth_gap dict). Each run resumes; a stop
    signal saves the variant in progress and raises ``stopping.Interrupted`` carrying the curves so far."""
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
    runs[f"context {new_dim} from scratch"] = (NewLLM(scratch_cfg.model), scratch_cfg)
    rows = [{"variant": v, "epoch": r["epoch"], "val_ppl": r["val_ppl"]}
            for v in list(runs)[:3] for r in result.history]
    for i, (name, (model, cfg)) in enumerate(runs.items()):
        t = Trainer(model, prep.train, prep.valid, cfg, prep.tokenizer, run_root / f"variant{i}", callbacks,
                    step_callbacks, hooks=freeze_hooks(model, cfg), progress=progress, data_source=prep.source)
        offset = 0 if "scratch" in name else base_epochs
        try:
            history = t.fit()
        except Interrupted as e:  # stopped: the curves so far (this variant's too) and the gap
            rows += [{"variant": name, "epoch": r["epoch"] + offset, "val_ppl": r["val_ppl"]} for r in t.history]
            e.result = (pd.DataFrame(rows), gap)
            raise
        rows += [{"variant": name, "epoch": r["epoch"] + offset, "val_ppl": r["val_ppl"]} for r in history]
    return pd.DataFrame(rows), gap

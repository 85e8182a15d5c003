"""From a RunConfig to a trained model: the one pipeline the CLI and every notebook share."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from .baselines import build_model
from .config import RunConfig, smoke_config
from .data import Prepared, prepare
from .trainer import Trainer, evaluate

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class RunResult:
    model: torch.nn.Module
    tokenizer: object
    history: list
    metrics: dict  # final validation metrics of the best weights
    prepared: Prepared
    run_dir: Optional[Path]
    params: int
    seconds: float
    trainer: Trainer = field(repr=False, default=None)

    @property
    def best_path(self) -> Optional[Path]:
        return self.trainer.best_path if self.trainer else None


def run_experiment(cfg: RunConfig, run_dir: Optional[Union[str, Path]] = None,
                   callbacks: Sequence[Callable[[dict], None]] = (), prepared: Optional[Prepared] = None,
                   resume: bool = True) -> RunResult:
    """Prepare data, build the model, train (resuming ``run_dir`` if it holds a run), reload the best
    weights and evaluate them. Smoke mode (``NEWLLM_SMOKE=1``) shrinks data and epochs."""
    cfg = smoke_config(cfg)
    t0 = time.perf_counter()
    if prepared is None:
        prepared = prepare(cfg.data, cfg.model.vocab_size)
        print(f"data: {prepared.source} | train {len(prepared.train):,} / valid {len(prepared.valid):,} "
              f"{'tokens' if prepared.train.stateful else 'sequences'} | vocab {prepared.tokenizer.vocab_size:,}")
    # The tokenizer decides the real vocabulary size (a small corpus may have fewer words).
    if prepared.tokenizer.vocab_size != cfg.model.vocab_size:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    trainer = Trainer(model, prepared.train, prepared.valid, cfg, prepared.tokenizer, run_dir, callbacks)
    history = trainer.fit(resume=resume)
    if trainer.best_path is not None and trainer.best_path.exists():
        from .checkpoint import load_checkpoint

        load_checkpoint(trainer.best_path).load_into(trainer.model)
    elif trainer.ema is not None:  # no checkpoints written: use the averaged weights, which validation measured
        trainer.ema.copy_to_model()
    metrics = evaluate(trainer.model, prepared.valid, min(cfg.train.batch_size, 1024), trainer.device,
                       trainer.precision, cfg.train.seed_compatible)
    return RunResult(trainer.model, prepared.tokenizer, history, metrics, prepared,
                     Path(run_dir) if run_dir else None, sum(p.numel() for p in model.parameters()),
                     time.perf_counter() - t0, trainer)


def train_live(cfg: RunConfig, name: str, title: str = "") -> RunResult:
    """``run_experiment`` with a live loss / PPL plot, in the runs folder for these settings
    (``colab.run_dir``): re-running with the same settings resumes, other settings start a new run."""
    from .colab import run_dir
    from .plots import LivePlot

    live = LivePlot(title)
    res = run_experiment(cfg, run_dir(name, cfg), callbacks=[live.update])
    live.history = list(res.history)  # a resumed run: show the epochs from before the restart too
    live.draw()
    return res


def category_table(model: torch.nn.Module, tokenizer, records: list, max_seq_length: int,
                   device: Union[str, torch.device] = "cpu") -> pd.DataFrame:
    """Validation loss / PPL / accuracy per Dolly category (token-weighted, non-PAD targets)."""
    import pandas as pd

    from .data import WindowData, dolly_sequences

    rows = []
    for cat in sorted({r.get("category", "unknown") for r in records}):
        recs = [r for r in records if r.get("category", "unknown") == cat]
        m = evaluate(model, WindowData(*dolly_sequences(recs, tokenizer, max_seq_length)), 256, device)
        rows.append({"category": cat, "examples": len(recs), "tokens": m["tokens"], "val_loss": round(m["loss"], 4),
                     "val_ppl": round(m["ppl"], 2), "val_acc_%": round(100 * m["acc"], 1)})
    return pd.DataFrame(rows).set_index("category")


def latest_checkpoint(prefix: str) -> Optional[Path]:
    """The newest ``best.safetensors`` under the runs folder whose run name starts with ``prefix``."""
    from .colab import runs_root

    found = sorted(runs_root().glob(f"{prefix}*/best.safetensors"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None

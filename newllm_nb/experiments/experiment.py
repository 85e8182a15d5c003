"""From a RunConfig to a trained model: the one pipeline the CLI, the sweep and every notebook share.

No plots and no Colab here: callers that want live curves pass callbacks, and entry points (CLI,
notebook helpers) decide about smoke mode before calling.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..config import RunConfig
from ..data.pipeline import Prepared, prepare
from ..data.tokenizer import tokenizer_hash
from ..models.build import build_model
from ..models.newllm import count_parameters
from ..runtime.stopping import Interrupted
from ..train.checkpoint import load_checkpoint
from ..train.metrics import eval_batch_size, evaluate
from ..train.runs import RunFolderError, fingerprint_id, run_fingerprint
from ..train.trainer import Trainer
from .growth import freeze_hooks


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
    config: RunConfig = field(repr=False, default=None)  # as trained (vocab size from the tokenizer)
    trainer: Trainer = field(repr=False, default=None)
    stopped: Optional[Interrupted] = None  # set when a stop signal ended training early (a partial result)

    @property
    def checkpoint(self) -> Optional[Path]:
        """The checkpoint to resume a stopped run from (its ``last``), else None."""
        return self.stopped.checkpoint if self.stopped is not None else None

    @property
    def best_path(self) -> Optional[Path]:
        """The best checkpoint, where one was written."""
        path = self.trainer.best_path if self.trainer else None
        return path if path is not None and path.exists() else None

    def summary(self) -> str:
        """The one final line the CLI and the notebooks print: the best weights' validation metrics."""
        m, last = self.metrics, (self.history[-1] if self.history else {})
        how = "per-batch mean, original-metrics" if self.config.train.original_metrics else "token-weighted, non-PAD"
        return (f"final ({how} validation, best epoch): loss {m['loss']:.4f} | PPL {m['ppl']:.2f} | "
                f"accuracy {100 * m['acc']:.1f}% | params {self.params:,} | epochs {last.get('epoch', 0)} | "
                f"{self.seconds:.0f}s | data: {self.prepared.source}")


def fit_vocab(cfg: RunConfig, tokenizer) -> RunConfig:
    """The tokenizer decides the real vocabulary size (a small corpus may have fewer words)."""
    if tokenizer.vocab_size == cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))


def keyed_run_dir(root: Union[str, Path], name: str, cfg: RunConfig, prepared: Prepared) -> Path:
    """``root/name-<fingerprint id>``: the one rule for naming run folders (CLI and notebooks). Same settings
    and data find the same folder (and resume or report it); anything else gets its own."""
    cfg = fit_vocab(cfg, prepared.tokenizer)
    fp = run_fingerprint(cfg, prepared.train, prepared.valid, prepared.tokenizer)
    return Path(root) / f"{name}-{fingerprint_id(fp)}"


def run_experiment(cfg: RunConfig, run_dir: Optional[Union[str, Path]] = None,
                   callbacks: Sequence[Callable[[dict], None]] = (), prepared: Optional[Prepared] = None,
                   resume: bool = True, step_callbacks: Sequence[Callable[[dict], None]] = (),
                   progress: Optional[Callable] = None, overwrite: bool = False) -> RunResult:
    """Prepare data, build the model, train (resuming ``run_dir`` if it holds a run), reload the best
    weights and evaluate them. ``callbacks`` get each epoch's record, ``step_callbacks`` each step's loss,
    ``progress`` is the trainer's progress-bar class. ``resume=False`` starts this configuration's run over;
    ``overwrite`` also replaces another configuration's run in ``run_dir`` (else that is refused)."""
    t0 = time.perf_counter()
    if prepared is None:
        prepared = prepare(cfg.data, cfg.model.vocab_size)
        print(prepared.summary())
    cfg = fit_vocab(cfg, prepared.tokenizer)
    if cfg.train.freeze_base and not (resume and run_dir and (Path(run_dir) / "last.safetensors").exists()):
        raise ValueError("train.freeze_base=True: run_experiment builds a fresh model, so it can only resume a grown "
                         "run from its run folder; grow and train one with expansion.growth_experiment")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    trainer = Trainer(model, prepared.train, prepared.valid, cfg, prepared.tokenizer, run_dir, callbacks,
                      step_callbacks, hooks=freeze_hooks(model, cfg), progress=progress, data_source=prepared.source)
    try:
        history = trainer.fit(resume=resume, overwrite=overwrite)
    except Interrupted as e:
        e.result = _partial(cfg, trainer, prepared, run_dir, time.perf_counter() - t0, e)
        raise
    if trainer.best_path is not None and trainer.best_path.exists():
        load_checkpoint(trainer.best_path).load_into(trainer.model)
    elif trainer.best_path is not None and history:  # every run that validates once writes one: it was deleted
        raise RunFolderError(f"the run in {run_dir} finished earlier but its best.safetensors is missing, so its best "
                             f"epoch cannot be reported: train it again with --overwrite (overwrite=True), or use "
                             f"{trainer.last_path} (the last epoch's weights) with generate --checkpoint")
    elif trainer.ema is not None:  # no checkpoints written: use the averaged weights, which validation measured
        trainer.ema.copy_to_model()
    metrics = evaluate(trainer.model, prepared.valid, eval_batch_size(cfg.train.batch_size), trainer.device,
                       trainer.precision, cfg.train.original_metrics)
    model.tokenizer_sha256 = tokenizer_hash(prepared.tokenizer)  # generation refuses another tokenizer
    return RunResult(trainer.model, prepared.tokenizer, history, metrics, prepared,
                     Path(run_dir) if run_dir else None, count_parameters(model), time.perf_counter() - t0,
                     cfg, trainer)


def _partial(cfg: RunConfig, trainer: Trainer, prepared: Prepared, run_dir, seconds: float,
             stop: Interrupted) -> RunResult:
    """What a stopped run has: the model as it stands, the epochs so far, and as ``metrics`` the best epoch's
    validation as recorded (NaN before the first epoch ends; nothing is evaluated while stopping)."""
    best = min((r for r in trainer.history if r.get("best")), key=lambda r: r["val_loss"], default=None)
    nan = float("nan")
    metrics = ({"loss": best["val_loss"], "ppl": best["val_ppl"], "acc": best["val_acc"]} if best
               else {"loss": nan, "ppl": nan, "acc": nan})
    trainer.model.tokenizer_sha256 = tokenizer_hash(prepared.tokenizer)
    return RunResult(trainer.model, prepared.tokenizer, trainer.history, metrics, prepared,
                     Path(run_dir) if run_dir else None, count_parameters(trainer.model), seconds, cfg, trainer,
                     stopped=stop)

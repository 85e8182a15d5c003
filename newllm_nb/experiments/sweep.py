"""The original's layer sweep, resumable: each finished run's result is saved, re-running skips it.

Runs are independent, so ``jobs`` > 1 trains several at once, one worker process per visible GPU
(``parallel.spread``); a run that fails is reported in its row and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd

from ..config import RunConfig
from ..data.pipeline import Prepared, prepare
from ..data.sources import is_sample
from ..models.build import matched_config
from ..runtime.files import atomic_write_text
from ..runtime.stopping import Interrupted
from .experiment import keyed_run_dir, run_experiment
from .parallel import spread


def sweep_configs(base: RunConfig, layers: Sequence[int], archs: Sequence[str] = ("newllm",)):
    """(arch, layers, config) for every run; baselines are sized to New-LLM at that layer count."""
    for arch in archs:
        for n in layers:
            m = dataclasses.replace(base.model, num_layers=n, arch="newllm")
            yield arch, n, dataclasses.replace(base, model=matched_config(m, arch))


def run_sweep(base: RunConfig, layers: Sequence[int], out_dir: Union[str, Path], archs: Sequence[str] = ("newllm",),
              prepared: Optional[Prepared] = None,
              on_run_start: Optional[Callable[[str, int], object]] = None, jobs: int = 1,
              progress: Optional[Callable] = None) -> pd.DataFrame:
    """Train every (arch, layers) pair on the same data; returns one row per run.

    Each run's folder is ``out_dir/<arch>-L<n>-<fingerprint id>`` (experiment.keyed_run_dir, the CLI's rule),
    and its ``result.json`` marks it finished (skipped on re-run); an unfinished one resumes from its last
    checkpoint, so a disconnect loses at most the run in progress. Other settings or data never find it.
    ``on_run_start(arch, n)`` may return epoch callbacks, or a pair (epoch callbacks, step callbacks),
    for live plots and progress labelled with the run.

    ``jobs`` > 1: that many runs at a time in worker processes spread over the visible GPUs (one per GPU
    when ``jobs`` equals their count). Live callbacks cannot reach into other processes, so
    ``on_run_start`` is not called then; each run's line is printed as it ends. A run that raised gets a
    row with its ``error`` and no ``result.json`` (a re-run tries it again); the others are kept.

    A stop signal (Ctrl-C, the notebook's Stop button, SIGTERM) saves the run in progress and raises
    ``stopping.Interrupted`` with the rows so far as its ``result``; re-running resumes it.
    """
    out_dir = Path(out_dir)
    prepared = prepared if prepared is not None else prepare(base.data, base.model.vocab_size)
    rows, todo = [], []
    for arch, n, cfg in sweep_configs(base, layers, archs):
        rd = keyed_run_dir(out_dir, f"{arch}-L{n}{'-sample' if is_sample(prepared.source) else ''}", cfg, prepared)
        done = rd / "result.json"
        if done.exists():
            rows.append({**json.loads(done.read_text()), "data": prepared.source})  # same data: same source
            print(f"{arch} L{n}: finished earlier, skipped")
            continue
        if jobs > 1:
            rows.append(None)  # filled in when the run ends, so rows keep the sweep's order
            todo.append((len(rows) - 1, (arch, n, cfg, rd, prepared)))
            continue
        callbacks, step_callbacks = _split_callbacks(on_run_start(arch, n) if on_run_start else ())
        try:
            rows.append(train_one(arch, n, cfg, rd, prepared, callbacks, step_callbacks, progress))
        except Interrupted as e:  # stopped: the rows so far, and this run's checkpoint to resume from
            rows.append({"arch": arch, "layers": n, "stopped": str(e.checkpoint or "nothing saved")})
            e.result = pd.DataFrame(rows)
            raise
    if todo:
        def done_one(k: int, got) -> None:
            arch, n = todo[k][1][:2]
            print(f"{arch} L{n}: " + (f"FAILED ({type(got).__name__}: {got})" if isinstance(got, BaseException)
                                       else f"val PPL {got['best_val_ppl']}"), flush=True)

        results = spread(train_one, [call for _, call in todo], jobs, on_done=done_one)
        for (i, (arch, n, *_)), got in zip(todo, results):
            rows[i] = ({"arch": arch, "layers": n, "error": f"{type(got).__name__}: {got}", "data": prepared.source}
                       if isinstance(got, BaseException) else got)
    return pd.DataFrame(rows)


def train_one(arch: str, n: int, cfg: RunConfig, rd: Path, prepared: Prepared, callbacks: Sequence = (),
              step_callbacks: Sequence = (), progress: Optional[Callable] = None) -> dict:
    """One sweep run into ``rd``; its row, also saved as ``rd/result.json`` (a worker process may run this)."""
    res = run_experiment(cfg, rd, callbacks=callbacks, prepared=prepared, step_callbacks=step_callbacks,
                         progress=progress)
    best = min(res.history, key=lambda r: r["val_loss"]) if res.history else {}
    row = {"arch": arch, "layers": n, "params": res.params, "best_val_ppl": round(res.metrics["ppl"], 3),
           "val_acc_%": round(100 * res.metrics["acc"], 2), "best_epoch": best.get("epoch"),
           "epochs": len(res.history), "seconds": round(sum(r["seconds"] for r in res.history), 1),
           "data": prepared.source}
    atomic_write_text(rd / "result.json", json.dumps(row))
    return row


def _split_callbacks(got) -> tuple[Sequence, Sequence]:
    """``on_run_start``'s answer as (epoch callbacks, step callbacks)."""
    if isinstance(got, tuple) and len(got) == 2 and all(isinstance(x, (list, tuple)) for x in got):
        return got
    return got or (), ()

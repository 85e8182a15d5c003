"""Data-parallel scaling: the same training run on 1, 2, ... GPUs, once per seed.

Launches ``torchrun --nproc_per_node=N -m newllm_nb train ...`` itself for each GPU count N (N=1 is the plain
single-process run) and each seed, reads each run's per-epoch history and config from its checkpoint and
prints one row per run (seed, global batch, lr, training path, epoch time, tokens/s, speed-up, efficiency =
speed-up / N, val PPL of the last epoch), then a summary per GPU count: runs, median epoch time and tokens/s,
speed-up against the fewest GPUs on the same seeds, efficiency, val PPL mean and sample std, and the mean
seed-paired val PPL difference against the fewest GPUs. Epoch 1 holds the graph capture and kernel compiles,
so the timings are medians over the later epochs.

    # 1 vs 2 GPUs at the same global batch, three seeds: is the val PPL gap spread or systematic?
    python benchmarks/multi_gpu.py --gpus 1,2 --batch 2048 --seeds 0,10,20 --epochs 4 --out results/mg_seeds
    # weak scaling: 2048 rows per GPU, so global batch 2048 / 4096 / 8192 (lr by the original rule from it)
    python benchmarks/multi_gpu.py --gpus 1,2,4 --per-gpu-batch 2048 --seeds 0,10 --epochs 4 --budget 220
    # the fused Triton step against the CUDA graph + hand-written BPTT step, on the same seeds
    python benchmarks/multi_gpu.py --gpus 1,2 --fast-path fused,graph --seeds 0,10
    # the defaults: 1 and 2 GPUs at global batch 2048, the CLI's seed, 18 copies of .bench_data/valid.txt
    python benchmarks/multi_gpu.py --file .bench_data/valid.txt --repeat 18 --gpus 1,2
    # more `train` flags after --; the tables of CSVs written earlier, without training
    python benchmarks/multi_gpu.py --gpus 1,2 -- --precision fp32
    python benchmarks/multi_gpu.py --summarize results/mg_seeds/multi_gpu.csv

Batch: ``--batch B`` (default) trains every count at global batch B (strong scaling: B/N rows per GPU, the
same lr and the same steps per epoch); ``--per-gpu-batch B`` trains N GPUs at global batch B*N (weak scaling).
The CLI takes ``--batch-size`` as the global batch and, without ``--lr``, sets lr = 1e-4*sqrt(global batch/32),
so under weak scaling the lr grows with N and an epoch has 1/N of the steps; each row shows its global batch
and lr (read back from the run's checkpoint).

Seeds: the trainer shuffles epoch e with seed + e and seeds rank r's dropout with seed + r, so seeds closer
together than max(epochs, GPUs) share shuffled orders and dropout streams between runs (0,10,20 keeps them
apart for up to 10 epochs and 10 GPUs). The seed and ``--fast-path`` reach the run through the CLI's own
flags when ``train`` has them, else through this script acting as the torchrun entry point (the CLI's
``config_from_args`` plus those overrides); either way each row's checkpoint config is checked against them.

Data: ``--file`` (WikiText text) repeated ``--repeat`` times into one file (the package gives its last 10% of
lines to validation): 18 copies of WikiText-2's validation split is ~3.9M words, about twice WikiText-2's
training split. The repeated text makes the validation PPL a comparison between rows, not a quality figure.

Output: ``--csv FILE`` and ``--out DIR`` (``DIR/multi_gpu.csv``, ``DIR/multi_gpu.log`` and each run's own
log under ``DIR/runs/``) are rewritten as each run finishes, so a run killed by a time limit keeps the rows
that finished; ``--budget S`` starts no run that the longest launch so far says would end after S seconds.
Runs go seed by seed (all counts of one seed, then the next), so what finished compares like with like.
Without GPUs every process trains on the CPU (gloo), which checks the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))

from newllm_nb.config import RunConfig, apply_overrides  # noqa: E402
from newllm_nb.experiments.bench import device_name  # noqa: E402
from newllm_nb.train.checkpoint import load_checkpoint  # noqa: E402

# NVLink multicast stays off: on shared hosts a program that uses it can take the GPUs out of service.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# First argument of this script when torchrun starts it as the training entry point (see worker_main).
WORKER_FLAG = "--as-train-worker"
# `train` flags this script sets itself; passing them after -- would make the rows lie.
MANAGED_FLAGS = ("--data-path", "--layers", "--batch-size", "--epochs", "--patience", "--run-dir", "--no-resume",
                 "--seed", "--fast-path", "--lr", "--mode")
# Columns that make runs comparable: speed-ups and PPL differences are taken within one such group only.
GROUP = ["scaling", "batch_arg", "fast_path", "layers", "data_mode"]
RUN_COLUMNS = ["seed", "scaling", "fast_path", "gpus", "global_batch", "per_gpu_batch", "lr", "path", "epochs",
               "epoch_s", "tokens_per_s", "speedup", "efficiency_%", "first_epoch_s", "train_ppl", "val_ppl",
               "launch_wall_s"]


@dataclass(frozen=True)
class RunSpec:
    """One training run: how many processes (one GPU each), which seed, which batch and training path."""

    gpus: int
    seed: Optional[int]  # None: the CLI's default seed
    global_batch: int
    scaling: str  # "strong": the same global batch for every count; "weak": a fixed batch per GPU
    batch_arg: int  # --batch or --per-gpu-batch as given
    fast_path: Optional[str] = None  # None: the CLI's default

    @property
    def name(self) -> str:
        seed = "" if self.seed is None else f"-seed{self.seed}"
        return f"gpus{self.gpus}{seed}-b{self.global_batch}" + (f"-{self.fast_path}" if self.fast_path else "")


def plan_runs(counts: Sequence[int], seeds: Sequence[Optional[int]], batch: int, per_gpu_batch: Optional[int] = None,
              fast_paths: Sequence[Optional[str]] = (None,)) -> list[RunSpec]:
    """Every (seed, fast path, GPU count), seed by seed: a run cut short still holds whole seeds. A seed or
    fast path of None leaves the CLI's default."""
    weak = per_gpu_batch is not None
    return [RunSpec(n, s, per_gpu_batch * n if weak else batch, "weak" if weak else "strong",
                    per_gpu_batch if weak else batch, fp)
            for s in seeds for fp in fast_paths for n in counts]


def original_overlap_note(seeds: Sequence[int], epochs: int, gpus: int) -> Optional[str]:
    """A warning when two seeds are closer than the trainer's seed offsets (seed + epoch, seed + rank)."""
    s = sorted(set(seeds))
    gap = min((b - a for a, b in zip(s, s[1:])), default=None)
    reach = max(epochs, gpus)
    if gap is None or gap >= reach:
        return None
    return (f"note: seeds {','.join(map(str, s))} lie closer than {reach} apart: runs share shuffled epoch orders "
            f"(seed + epoch) or dropout streams (seed + rank); e.g. --seeds 0,{reach},{2 * reach} keeps them apart")


# -- launching ------------------------------------------------------------------------------------------------
def cli_train_flags() -> set[str]:
    """The option strings ``python -m newllm_nb train`` accepts (none found: every setting goes through the
    worker entry point, which works whatever the flags are)."""
    from newllm_nb import cli

    try:
        sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
        return {s for action in sub.choices["train"]._actions for s in action.option_strings}
    except (AttributeError, KeyError, StopIteration):
        return set()


def launch_command(spec: RunSpec, data: Path, run_dir: Path, layers: int, epochs: int, cli_flags: Iterable[str],
                   mode: Optional[str] = None, lr: Optional[float] = None, extra: Sequence[str] = ()) -> list[str]:
    """The torchrun command line of one run. The seed and fast path go through ``train``'s own flags where it
    has them; the rest travel as config overrides to this script's worker entry point."""
    flags = set(cli_flags)
    train = ["train", "--data-path", str(data), "--layers", str(layers), "--batch-size", str(spec.global_batch),
             "--epochs", str(epochs), "--patience", "1000", "--quiet", "--no-resume", "--run-dir", str(run_dir)]
    if mode:
        train += ["--mode", mode]
    if lr is not None:
        train += ["--lr", repr(lr)]
    overrides: dict = {}
    for flag, field, value in (("--seed", "train__seed", spec.seed), ("--fast-path", "train__fast_path",
                                                                      spec.fast_path)):
        if value is None:
            continue
        if flag in flags:
            train += [flag, str(value)]
        else:
            overrides[field] = value
    entry = [str(SCRIPT), WORKER_FLAG, json.dumps(overrides)] if overrides else ["-m", "newllm_nb"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.gpus}",
            *entry, *train, *extra]


def worker_main(overrides: dict, argv: Sequence[str]) -> int:
    """``python -m newllm_nb`` with ``overrides`` (``section__field`` -> value) applied on top of the config the
    CLI builds from its flags: for settings ``train`` has no flag for (under torchrun, on every rank)."""
    from newllm_nb import cli

    flags_to_config = cli.config_from_args

    def config_with_overrides(args: argparse.Namespace, recommended_batch: int) -> RunConfig:
        return apply_overrides(flags_to_config(args, recommended_batch), **overrides)

    cli.config_from_args = config_with_overrides
    return cli.main(list(argv))


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """End a torchrun launch: SIGTERM lets torchrun stop its ranks; SIGKILL if it does not within ``grace``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch(cmd: Sequence[str], log: Path, timeout: float, cuda: bool) -> tuple[int, str, float]:
    """Run one torchrun command with its output going to ``log``: (exit code, output, wall seconds)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, **SAFE_ENV, PYTHONPATH=path)
    if not cuda:  # CPU ranks (gloo): one thread each, so N ranks do not fight over the cores
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = 124
        except BaseException:  # Ctrl-C / the machine's time limit: take the ranks down with us
            _stop(proc, 5.0)
            raise
    return code, log.read_text(errors="replace"), time.perf_counter() - t0


# -- one run's row ---------------------------------------------------------------------------------------------
def training_path(log: str) -> str:
    """The step the run trained with, as rank 0 printed it (no line: the eager step, e.g. on the CPU)."""
    if "training eagerly" in log:
        return "eager (capture failed)"
    found = re.findall(r"fast path: (\S+) captured", log)
    return found[0] if found else "eager"


def check_config(spec: RunSpec, train: dict) -> None:
    """Raise unless the run's checkpoint config holds the seed, batch and fast path this script asked for."""
    want = {"batch_size": spec.global_batch, "seed": spec.seed, "fast_path": spec.fast_path}
    want = {k: v for k, v in want.items() if v is not None}
    wrong = {k: (v, train.get(k)) for k, v in want.items() if train.get(k) != v}
    if wrong:
        raise ValueError("the run's config does not hold what was asked: " +
                         ", ".join(f"{k} {got!r} instead of {v!r}" for k, (v, got) in wrong.items()))


def make_row(spec: RunSpec, history: Sequence[dict], config: dict, log: str, wall_s: float) -> dict:
    """One run's figures from its per-epoch history and config (as stored in its checkpoint)."""
    check_config(spec, config["train"])
    cfg = RunConfig.from_dict(config)
    later = list(history[1:]) or list(history)
    return {"seed": cfg.train.seed, "scaling": spec.scaling, "batch_arg": spec.batch_arg,
            "fast_path": cfg.train.fast_path, "layers": cfg.model.num_layers, "data_mode": cfg.data.mode,
            "gpus": spec.gpus, "global_batch": cfg.train.batch_size,
            "per_gpu_batch": -(-cfg.train.batch_size // spec.gpus), "lr": float(f"{cfg.train.effective_lr:.4g}"),
            "path": training_path(log), "epochs": len(history),
            "epoch_s": round(statistics.median(h["seconds"] for h in later), 3),
            "tokens_per_s": round(statistics.median(h["tokens_per_s"] for h in later)),
            "first_epoch_s": round(history[0]["seconds"], 2), "train_ppl": round(history[-1]["train_ppl"], 2),
            "val_ppl": round(history[-1]["val_ppl"], 2), "launch_wall_s": round(wall_s, 1)}


def collect(spec: RunSpec, run_dir: Path, epochs: int, code: int, output: str, wall_s: float) -> tuple[dict, str]:
    """(row, note) of a finished launch. A launch that exits non-zero after its checkpoint records every epoch
    as finished (a crash while the processes tear down) still gives its row, with a note saying so."""
    path = run_dir / "last.safetensors"
    ckpt = load_checkpoint(path) if path.exists() else None
    done = ckpt is not None and ckpt.trainer_state.get("finished") and len(ckpt.history) == epochs
    if not done:
        why = "timed out" if code == 124 else f"exited {code}" if code else "left no finished checkpoint"
        raise RuntimeError(f"torchrun {why}:\n{output[-3000:]}")
    note = f" (torchrun exited {code} after training had finished)" if code else ""
    return make_row(spec, ckpt.history, ckpt.config, output, wall_s), note


# -- tables ----------------------------------------------------------------------------------------------------
def _groups(df: pd.DataFrame):
    return df.groupby(GROUP, sort=False, dropna=False)


def with_speedups(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's speed-up (tokens/s against the same original's run on the fewest GPUs of its group, times that
    count) and efficiency (speed-up / GPUs). NaN where that seed has no run on the fewest GPUs."""
    df = runs.copy()
    df["speedup"] = float("nan")
    for _, g in _groups(df):
        low = g.gpus.min()
        base = g[g.gpus == low].groupby("seed").tokens_per_s.median()
        df.loc[g.index, "speedup"] = (g.tokens_per_s / g.seed.map(base) * low).round(2)
    df["efficiency_%"] = (100 * df.speedup / df.gpus).round(1)
    return df


def _mean_std(values: pd.Series) -> tuple[float, float]:
    v = values.dropna()
    return (float(v.mean()) if len(v) else float("nan"), float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group and GPU count (see the module docstring).

    Like with like: the speed-up compares the median tokens/s of the seeds this count and the group's fewest
    GPUs both ran (``seeds`` lists them); ``dppl`` is the mean over those seeds of val PPL minus the same
    original's val PPL on the fewest GPUs (same initial weights and data order), ``dppl_sd`` its sample std.
    """
    out = []
    for key, g in _groups(runs):
        low = g.gpus.min()
        base = g[g.gpus == low]
        for n, c in g.groupby("gpus", sort=True):
            common = sorted(set(c.seed) & set(base.seed))
            mine, theirs = c[c.seed.isin(common)], base[base.seed.isin(common)]
            speedup = (mine.tokens_per_s.median() / theirs.tokens_per_s.median() * low) if common else float("nan")
            paired = (mine.groupby("seed").val_ppl.mean() - theirs.groupby("seed").val_ppl.mean()).dropna()
            mean, std = _mean_std(c.val_ppl)
            dmean, dstd = _mean_std(paired)
            out.append({**dict(zip(GROUP, key)), "gpus": n,
                        "global_batch": "/".join(str(b) for b in sorted(set(c.global_batch))),
                        "lr": "/".join(f"{x:.3g}" for x in sorted(set(c.lr))),
                        "path": "/".join(sorted(set(c.path))), "runs": len(c),
                        "seeds": ",".join(str(s) for s in common),
                        "epoch_s": round(c.epoch_s.median(), 3), "tokens_per_s": round(c.tokens_per_s.median()),
                        "speedup": round(speedup, 2), "efficiency_%": round(100 * speedup / n, 1),
                        "val_ppl_mean": round(mean, 2), "val_ppl_std": round(std, 2),
                        "dppl": round(dmean, 2), "dppl_sd": round(dstd, 2)})
    return pd.DataFrame(out)


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The per-run table as printed: runs with their speed-ups, in launch order."""
    df = with_speedups(runs)[RUN_COLUMNS]
    return df.assign(lr=df.lr.map(lambda x: f"{x:.3g}"))


# -- the script ------------------------------------------------------------------------------------------------
class Report:
    """Prints, and appends the same lines to ``log`` when given (flushed line by line)."""

    def __init__(self, log: Optional[Path] = None) -> None:
        self.log = log
        if log is not None:
            log.write_text("")

    def __call__(self, *parts: object) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(text + "\n")


def save_rows(rows: list[dict], paths: Iterable[Path]) -> None:
    if rows:
        df = with_speedups(pd.DataFrame(rows))
        for p in paths:
            df.to_csv(p, index=False)


def print_tables(runs: pd.DataFrame, report: Report) -> None:
    report(run_table(runs).to_string(index=False))
    report("\nsummary (speed-up and dppl against the fewest GPUs, on the seeds both ran; val PPL mean ± sample std):")
    report(summarize(runs).to_string(index=False))


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what} {text!r}: give comma-separated whole numbers") from None
    if not values:
        raise SystemExit(f"{what} {text!r}: give at least one number")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(ROOT / ".bench_data" / "valid.txt"))
    ap.add_argument("--repeat", type=int, default=18)
    ap.add_argument("--gpus", default="1,2", help="comma-separated process counts (one GPU each)")
    ap.add_argument("--batch", type=int, default=2048, help="global batch, the same for every count")
    ap.add_argument("--per-gpu-batch", type=int, help="weak scaling: N GPUs train at global batch N * this")
    ap.add_argument("--seeds", help="comma-separated training seeds, one run each per count; default: the "
                                    "CLI's seed (42)")
    ap.add_argument("--fast-path", help="comma-separated training paths (auto, fused, graph, graph-autograd, "
                                        "compile, off); default: the CLI's (auto)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, help="default: the CLI's rule, 1e-4*sqrt(global batch/32)")
    ap.add_argument("--mode", choices=["windows", "stream"], help="default: the original preset's (windows)")
    ap.add_argument("--run-timeout", type=float, default=1200, help="seconds before one launch is stopped")
    ap.add_argument("--budget", type=float, help="seconds for the whole script: a run that would not finish in "
                                                 "time (judged by the longest launch so far) is not started")
    ap.add_argument("--csv", help="write the per-run rows here (rewritten as each run finishes)")
    ap.add_argument("--out", help="folder for multi_gpu.csv, multi_gpu.log and runs/*.log, written as runs finish")
    ap.add_argument("--summarize", nargs="+", metavar="CSV", help="print the tables of CSVs this script wrote, "
                                                                  "without training")
    ap.add_argument("train_args", nargs="*", help="after --: more `train` flags, passed to every run")
    return ap


def _checked_plan(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int], list, list]:
    """The GPU counts, seeds and training paths asked for; a bad combination ends the script with one line."""
    clash = [a for a in args.train_args if a.split("=")[0] in MANAGED_FLAGS]
    if clash:
        raise SystemExit(f"{', '.join(clash)}: set by this script (use its own options: --seeds, --batch, ...)")
    counts = _int_list(args.gpus, "--gpus")
    if min(counts) < 1:
        raise SystemExit(f"--gpus {args.gpus}: every count must be at least 1")
    if args.batch < 1 or (args.per_gpu_batch is not None and args.per_gpu_batch < 1):
        raise SystemExit("--batch / --per-gpu-batch: must be at least 1")
    if args.per_gpu_batch is not None and args.batch != ap.get_default("batch"):
        raise SystemExit("--batch and --per-gpu-batch: give one (same global batch, or the same batch per GPU)")
    seeds: list[Optional[int]] = _int_list(args.seeds, "--seeds") if args.seeds else [None]
    paths = [p.strip() for p in args.fast_path.split(",") if p.strip()] if args.fast_path else [None]
    return counts, seeds, paths


def _visible_counts(counts: list[int], gpus: str, report: Report) -> tuple[list[int], int]:
    """The counts that fit the GPUs visible here, and how many are visible (0: every process on the CPU)."""
    have = torch.cuda.device_count()
    if have and max(counts) > have:
        report(f"only {have} GPU(s) visible: skipping counts above that")
        counts = [c for c in counts if c <= have]
        if not counts:
            raise SystemExit(f"--gpus {gpus}: no count fits the {have} visible GPU(s)")
    if not have:
        report("no GPU visible: every process trains on the CPU (gloo); these are CPU figures, not GPU ones")
    return counts, have


def _report_setup(args: argparse.Namespace, counts: list[int], seeds: list, have: int, report: Report) -> None:
    dev = device_name(torch.device("cuda" if have else "cpu"))
    batch = (f"{args.per_gpu_batch} per GPU (global {args.per_gpu_batch} x N)" if args.per_gpu_batch
             else f"global batch {args.batch}")
    report(f"{dev} x {max(counts)} | {args.layers} layers, {batch} | {args.repeat}x {Path(args.file).name} | "
           f"epochs {args.epochs} (timings: median of epochs 2-{args.epochs}) | seeds {args.seeds or 'CLI default'} | "
           f"fast path {args.fast_path or 'CLI default'} | torch {torch.__version__}"
           + (f" | train flags: {' '.join(args.train_args)}" if args.train_args else ""))
    note = original_overlap_note([s for s in seeds if s is not None], args.epochs, max(counts))
    if note:
        report(note)


def _run_all(specs: list, args: argparse.Namespace, out: Optional[Path], report: Report, csvs: list[Path],
             cuda: bool) -> tuple[list[dict], int]:
    """Launches every run in turn within --budget; returns the finished runs' rows and how many failed."""
    flags = cli_train_flags()
    text = Path(args.file).read_text(encoding="utf-8")
    rows: list[dict] = []
    failed = 0
    start, longest = time.monotonic(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "wiki.txt"
        data.write_text(text * args.repeat, encoding="utf-8")
        for k, spec in enumerate(specs, 1):
            if args.budget and time.monotonic() - start + longest > args.budget:
                report(f"budget {args.budget:.0f} s: the {len(specs) - k + 1} run(s) left not started")
                break
            run_dir = Path(tmp) / spec.name
            cmd = launch_command(spec, data, run_dir, args.layers, args.epochs, flags, args.mode, args.lr,
                                 args.train_args)
            log = (out / "runs" if out else Path(tmp)) / f"{spec.name}.log"
            code, output, wall = launch(cmd, log, args.run_timeout, cuda=cuda)
            longest = max(longest, wall)
            try:
                row, note = collect(spec, run_dir, args.epochs, code, output, wall)
            except Exception as e:
                failed += 1
                report(f"[{k}/{len(specs)}] {spec.name}: FAILED ({type(e).__name__}: {e})")
                continue
            rows.append(row)
            report(f"[{k}/{len(specs)}] {spec.name}: {row['epoch_s']} s/epoch, {row['tokens_per_s']:,} tokens/s, "
                   f"val PPL {row['val_ppl']}, lr {row['lr']:.3g}, {row['path']} ({row['launch_wall_s']} s){note}")
            save_rows(rows, csvs)
    return rows, failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.summarize:
        runs = pd.concat([pd.read_csv(p) for p in args.summarize], ignore_index=True)
        print_tables(runs, Report())
        return 0
    counts, seeds, paths = _checked_plan(ap, args)
    out = Path(args.out) if args.out else None
    if out:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    report = Report(out / "multi_gpu.log" if out else None)
    csvs = [Path(p) for p in [args.csv] if p] + ([out / "multi_gpu.csv"] if out else [])
    counts, have = _visible_counts(counts, args.gpus, report)
    specs = plan_runs(counts, seeds, args.batch, args.per_gpu_batch, paths)
    _report_setup(args, counts, seeds, have, report)
    # A SIGTERM (a time limit) ends this script through SystemExit, so the launch running now is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows, failed = _run_all(specs, args, out, report, csvs, cuda=bool(have))
    if not rows:
        report("no run finished")
        return 1
    report("")
    print_tables(pd.DataFrame(rows), report)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER_FLAG:
        sys.exit(worker_main(json.loads(sys.argv[2]), sys.argv[3:]))
    sys.exit(main())

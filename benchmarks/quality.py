"""Quality on real WikiText-2 text: the original recipe vs this package's recipes, and equal-parameter
LSTM / Transformer baselines, at vocab 1000 and 10000.

Data: the first 90% of the lines of --file train (its last 5% serve as the dev set for early
stopping and best-checkpoint choice); the last 10% (or --eval-file) is the evaluation text, never seen
in training or model selection. Choose recipes on ``dev_ppl`` only.

Evaluation (the same tokens for every model): the evaluation lines as one token stream cut into
--eval-streams parallel streams (default 8, each starting from a zero state), every token predicted
once, PPL token-weighted over non-PAD targets (UNK included, BOS never a target). Original-recipe models
read each paragraph from a zero context (as they were trained); stateful models carry their state
through each article; the Transformer reads windows of its training length.

Recipes are data: a preset name (``newllm_nb.config.PRESETS``) or a small override file, JSON or TOML,
e.g. ``{"base": "best_wikitext_10k", "model": {"dropout": 0.3}, "train": {"weight_decay": 0.1}}``;
``--set section.field=value`` changes one field of every recipe. The default recipe is the package's
preset for the vocabulary (``best_wikitext`` at 1000, ``best_wikitext_10k`` at 10000).

    python benchmarks/quality.py                         # the full table (GPU recommended)
    python benchmarks/quality.py --vocab 1000 --runs newllm-best-L1 --best-epochs 2   # a quick look
    python benchmarks/quality.py --vocab 10000 --runs newllm-best-L1,lstm-best-L1size --seeds 0,1,2,3,4 --jobs 10
                                                         # the spread over seeds (mean / std table)
    python benchmarks/quality.py --vocab 10000 --runs newllm-best-L1 --recipe best_wikitext_10k \\
        --recipe candidate.toml --jobs 4                 # candidates side by side on the dev set
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from newllm_nb.config import PRESETS, DataConfig, RunConfig, TrainConfig, preset
from newllm_nb.data.batching import StreamData, WindowData, wikitext_sequences, wikitext_stream
from newllm_nb.data.sources import load_wikitext, read_text, split_lines
from newllm_nb.data.tokenizer import WordTokenizer
from newllm_nb.experiments.bench import device_name
from newllm_nb.experiments.parallel import spread
from newllm_nb.models.build import build_model, matched_config
from newllm_nb.models.newllm import count_parameters
from newllm_nb.train.checkpoint import load_checkpoint
from newllm_nb.train.metrics import evaluate
from newllm_nb.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SEQ = 64  # the original's WikiText window; inputs are 63 tokens


def default_recipe(vocab: int) -> str:
    return "best_wikitext_10k" if vocab >= 10000 else "best_wikitext"


def load_recipe(spec: str, sets: Optional[list] = None) -> RunConfig:
    """A preset name or a JSON / TOML override file (``base`` preset + ``model`` / ``data`` / ``train``
    sections), then ``sets`` ("section.field=value", value as JSON where it parses). ValueError names the problem."""
    if spec in PRESETS:
        base, sections = spec, {}
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"recipe {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib  # Python >= 3.11

            doc = tomllib.loads(text)
        else:
            doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("base"), str):
            raise ValueError(f"recipe file {spec}: needs a top-level \"base\" preset name")
        unknown = set(doc) - {"base", "model", "data", "train"}
        if unknown:
            raise ValueError(f"recipe file {spec}: unknown section(s) {sorted(unknown)}")
        base, sections = doc["base"], {k: v for k, v in doc.items() if k != "base"}
    overrides = {f"{sec}__{k}": v for sec, fields in sections.items() for k, v in fields.items()}
    for item in sets or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: write section.field=value, e.g. model.dropout=0.3")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        overrides[f"{section}__{name}"] = parsed
    return preset(base, **overrides)


def original_recipe(batch: int, max_epochs: int) -> TrainConfig:
    """The original recipe: Adam, constant lr = 1e-4 * sqrt(batch/32), clip 0.5/1.0/2.0 schedule, patience 30."""
    return dataclasses.replace(preset("original_wikitext").train, epochs=max_epochs, batch_size=batch,
                               show_progress=False)


def load_splits(args) -> tuple[list, list, list]:
    if args.eval_file:
        train_all = read_text(args.file).splitlines()
        eval_lines = read_text(args.eval_file).splitlines()
    else:
        sp = load_wikitext(args.file)
        train_all, eval_lines = sp.train, sp.valid
    train, dev = split_lines(train_all, 0.95)
    return train, dev, eval_lines


def run_one(name, model_cfg, train_cfg, mode, data, device, workdir, seq: int = SEQ, eval_streams: int = 8,
            extra: Optional[dict] = None, seed: int = 0) -> dict:
    """Train and evaluate one row. ``seed`` s: initial weights from torch seed s, batch order and dropout
    from TrainConfig.seed 42 + s (s = 0 is what every table without a seed column used)."""
    torch.set_num_threads(2)  # several runs may share the machine (--jobs)
    tok, train_lines, dev_lines, eval_lines = data
    if mode == "original":
        train = WindowData(wikitext_sequences(train_lines, tok, SEQ))
        dev = WindowData(wikitext_sequences(dev_lines, tok, SEQ))
        ev = StreamData(*wikitext_stream(eval_lines, tok, reset_every_line=True), seq_len=SEQ - 1)
    else:
        train, dev = (StreamData(*wikitext_stream(x, tok), seq_len=seq - 1) for x in (train_lines, dev_lines))
        # The Transformer reads windows of its training length; the recurrent models carry state, so any
        # window length gives them the same predictions (63 keeps evaluation identical across recipes).
        ev_seq = seq if model_cfg.arch == "transformer" else SEQ
        ev = StreamData(*wikitext_stream(eval_lines, tok), seq_len=ev_seq - 1)
    cfg = RunConfig(model_cfg, DataConfig(max_seq_length=seq, mode="windows" if mode == "original" else "stream"),
                    dataclasses.replace(train_cfg, device=device, seed=train_cfg.seed + seed))
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    run_dir = Path(workdir) / f"{name}-v{tok.vocab_size}-s{seed}"
    t0 = time.perf_counter()
    trainer = Trainer(model, train, dev, cfg, tok, run_dir)
    hist = trainer.fit(resume=False)
    secs = time.perf_counter() - t0
    load_checkpoint(trainer.best_path).load_into(trainer.model)
    m = evaluate(trainer.model, ev, eval_streams, trainer.device, trainer.precision)
    return {**(extra or {}), "run": name, "vocab": tok.vocab_size, "params": count_parameters(model),
            "eval_ppl": round(m["ppl"], 2), "eval_acc_%": round(100 * m["acc"], 2), "eval_tokens": m["tokens"],
            "dev_ppl": round(min(r["val_ppl"] for r in hist), 2),
            "epochs": len(hist), "best_epoch": min(hist, key=lambda r: r["val_loss"])["epoch"],
            "train_s": round(secs, 1), "path": trainer.step.used}


def plan(recipe: RunConfig, vocab: int, best_epochs: int) -> list[tuple]:
    """(run name, ModelConfig, TrainConfig, mode, seq) of every row for one recipe at one vocabulary."""
    base = dataclasses.replace(recipe.model, vocab_size=vocab)
    tc = dataclasses.replace(recipe.train, epochs=best_epochs, show_progress=False)
    seq = recipe.data.max_seq_length
    original_model = dataclasses.replace(preset("original_wikitext").model, vocab_size=vocab)
    L1, L4 = (dataclasses.replace(base, num_layers=n) for n in (1, 4))
    # A recipe with another layer count also gets a row at its own depth (the L1 / L4 rows set theirs).
    own = [] if base.num_layers in (1, 4) else [(f"newllm-best-L{base.num_layers}", base, tc, "best", seq)]
    return [
        ("newllm-original-L1", dataclasses.replace(original_model, num_layers=1), None, "original", SEQ),
        ("newllm-original-L4", dataclasses.replace(original_model, num_layers=4), None, "original", SEQ),
        ("newllm-best-L1", L1, tc, "best", seq),
        *own,
        ("newllm-best-L4", L4, tc, "best", seq),
        # Baselines: the same recipe (regularisers, tying, optimiser), sized to New-LLM L4's parameters ...
        ("lstm-best", matched_config(L4, "lstm"), tc, "best", seq),
        # ... and an LSTM the size of New-LLM L1 (the best New-LLM row), for the tightest comparison.
        ("lstm-best-L1size", matched_config(L1, "lstm"), tc, "best", seq),
        ("transformer-best", matched_config(L4, "transformer"), tc, "best", seq),
    ]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(DEFAULT_FILE), help="a WikiText file, a paragraph a line")
    ap.add_argument("--eval-file", help="evaluate on this file instead of the last 10%% of --file")
    ap.add_argument("--vocab", default="1000,10000")
    ap.add_argument("--runs", help="comma-separated subset of run names (default: all)")
    ap.add_argument("--recipe", action="append",
                    help="a preset name or a JSON / TOML override file for the 'best' rows (every family); "
                         "repeat to compare recipes (default: the package's preset for each vocab)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one field of every recipe, e.g. --set model.dropout=0.3")
    ap.add_argument("--original-batch", type=int, default=128,
                    help="original recipe batch (lr follows the original rule)")
    ap.add_argument("--max-epochs", type=int, default=150, help="original recipe cap (patience 30 usually stops it)")
    ap.add_argument("--best-epochs", type=int, default=60, help="epochs (and cosine length) of the other recipes")
    ap.add_argument("--eval-streams", type=int, default=8,
                    help="the evaluation text is read as this many parallel streams (each from a zero state)")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated seeds; each run is repeated per seed and a mean / std table follows")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs in parallel, spread over all visible GPUs (train_s is then not comparable)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "LOG.md"),
                    help="append the table here as a dated entry (RESULTS.md is edited by hand)")
    ap.add_argument("--no-append", action="store_true")
    return ap


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    vocabs = [int(v) for v in args.vocab.split(",")]
    try:  # every recipe is checked before any training starts
        recipes = {V: [(spec, load_recipe(spec, args.set)) for spec in (args.recipe or [default_recipe(V)])]
                   for V in vocabs}
    except ValueError as e:
        ap.error(str(e))
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    jobs = plan_jobs(args, recipes, load_splits(args))
    df = pd.DataFrame(run_jobs(jobs, args, dev, gpus))
    shown = ", ".join(spec for spec, _ in next(iter(recipes.values())))
    header = (f"device: {device_name(dev)} | train {args.file} (first 90% of lines, last 5% of those = dev) | "
              f"eval {'--eval-file ' + args.eval_file if args.eval_file else 'last 10% of lines'} "
              f"as {args.eval_streams} streams | recipe {shown if args.recipe else 'the package preset per vocab'}"
              + "".join(f" --set {s}" for s in args.set) +
              (f" | {args.jobs} runs in parallel on {max(gpus, 1)} device(s)" if args.jobs > 1 else ""))
    print_report(df, header, args)


def plan_jobs(args: argparse.Namespace, recipes: dict, splits: tuple) -> list[tuple]:
    """(name, ModelConfig, TrainConfig, mode, data, seq, extra columns) of every run, per vocabulary and recipe;
    the original recipe's rows run once, whatever --recipe says."""
    train_lines, dev_lines, eval_lines = splits
    several = len(args.recipe or []) > 1
    jobs = []
    for V, vocab_recipes in recipes.items():
        tok = WordTokenizer.train([x for x in train_lines if x.strip()], V)
        data = (tok, train_lines, dev_lines, eval_lines)
        original_rows_done = False
        for spec, recipe in vocab_recipes:
            n = recipe.model.num_layers
            if n != 1 and args.runs and "newllm-best-L1" in args.runs.split(","):
                print(f"note: recipe {spec} has {n} layers; the newllm-best-L1 row trains it with 1 "
                      f"(its own depth is the newllm-best-L{n} row)")
            for name, mc, tc, mode, seq in plan(recipe, tok.vocab_size, args.best_epochs):
                if args.runs and name not in args.runs.split(","):
                    continue
                if mode == "original":  # the original recipe does not depend on --recipe: run it once
                    if original_rows_done and name.startswith("newllm-original"):
                        continue
                    tc = original_recipe(args.original_batch, args.max_epochs)
                jobs.append((name, mc, tc, mode, data, seq, {"recipe": spec} if several and mode != "original" else {}))
            original_rows_done = True
    return jobs


def run_jobs(jobs: list[tuple], args: argparse.Namespace, dev: torch.device, gpus: int) -> list[dict]:
    """Every job once per seed, one after another or --jobs at a time; a run that fails keeps its row with the
    error instead of losing the others. Rows come in the plan's order."""
    rows = []
    with tempfile.TemporaryDirectory() as work:
        seeds = [int(x) for x in args.seeds.split(",")]
        calls = [(name, mc, tc, mode, data, str(dev), work, seq, args.eval_streams,
                  {**extra, **({"seed": sd} if len(seeds) > 1 else {})}, sd)
                 for name, mc, tc, mode, data, seq, extra in jobs for sd in seeds]
        # Two recipes' rows of the same run would share a run folder: give each call its own.
        calls = [c[:6] + (str(Path(work) / str(k)),) + c[7:] for k, c in enumerate(calls)]
        if args.jobs > 1:
            # One worker pool per GPU (each worker sees only its own card), runs dealt out in turn; each row is
            # printed as its run ends (a time limit keeps what finished).
            def show(k, got):
                print(f"{calls[k][0]} FAILED: {type(got).__name__}: {got}" if isinstance(got, BaseException)
                      else got, flush=True)

            got = spread(run_one, calls, args.jobs, on_done=show, gpus=gpus)
            rows = [{"run": c[0], "error": f"{type(r).__name__}: {r}"} if isinstance(r, BaseException) else r
                    for c, r in zip(calls, got)]
        else:
            for c in calls:
                try:
                    rows.append(run_one(*c))
                except Exception as e:  # reported in its row; the other runs go on
                    rows.append({"run": c[0], "error": f"{type(e).__name__}: {e}"})
                print(rows[-1], flush=True)
    return rows


def print_report(df: pd.DataFrame, header: str, args: argparse.Namespace) -> None:
    """Prints the table, the seed summary and the comparison lines, and appends them to --results."""
    print("\n" + header)
    print(df.to_string(index=False))
    summary = seed_summary(df)
    if summary is not None:
        print("\n" + summary.to_string(index=False))
    if len(df) and len(args.recipe or []) <= 1:
        for line in comparison_lines(df):
            print(line)
    if not args.no_append and len(df):
        with open(args.results, "a", encoding="utf-8") as f:
            cmd = "python " + " ".join(sys.argv)
            f.write(f"\n## {time.strftime('%Y-%m-%d')}: quality.py\n\n"
                    f"`{cmd}` | {header}\n\n{_md(df)}\n" + ("" if summary is None else f"\n{_md(summary)}\n"))


def seed_summary(df: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Mean and sample std of eval / dev PPL over seeds, per run and vocab (None without a seed column)."""
    if "seed" not in df.columns or df["seed"].nunique() < 2:
        return None
    keys = ["recipe", "run", "vocab"] if "recipe" in df.columns else ["run", "vocab"]
    g = df.groupby(keys, sort=False, dropna=False)
    out = g.agg(seeds=("seed", "count"), params=("params", "first"), eval_ppl_mean=("eval_ppl", "mean"),
                eval_ppl_std=("eval_ppl", "std"), dev_ppl_mean=("dev_ppl", "mean"), dev_ppl_std=("dev_ppl", "std"))
    return out.round(2).reset_index()


def comparison_lines(df: pd.DataFrame) -> list[str]:
    """Per vocab: the best New-LLM recipe vs the original recipe, and the LSTMs (means over seeds, if several)."""
    lines = []
    for V, g in df.groupby("vocab"):
        ppl = g.groupby("run")["eval_ppl"].mean().round(2)
        if {"newllm-original-L1", "newllm-best-L1"} <= set(ppl.index):
            best = ppl[[r for r in ppl.index if r.startswith("newllm-best")]].min()
            original = ppl[[r for r in ppl.index if r.startswith("newllm-original")]].min()
            line = (f"vocab {V}: best New-LLM recipe {best} vs original recipe {original} "
                    f"({100 * (1 - best / original):.1f}% lower)")
            for lstm in ("lstm-best", "lstm-best-L1size"):
                if lstm in ppl.index:
                    line += f"; {lstm} {ppl[lstm]}"
            lines.append(line)
    return lines


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

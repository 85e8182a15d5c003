"""Quality on real WikiText-2 text: the seed recipe vs this package's recipe, and equal-parameter
LSTM / Transformer baselines, at vocab 1000 and 10000.

Data: the first 90% of the lines of --file train (its last 5% serve as the dev set for early
stopping and best-checkpoint choice); the last 10% (or --eval-file) is the evaluation text, never seen
in training or model selection.

Evaluation (the same tokens for every model): the evaluation lines as one token stream cut into
--eval-streams parallel streams (default 8, each starting from a zero state), every token predicted
once, PPL token-weighted over non-PAD targets (UNK included, BOS never a target). Seed-recipe models
read each paragraph from a zero context (as they were trained); stateful models carry their state
through each article; the Transformer reads windows of its training length.

    python benchmarks/quality.py                         # the full table (GPU recommended)
    python benchmarks/quality.py --grid stage1           # the lr / decay / dropout grid (session 1)
    python benchmarks/quality.py --grid stage2 --jobs 8  # tying, embedding dropout, weight averaging...
    python benchmarks/quality.py --vocab 1000 --runs newllm-best-L1 --max-epochs 2   # a quick look
    python benchmarks/quality.py --vocab 10000 --runs newllm-best-L1,lstm-best-L1size --seeds 0,1,2,3,4 --jobs 10
                                                         # the spread over seeds (mean / std table)
    python benchmarks/quality.py --vocab 10000 --recipe T+wd0.2 --runs newllm-best-L1,lstm-best-L1size --seeds 0,1,2
                                                         # a dev-set candidate, for every family
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from newllm_nb.baselines import build_model, matched_config
from newllm_nb.bench import device_name
from newllm_nb.checkpoint import load_checkpoint
from newllm_nb.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from newllm_nb.data import (
    StreamData,
    WindowData,
    load_wikitext,
    read_text,
    split_lines,
    wikitext_sequences,
    wikitext_stream,
)
from newllm_nb.tokenizer import WordTokenizer
from newllm_nb.trainer import Trainer, evaluate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SEQ = 64  # the seed's WikiText window; inputs are 63 tokens


def seed_recipe(batch: int, max_epochs: int) -> TrainConfig:
    """The seed: Adam, constant lr = 1e-4 * sqrt(batch/32), clip 0.5/1.0/2.0 schedule, patience 30."""
    return TrainConfig(epochs=max_epochs, batch_size=batch, patience=30, show_progress=False)


# A recipe: ModelConfig fields, TrainConfig fields and the BPTT window ("seq", tokens incl. the target shift).
# Session 1's grid (lr x weight decay x dropout x context dropout, RESULTS.md) chose STAGE1; `--grid` then
# measures each addition below on the dev set; BEST (below VARIANTS) is the variant with the lowest dev PPL
# per vocabulary (rounds 1-4 at vocab 1000; rounds 1-3 and 5-8 at vocab 10000; benchmarks/RESULTS.md).
STAGE1 = dict(lr=1e-3, weight_decay=0.01, dropout=0.5, context_dropout=0.3)
VARIANTS = {
    "stage1": {},
    "tie": dict(tie_embeddings=True),
    "tie+edrop": dict(tie_embeddings=True, embed_dropout=0.1),
    "tie+ema": dict(tie_embeddings=True, ema_decay=0.995),
    "tie+edrop+ema": dict(tie_embeddings=True, embed_dropout=0.1, ema_decay=0.995),
    "tie+edrop+ema.999": dict(tie_embeddings=True, embed_dropout=0.1, ema_decay=0.999),
    "tie+edrop+ema+seq128": dict(tie_embeddings=True, embed_dropout=0.1, ema_decay=0.995, seq=128),
    "tie+edrop+ema+wide": dict(tie_embeddings=True, embed_dropout=0.1, ema_decay=0.995, context_dim=384,
                               hidden_dim=768),
    # Second round, around the best of the first (embedding dropout and seq 128 did not help at vocab 1000).
    "tie+ema+wide": dict(tie_embeddings=True, ema_decay=0.995, context_dim=384, hidden_dim=768),
    "tie+ema+wide+drop0.4": dict(tie_embeddings=True, ema_decay=0.995, context_dim=384, hidden_dim=768,
                                 dropout=0.4),
    "tie+ema+wide+batch16": dict(tie_embeddings=True, ema_decay=0.995, context_dim=384, hidden_dim=768, batch=16),
    "tie+ema+lr2e-3": dict(tie_embeddings=True, ema_decay=0.995, lr=2e-3),
    # Third round: batch 16 and lr 2e-3 were each better at vocab 1000; edrop+ema best at vocab 10000.
    "tie+ema+wide+batch16+lr2e-3": dict(tie_embeddings=True, ema_decay=0.995, context_dim=384, hidden_dim=768,
                                        batch=16, lr=2e-3),
    "tie+ema+batch16+lr2e-3": dict(tie_embeddings=True, ema_decay=0.995, batch=16, lr=2e-3),
    "tie+edrop+ema+batch16": dict(tie_embeddings=True, embed_dropout=0.1, ema_decay=0.995, batch=16),
    "edrop+ema": dict(embed_dropout=0.1, ema_decay=0.995),
    "tie+edrop0.2+ema": dict(tie_embeddings=True, embed_dropout=0.2, ema_decay=0.995),
}
# Fourth round (vocab 1000): one change each on top of the third round's best there.
_R3 = VARIANTS["tie+ema+batch16+lr2e-3"]
VARIANTS.update({
    "r3+cdrop0.4": {**_R3, "context_dropout": 0.4},
    "r3+drop0.6": {**_R3, "dropout": 0.6},
    "r3+ema.998": {**_R3, "ema_decay": 0.998},
    "r3+wd0.1": {**_R3, "weight_decay": 0.1},
    "r3+lr3e-3": {**_R3, "lr": 3e-3},
})
# Fifth round (session 3, vocab 10000): dropout off the recurrent path (on the embedding vectors in and the
# features out, where the LSTM has its dropout), the forget gate's initial bias, and where the parameters go
# (embedding vs context), on top of vocab 10000's choice so far (b10) and of b10 with the dropout moved (P).
_B10 = VARIANTS["tie+edrop0.2+ema"]
_P = {**_B10, "dropout": 0.3, "input_dropout": 0.5, "output_dropout": 0.5}
_SHAPES = {"e128": dict(embed_dim=128), "e128+c512+h768": dict(embed_dim=128, context_dim=512, hidden_dim=768),
           "e128+c384+h768": dict(embed_dim=128, context_dim=384, hidden_dim=768),
           "e192+c384": dict(embed_dim=192, context_dim=384), "c384": dict(context_dim=384)}
VARIANTS.update({
    "b10": _B10,
    "b10+in0.5": {**_B10, "input_dropout": 0.5},
    "b10+out0.5": {**_B10, "output_dropout": 0.5},
    "b10+in0.5+out0.5": {**_B10, "input_dropout": 0.5, "output_dropout": 0.5},
    "P": _P,  # = b10+drop0.3+in0.5+out0.5
    "b10+drop0.2+in0.5+out0.5": {**_P, "dropout": 0.2},
    "b10+drop0.1+in0.5+out0.5": {**_P, "dropout": 0.1},
    "b10+drop0.2+in0.5+out0.5+cdrop0.1": {**_P, "dropout": 0.2, "context_dropout": 0.1},
    "b10+drop0.1+in0.5+out0.5+cdrop0": {**_P, "dropout": 0.1, "context_dropout": 0.0},
    "b10+drop0.3+in0.3+out0.5": {**_P, "input_dropout": 0.3},
    "b10+drop0.3+out0.5": {**_P, "input_dropout": None},
    "b10+drop0.3+in0.5+out0.6": {**_P, "output_dropout": 0.6},
    "b10+drop0.2+in0.4+out0.4": {**_P, "dropout": 0.2, "input_dropout": 0.4, "output_dropout": 0.4},
    "b10+fb1": {**_B10, "forget_bias": 1.0},
    "b10+fb2": {**_B10, "forget_bias": 2.0},
    **{f"b10+{k}": {**_B10, **v} for k, v in _SHAPES.items() if k != "e128+c384+h768"},
    "b10+edrop0.3": {**_B10, "embed_dropout": 0.3},
    "b10+wd0.1": {**_B10, "weight_decay": 0.1},
    "b10+batch16+lr2e-3": {**_B10, "batch": 16, "lr": 2e-3},
    "b10+ema.998": {**_B10, "ema_decay": 0.998},
    "b10+lr2e-3": {**_B10, "lr": 2e-3},
    "P+fb1": {**_P, "forget_bias": 1.0},
    "P+fb2": {**_P, "forget_bias": 2.0},
    "P+batch16+lr2e-3": {**_P, "batch": 16, "lr": 2e-3},
    "P+lr2e-3": {**_P, "lr": 2e-3},
    "P+wd0.1": {**_P, "weight_decay": 0.1},
    "P+edrop0.1": {**_P, "embed_dropout": 0.1},
    "P+edrop0.3": {**_P, "embed_dropout": 0.3},
    "P+cdrop0.5": {**_P, "context_dropout": 0.5},
    "P+drop0.4": {**_P, "dropout": 0.4},
    "P+in0.6+out0.6": {**_P, "input_dropout": 0.6, "output_dropout": 0.6},
    "P+L2": {**_P, "num_layers": 2},
    "P+ema.998": {**_P, "ema_decay": 0.998},
    **{f"P+{k}": {**_P, **v} for k, v in _SHAPES.items() if k != "e192+c384"},
})
# Sixth round (vocab 10000): one or two changes each on top of the fifth round's best, P+batch16+lr2e-3 (Q).
_Q = VARIANTS["P+batch16+lr2e-3"]
VARIANTS.update({f"Q+{k}": {**_Q, **v} for k, v in {
    "drop0.2": dict(dropout=0.2), "drop0.4": dict(dropout=0.4), "cdrop0.1": dict(context_dropout=0.1),
    "drop0.2+cdrop0.1": dict(dropout=0.2, context_dropout=0.1),
    "drop0.1+cdrop0": dict(dropout=0.1, context_dropout=0.0),
    "L2": dict(num_layers=2), "L2+drop0.2+cdrop0.1": dict(num_layers=2, dropout=0.2, context_dropout=0.1),
    "edrop0.3": dict(embed_dropout=0.3), "lr3e-3": dict(lr=3e-3), "lr1.5e-3": dict(lr=1.5e-3),
    "wd0.1": dict(weight_decay=0.1), "in0.6+out0.6": dict(input_dropout=0.6, output_dropout=0.6),
    "in0.4+out0.4": dict(input_dropout=0.4, output_dropout=0.4), "c384": dict(context_dim=384),
    "ema.998": dict(ema_decay=0.998), "fb2": dict(forget_bias=2.0), "batch8": dict(batch=8),
}.items()})
# Seventh round (vocab 10000): the sixth round's runners-up on top of its best, Q+batch8 (S).
_S = VARIANTS["Q+batch8"]
VARIANTS.update({f"S+{k}": {**_S, **v} for k, v in {
    "wd0.1": dict(weight_decay=0.1), "lr3e-3": dict(lr=3e-3),
    "drop0.2+cdrop0.1": dict(dropout=0.2, context_dropout=0.1),
    "L2+drop0.2+cdrop0.1": dict(num_layers=2, dropout=0.2, context_dropout=0.1),
    "wd0.1+drop0.2+cdrop0.1": dict(weight_decay=0.1, dropout=0.2, context_dropout=0.1),
    "lr1e-3": dict(lr=1e-3),
}.items()})
# Eighth round (session 4, vocab 10000): one change each on top of the seventh round's best (T).
_T = VARIANTS["S+wd0.1+drop0.2+cdrop0.1"]
VARIANTS.update({f"T+{k}": {**_T, **v} for k, v in {
    "wd0.05": dict(weight_decay=0.05), "wd0.2": dict(weight_decay=0.2), "drop0.1": dict(dropout=0.1),
    "cdrop0": dict(context_dropout=0.0), "out0.6": dict(output_dropout=0.6), "in0.4": dict(input_dropout=0.4),
    "edrop0.1": dict(embed_dropout=0.1), "edrop0.3": dict(embed_dropout=0.3), "seq128": dict(seq=128),
    "L2": dict(num_layers=2), "ema.998": dict(ema_decay=0.998), "lr1.5e-3": dict(lr=1.5e-3),
    # the round's two best on dev, together
    "wd0.2+ema.998": dict(weight_decay=0.2, ema_decay=0.998),
}.items()})
BEST = {1000: {**STAGE1, **VARIANTS["r3+wd0.1"]}, 10000: {**STAGE1, **VARIANTS["T+wd0.2"]}}
MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def best_recipe(max_epochs: int, lr: float = 1e-3, weight_decay: float = 0.01, batch: int = 32,
                ema_decay: float = 0.0) -> TrainConfig:
    return TrainConfig(epochs=max_epochs, batch_size=batch, lr=lr, optimizer="adamw", weight_decay=weight_decay,
                       schedule="cosine", warmup_steps=200, clip=1.0, patience=5, ema_decay=ema_decay,
                       show_progress=False)


def split_recipe(recipe: dict, max_epochs: int) -> tuple[dict, TrainConfig, int]:
    """(ModelConfig overrides, TrainConfig, seq) of a recipe dict."""
    model = {k: v for k, v in recipe.items() if k in MODEL_KEYS}
    train = {k: v for k, v in recipe.items() if k in ("lr", "weight_decay", "ema_decay", "batch")}
    return model, best_recipe(max_epochs, **train), recipe.get("seq", SEQ)


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
    if mode == "seed":
        train = WindowData(wikitext_sequences(train_lines, tok, SEQ))
        dev = WindowData(wikitext_sequences(dev_lines, tok, SEQ))
        ev = StreamData(*wikitext_stream(eval_lines, tok, reset_every_line=True), seq_len=SEQ - 1)
    else:
        train, dev = (StreamData(*wikitext_stream(x, tok), seq_len=seq - 1) for x in (train_lines, dev_lines))
        # The Transformer reads windows of its training length; the recurrent models carry state, so any
        # window length gives them the same predictions (63 keeps evaluation identical across recipes).
        ev_seq = seq if model_cfg.arch == "transformer" else SEQ
        ev = StreamData(*wikitext_stream(eval_lines, tok), seq_len=ev_seq - 1)
    cfg = RunConfig(model_cfg, DataConfig(max_seq_length=seq, mode="windows" if mode == "seed" else "stream"),
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
    return {**(extra or {}), "run": name, "vocab": tok.vocab_size, "params": sum(p.numel() for p in model.parameters()),
            "eval_ppl": round(m["ppl"], 2), "eval_acc_%": round(100 * m["acc"], 2), "eval_tokens": m["tokens"],
            "dev_ppl": round(min(r["val_ppl"] for r in hist), 2),
            "epochs": len(hist), "best_epoch": min(hist, key=lambda r: r["val_loss"])["epoch"],
            "train_s": round(secs, 1), "path": trainer.fast_path_used}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(DEFAULT_FILE), help="a WikiText file, a paragraph a line")
    ap.add_argument("--eval-file", help="evaluate on this file instead of the last 10%% of --file")
    ap.add_argument("--vocab", default="1000,10000")
    ap.add_argument("--runs", help="comma-separated subset of run names (default: all)")
    ap.add_argument("--seed-batch", type=int, default=128, help="seed recipe batch (lr follows the seed rule)")
    ap.add_argument("--max-epochs", type=int, default=150, help="seed recipe cap (patience 30 usually stops it)")
    ap.add_argument("--best-epochs", type=int, default=60, help="epochs (and cosine length) of the other recipes")
    ap.add_argument("--grid", nargs="?", const="stage1", choices=["stage1", "stage2"],
                    help="instead of the table, choose a recipe on the dev set (New-LLM L1, each --vocab): stage1 "
                         "= lr x weight decay x dropout x context dropout; stage2 = the VARIANTS on top of STAGE1")
    ap.add_argument("--variants", help="--grid stage2: comma-separated subset of VARIANTS (default: all)")
    ap.add_argument("--recipe", help="the table's 'best' rows (every family) use this VARIANTS entry instead "
                                     "of BEST, e.g. to compare a dev-set candidate across seeds and families")
    ap.add_argument("--grid-lr", type=float, nargs="+", default=[1e-3], help="learning rates for --grid stage1")
    ap.add_argument("--eval-streams", type=int, default=8,
                    help="the evaluation text is read as this many parallel streams (each from a zero state)")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated seeds; each run is repeated per seed and a mean / std table follows")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs in parallel, spread over all visible GPUs (train_s is then not comparable)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="append the table here")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.recipe and args.recipe not in VARIANTS:
        ap.error(f"--recipe {args.recipe!r} is not in VARIANTS (see --grid stage2 --variants)")
    train_lines, dev_lines, eval_lines = load_splits(args)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    jobs = []  # (name, ModelConfig, TrainConfig, mode, data, seq, extra columns)
    for V in [int(v) for v in args.vocab.split(",")]:
        tok = WordTokenizer.train([x for x in train_lines if x.strip()], V)
        data = (tok, train_lines, dev_lines, eval_lines)
        base = ModelConfig(vocab_size=tok.vocab_size)
        if args.grid == "stage1":
            for lr, wd, dr, cd in itertools.product(args.grid_lr, [0.01, 0.1], [0.3, 0.5], [0.1, 0.3]):
                mc = dataclasses.replace(base, num_layers=1, dropout=dr, context_dropout=cd)
                jobs.append((f"lr{lr:g}-wd{wd:g}-drop{dr:g}-cdrop{cd:g}", mc, best_recipe(args.best_epochs, lr, wd),
                             "best", data, SEQ, {"lr": lr, "weight_decay": wd, "dropout": dr, "context_dropout": cd}))
        elif args.grid == "stage2":
            for name, var in VARIANTS.items():
                if args.variants and name not in args.variants.split(","):
                    continue
                m, tc, seq = split_recipe({**STAGE1, **var}, args.best_epochs)
                jobs.append((name, dataclasses.replace(base, **{"num_layers": 1, **m}), tc, "best", data, seq, {}))
        else:
            recipe = {**STAGE1, **VARIANTS[args.recipe]} if args.recipe else BEST.get(V, BEST[1000])
            m, tc, seq = split_recipe(recipe, args.best_epochs)
            plan = [
                ("newllm-seed-L1", dataclasses.replace(base, num_layers=1), "seed"),
                ("newllm-seed-L4", dataclasses.replace(base, num_layers=4), "seed"),
                ("newllm-best-L1", dataclasses.replace(base, **{**m, "num_layers": 1}), "best"),
                ("newllm-best-L4", dataclasses.replace(base, **{**m, "num_layers": 4}), "best"),
                # Baselines: the same recipe (regularisers, tying, optimiser), sized to New-LLM L4's parameters.
                ("lstm-best", matched_config(dataclasses.replace(base, **{**m, "num_layers": 4}), "lstm"), "best"),
                # ... and an LSTM the size of New-LLM L1 (the best New-LLM row), for the tightest comparison.
                ("lstm-best-L1size", matched_config(dataclasses.replace(base, **{**m, "num_layers": 1}), "lstm"),
                 "best"),
                ("transformer-best", matched_config(dataclasses.replace(base, **{**m, "num_layers": 4}),
                                                    "transformer"), "best"),
            ]
            for name, mc, mode in plan:
                if args.runs and name not in args.runs.split(","):
                    continue
                jobs.append((name, mc, seed_recipe(args.seed_batch, args.max_epochs) if mode == "seed" else tc,
                             mode, data, SEQ if mode == "seed" else seq, {}))
    rows = []
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    with tempfile.TemporaryDirectory() as work:
        seeds = [int(x) for x in args.seeds.split(",")]
        calls = [(name, mc, tc, mode, data, str(dev), work, seq, args.eval_streams,
                  {**extra, **({"seed": sd} if len(seeds) > 1 else {})}, sd)
                 for name, mc, tc, mode, data, seq, extra in jobs for sd in seeds]
        if args.jobs > 1:
            import multiprocessing as mp

            # One pool per GPU (each worker sees only its own card), runs dealt out in turn.
            pools = [ProcessPoolExecutor(-(-args.jobs // max(gpus, 1)), mp_context=mp.get_context("spawn"),
                                         initializer=_only_gpu, initargs=(g if gpus > 1 else None,))
                     for g in range(max(gpus, 1))]
            try:
                futures = [pools[k % len(pools)].submit(run_one, *c) for k, c in enumerate(calls)]
                for f in as_completed(futures):  # print each as it ends (a time limit keeps what finished)
                    print(f.result(), flush=True)
            finally:
                for pool in pools:
                    pool.shutdown()
            rows = [f.result() for f in futures]  # the plan's order
        else:
            for c in calls:
                rows.append(run_one(*c))
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    header = (f"device: {device_name(dev)} | train {args.file} (first 90% of lines, last 5% of those = dev) | "
              f"eval {'--eval-file ' + args.eval_file if args.eval_file else 'last 10% of lines'} "
              f"as {args.eval_streams} streams" + (f" | recipe {args.recipe}" if args.recipe else "") +
              (f" | {args.jobs} runs in parallel on {max(gpus, 1)} device(s)" if args.jobs > 1 else ""))
    print("\n" + header)
    print(df.to_string(index=False))
    summary = seed_summary(df)
    if summary is not None:
        print("\n" + summary.to_string(index=False))
    if not args.grid and len(df):
        for line in comparison_lines(df):
            print(line)
    if not args.no_append and len(df):
        with open(args.results, "a", encoding="utf-8") as f:
            cmd = "python " + " ".join(sys.argv)
            f.write(f"\n### quality.py{' --grid ' + args.grid if args.grid else ''} ({time.strftime('%Y-%m-%d')})\n\n"
                    f"`{cmd}` | {header}\n\n{_md(df)}\n" + ("" if summary is None else f"\n{_md(summary)}\n"))


def seed_summary(df: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Mean and sample std of eval / dev PPL over seeds, per run and vocab (None without a seed column)."""
    if "seed" not in df.columns or df["seed"].nunique() < 2:
        return None
    g = df.groupby(["run", "vocab"], sort=False)
    out = g.agg(seeds=("seed", "count"), params=("params", "first"), eval_ppl_mean=("eval_ppl", "mean"),
                eval_ppl_std=("eval_ppl", "std"), dev_ppl_mean=("dev_ppl", "mean"), dev_ppl_std=("dev_ppl", "std"))
    return out.round(2).reset_index()


def comparison_lines(df: pd.DataFrame) -> list[str]:
    """Per vocab: the best New-LLM recipe vs the seed recipe, and the LSTMs (means over seeds, if several)."""
    lines = []
    for V, g in df.groupby("vocab"):
        ppl = g.groupby("run")["eval_ppl"].mean().round(2)
        if {"newllm-seed-L1", "newllm-best-L1"} <= set(ppl.index):
            best = ppl[[r for r in ppl.index if r.startswith("newllm-best")]].min()
            seed = ppl[[r for r in ppl.index if r.startswith("newllm-seed")]].min()
            line = f"vocab {V}: best New-LLM recipe {best} vs seed recipe {seed} ({100 * (1 - best / seed):.1f}% lower)"
            for lstm in ("lstm-best", "lstm-best-L1size"):
                if lstm in ppl.index:
                    line += f"; {lstm} {ppl[lstm]}"
            lines.append(line)
    return lines


def _only_gpu(gpu: Optional[int]) -> None:
    """Worker initializer: show this process one GPU (before CUDA starts in it)."""
    if gpu is not None:
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

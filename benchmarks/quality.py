"""Quality on real WikiText-2 text: the seed recipe vs this package's recipe, and equal-parameter
LSTM / Transformer baselines, at vocab 1000 and 10000.

Data: the first 90% of the lines of --file train (its last 5% serve as the dev set for early
stopping and best-checkpoint choice); the last 10% (or --eval-file) is the evaluation text, never seen
in training or model selection.

Evaluation (the same tokens for every model): the evaluation lines as one stream, every token
predicted once, PPL token-weighted over non-PAD targets (UNK included, BOS never a target).
Seed-recipe models read each paragraph from a zero context (as they were trained); stateful models
carry their state through each article; the Transformer reads 63-token windows (its training length).

    python benchmarks/quality.py                         # the full table (GPU recommended)
    python benchmarks/quality.py --grid                  # the recipe grid that chose the defaults
    python benchmarks/quality.py --vocab 1000 --runs newllm-best-L1 --max-epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

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


# Chosen by `--grid` on the dev set (see benchmarks/RESULTS.md), per vocabulary size:
# stateful BPTT + AdamW + warm-up/cosine + norm clipping, and this regularisation.
BEST = {1000: dict(lr=1e-3, weight_decay=0.01, dropout=0.5, context_dropout=0.3),
        10000: dict(lr=1e-3, weight_decay=0.01, dropout=0.5, context_dropout=0.3)}


def best_recipe(max_epochs: int, lr: float = 1e-3, weight_decay: float = 0.01, batch: int = 32) -> TrainConfig:
    return TrainConfig(epochs=max_epochs, batch_size=batch, lr=lr, optimizer="adamw", weight_decay=weight_decay,
                       schedule="cosine", warmup_steps=200, clip=1.0, patience=5, show_progress=False)


def load_splits(args) -> tuple[list, list, list]:
    if args.eval_file:
        train_all = read_text(args.file).splitlines()
        eval_lines = read_text(args.eval_file).splitlines()
    else:
        sp = load_wikitext(args.file)
        train_all, eval_lines = sp.train, sp.valid
    train, dev = split_lines(train_all, 0.95)
    return train, dev, eval_lines


def run_one(name, model_cfg, train_cfg, mode, data, device, workdir) -> dict:
    tok, train_lines, dev_lines, eval_lines = data
    if mode == "seed":
        train = WindowData(wikitext_sequences(train_lines, tok, SEQ))
        dev = WindowData(wikitext_sequences(dev_lines, tok, SEQ))
        ev = StreamData(*wikitext_stream(eval_lines, tok, reset_every_line=True), seq_len=SEQ - 1)
    else:
        train, dev = (StreamData(*wikitext_stream(x, tok), seq_len=SEQ - 1) for x in (train_lines, dev_lines))
        ev = StreamData(*wikitext_stream(eval_lines, tok), seq_len=SEQ - 1)
    cfg = RunConfig(model_cfg, DataConfig(max_seq_length=SEQ, mode="windows" if mode == "seed" else "stream"),
                    dataclasses.replace(train_cfg, device=device))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    run_dir = Path(workdir) / name
    t0 = time.perf_counter()
    trainer = Trainer(model, train, dev, cfg, tok, run_dir)
    hist = trainer.fit(resume=False)
    secs = time.perf_counter() - t0
    load_checkpoint(trainer.best_path).load_into(trainer.model)
    m = evaluate(trainer.model, ev, 256, trainer.device, trainer.precision)
    return {"run": name, "vocab": tok.vocab_size, "params": sum(p.numel() for p in model.parameters()),
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
    ap.add_argument("--best-epochs", type=int, default=40)
    ap.add_argument("--grid", action="store_true", help="run the recipe grid (New-LLM L1, each --vocab) instead")
    ap.add_argument("--grid-lr", type=float, nargs="+", default=[1e-3], help="learning rates for --grid")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="append the table here")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    train_lines, dev_lines, eval_lines = load_splits(args)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        if args.grid:  # choose by dev_ppl (the eval text plays no part in the choice)
            for V in [int(v) for v in args.vocab.split(",")]:
                tok = WordTokenizer.train([x for x in train_lines if x.strip()], V)
                data = (tok, train_lines, dev_lines, eval_lines)
                for lr, wd, dr, cd in itertools.product(args.grid_lr, [0.01, 0.1], [0.3, 0.5], [0.1, 0.3]):
                    mc = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, dropout=dr, context_dropout=cd)
                    name = f"lr{lr:g}-wd{wd:g}-drop{dr:g}-cdrop{cd:g}"
                    r = run_one(name, mc, best_recipe(args.best_epochs, lr, wd), "best", data, str(dev), work)
                    rows.append({**r, "lr": lr, "weight_decay": wd, "dropout": dr, "context_dropout": cd})
                    print(rows[-1], flush=True)
        else:
            for V in [int(v) for v in args.vocab.split(",")]:
                tok = WordTokenizer.train([x for x in train_lines if x.strip()], V)
                data = (tok, train_lines, dev_lines, eval_lines)
                base = ModelConfig(vocab_size=tok.vocab_size)
                best = BEST.get(V, BEST[1000])
                best_m = dict(dropout=best["dropout"], context_dropout=best["context_dropout"])
                plan = [
                    ("newllm-seed-L1", dataclasses.replace(base, num_layers=1), "seed"),
                    ("newllm-seed-L4", dataclasses.replace(base, num_layers=4), "seed"),
                    ("newllm-best-L1", dataclasses.replace(base, num_layers=1, **best_m), "best"),
                    ("newllm-best-L4", dataclasses.replace(base, num_layers=4, **best_m), "best"),
                    ("lstm-best", matched_config(dataclasses.replace(base, num_layers=4), "lstm"), "best"),
                    ("transformer-best", matched_config(dataclasses.replace(base, num_layers=4), "transformer"),
                     "best"),
                ]
                for name, mc, mode in plan:
                    if args.runs and name not in args.runs.split(","):
                        continue
                    tc = seed_recipe(args.seed_batch, args.max_epochs) if mode == "seed" else \
                        best_recipe(args.best_epochs, best["lr"], best["weight_decay"])
                    rows.append(run_one(f"{name}", mc, tc, mode, data, str(dev), work))
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    header = (f"device: {device_name(dev)} | train {args.file} (first 90% of lines, last 5% of those = dev) | "
              f"eval {'--eval-file ' + args.eval_file if args.eval_file else 'last 10% of lines'}")
    print("\n" + header)
    print(df.to_string(index=False))
    if not args.grid and len(df):
        for V, g in df.groupby("vocab"):
            g = g.set_index("run")
            if {"newllm-seed-L1", "newllm-best-L1"} <= set(g.index):
                best = g.loc[[r for r in g.index if r.startswith("newllm-best")], "eval_ppl"].min()
                seed = g.loc[[r for r in g.index if r.startswith("newllm-seed")], "eval_ppl"].min()
                line = (f"vocab {V}: best New-LLM recipe {best} vs seed recipe {seed} "
                        f"({100 * (1 - best / seed):.1f}% lower)")
                if "lstm-best" in g.index:
                    line += f"; LSTM {g.loc['lstm-best', 'eval_ppl']}"
                print(line)
    if not args.no_append and len(df):
        with open(args.results, "a", encoding="utf-8") as f:
            cmd = "python " + " ".join(sys.argv)
            f.write(f"\n### quality.py{' --grid' if args.grid else ''} ({time.strftime('%Y-%m-%d')})\n\n"
                    f"`{cmd}` | {header}\n\n{_md(df)}\n")


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

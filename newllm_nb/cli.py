"""python -m newllm_nb train --dataset wikitext|dolly [--preset P] [--layers N] ..."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from .baselines import matched_config
from .checkpoint import CheckpointError
from .config import PRESETS, RunConfig, apply_overrides, is_smoke, preset, shrink_for_smoke
from .experiment import run_experiment
from .hardware import detect, recommend
from .sources import DataError

# flag -> config field it sets (None: not given, so the preset's value stands)
FLAG_FIELDS = {"layers": "model__num_layers", "epochs": "train__epochs", "lr": "train__lr",
               "seq_len": "data__max_seq_length", "vocab_size": "model__vocab_size", "patience": "train__patience",
               "precision": "train__precision", "tokenizer": "data__tokenizer", "mode": "data__mode",
               "data_path": "data__path", "device": "train__device"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m newllm_nb", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train New-LLM (or a baseline) and print validation loss / PPL / accuracy")
    t.add_argument("--dataset", choices=["wikitext", "dolly"], default="wikitext")
    t.add_argument("--preset", choices=sorted(PRESETS), help="default: seed_wikitext or seed_dolly")
    t.add_argument("--layers", type=int, help="FNN layers")
    t.add_argument("--arch", choices=["newllm", "lstm", "transformer"], help="baselines are sized to match")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="default: this machine's recommendation")
    t.add_argument("--lr", type=float, help="default: 1e-4 * sqrt(batch / 32)")
    t.add_argument("--seq-len", type=int, help="max_seq_length")
    t.add_argument("--vocab-size", type=int)
    t.add_argument("--patience", type=int)
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    t.add_argument("--tokenizer", choices=["word", "bpe"])
    t.add_argument("--mode", choices=["windows", "stream", "packed"])
    t.add_argument("--data-path", help="local WikiText file/folder or Dolly jsonl (default: hub, else bundled sample)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--run-dir", help="checkpoints go here; an unfinished run there is resumed (default runs/NAME)")
    t.add_argument("--no-resume", action="store_true", help="start over even if --run-dir holds a run")
    t.add_argument("--seed-compatible", action="store_true", help="average metrics per batch, as the seed did")
    t.add_argument("--smoke", action="store_true", help="tiny data and at most 2 epochs (also NEWLLM_SMOKE=1)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace, recommended_batch: int) -> RunConfig:
    """The RunConfig the flags describe: the preset, then every given flag, then baseline sizing and smoke mode."""
    name = args.preset or f"seed_{args.dataset}"
    ov = {"data__dataset": args.dataset}
    # The seed's presets tie batch to the GPU (its table); other presets keep the batch they were measured with.
    if args.batch_size is not None:
        ov["train__batch_size"] = args.batch_size
    elif name.startswith("seed_"):
        ov["train__batch_size"] = recommended_batch
    for flag, key in FLAG_FIELDS.items():
        if getattr(args, flag) is not None:
            ov[key] = getattr(args, flag)
    if args.seed_compatible:
        ov["train__seed_compatible"] = True
    if args.quiet:
        ov["train__show_progress"] = False
    cfg = apply_overrides(preset(name), **ov)
    if args.arch and args.arch != "newllm":
        cfg = apply_overrides(cfg, **{f"model__{k}": v for k, v in vars(matched_config(cfg.model, args.arch)).items()})
    return shrink_for_smoke(cfg) if args.smoke or is_smoke() else cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _train(args)
    except (ValueError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    info = detect(args.device if args.device not in (None, "auto") else None)
    cfg = config_from_args(args, recommend(info).batch_size)
    name = f"{args.dataset}-{cfg.model.arch}-L{cfg.model.num_layers}"
    run_dir = args.run_dir or f"runs/{name}"
    print(f"device: {info.name} ({info.kind}) | batch {cfg.train.batch_size} | lr {cfg.train.effective_lr:.2e} | "
          f"layers {cfg.model.num_layers} | run dir {run_dir}")
    res = run_experiment(cfg, run_dir, resume=not args.no_resume)
    m = res.metrics
    last = res.history[-1] if res.history else {}
    print(f"\nfinal ({'per-batch mean, seed-compatible' if cfg.train.seed_compatible else 'token-weighted, non-PAD'}"
          f" validation, best epoch): loss {m['loss']:.4f} | PPL {m['ppl']:.2f} | accuracy {100 * m['acc']:.1f}% | "
          f"params {res.params:,} | epochs {last.get('epoch', 0)} | {res.seconds:.0f}s")
    print(f"checkpoint: {res.best_path}")
    return 0

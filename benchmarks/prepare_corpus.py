"""Tokenize a text file once into the token cache, and say how fast and how big.

    python benchmarks/prepare_corpus.py --file FILE [--tokenizer word|bpe] [--vocab-size 1000] [--cache DIR]

prints one table row: MB/s over the whole preparation (the tokenizer's training pass and the encoding
pass), tokens, the cache entries' size on disk and the peak RSS of this process and of its worker
processes. A second call on the same file finds the cache and says it reused it.

``--epoch`` also trains one epoch on the file's training split twice in this one run, from the lists
the package built before the token cache (``load_wikitext`` + ``wikitext_sequences`` / ``_stream``) and
from the memory map (``TokenWindows`` / ``TokenStream``), and prints both times with the device.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from newllm_nb.data.corpus import open_corpus  # noqa: E402
from newllm_nb.data.token_cache import cache_root, default_workers, prepare_tokens  # noqa: E402


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: kilobytes


def prepare(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    corpus = open_corpus(args.file)
    res = prepare_tokens(corpus, args.tokenizer, args.vocab_size, args.cache, workers=args.workers,
                         show_progress=not args.quiet)
    secs = time.perf_counter() - t0
    size = os.path.getsize(args.file)
    return {"file": Path(args.file).name, "MB": round(size / 1e6, 1), "tokenizer": args.tokenizer,
            "cache": "reused" if not res.built else "built", "seconds": round(secs, 2),
            "MB/s": round(size / 1e6 / secs, 1), "tokenizer s": round(res.tokenizer_seconds, 2),
            "encode MB/s": round(res.source_bytes / 1e6 / max(1e-9, res.seconds - res.tokenizer_seconds), 1)
            if res.built else None, "tokens": sum(len(t) for t in res.splits.values()),
            "dtype": next(iter(res.splits.values())).meta["dtype"],
            "cache MB": round(sum(t.nbytes for t in res.splits.values()) / 1e6, 1),
            "peak RSS MB": round(peak_rss_mb(resource.RUSAGE_SELF)),
            "worker peak RSS MB": round(peak_rss_mb(resource.RUSAGE_CHILDREN)), "workers": args.workers,
            "_res": res}


def epoch_times(args: argparse.Namespace, res) -> list:
    """One training epoch from the lists and one from the memory map, same model, same batches."""
    import torch

    from newllm_nb import preset
    from newllm_nb.config import apply_overrides
    from newllm_nb.data.batching import StreamData, WindowData, wikitext_sequences, wikitext_stream
    from newllm_nb.data.sources import load_wikitext
    from newllm_nb.data.token_data import TokenStream, TokenWindows
    from newllm_nb.models.build import build_model
    from newllm_nb.runtime.hardware import detect
    from newllm_nb.train.trainer import Trainer

    tok = res.tokenizer
    cfg = preset(args.epoch_preset)
    cfg = apply_overrides(cfg, model__vocab_size=tok.vocab_size, train__epochs=1, train__show_progress=False,
                          train__device=args.device, data__mode=args.mode,
                          **({"train__batch_size": args.batch_size} if args.batch_size else {}))
    S = cfg.data.max_seq_length
    rows = []
    for trial in range(args.trials):
        for source in ("lists", "memory map") if trial % 2 == 0 else ("memory map", "lists"):
            t0 = time.perf_counter()
            if source == "lists":
                sp = load_wikitext(args.file)
                if args.mode == "windows":
                    train, valid = (WindowData(wikitext_sequences(s, tok, S)) for s in (sp.train, sp.valid))
                else:
                    train, valid = (StreamData(*wikitext_stream(s, tok, True), seq_len=S - 1)
                                    for s in (sp.train, sp.valid))
            else:
                if args.mode == "windows":
                    train, valid = (TokenWindows(res.splits[s], S) for s in ("train", "valid"))
                else:
                    train, valid = (TokenStream(res.splits[s], S - 1) for s in ("train", "valid"))
            t_data = time.perf_counter() - t0
            torch.manual_seed(0)
            trainer = Trainer(build_model(cfg.model), train, valid, cfg, tok, None)
            t1 = time.perf_counter()
            hist = trainer.fit(resume=False)
            t_fit = time.perf_counter() - t1
            rows.append({"trial": trial + 1, "batches from": source, "mode": args.mode, "preset": args.epoch_preset,
                         "batch": cfg.train.batch_size, "device": detect(args.device if args.device != "auto"
                                                                         else None).name,
                         "data s": round(t_data, 2), "epoch s (train+valid)": round(t_fit, 2),
                         "val loss": round(hist[-1]["val_loss"], 4) if hist and "val_loss" in hist[-1] else None})
    return rows


def build_file(path: str, source: str, mb: int, seed: int = 0) -> None:
    """``mb`` MB of ``source``'s lines, repeated, each repetition shuffled (the benchmark's corpora)."""
    import random

    lines = Path(source).read_text(encoding="utf-8").splitlines()
    rng, n = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as f:
        while n < mb * 1_000_000:
            rng.shuffle(lines)
            block = "\n".join(lines) + "\n"
            f.write(block)
            n += len(block.encode("utf-8"))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "cpu") if os.path.exists("/proc/cpuinfo") else "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {cores} cores usable, load average {load:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", required=True)
    p.add_argument("--build-from", help="first write --file: --build-mb MB of this file's lines, shuffled")
    p.add_argument("--build-mb", type=int, default=100)
    p.add_argument("--tokenizer", choices=["word", "bpe"], default="word")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--cache", help=f"cache folder (default {cache_root()})")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--epoch", action="store_true", help="also time a training epoch: lists vs memory map")
    p.add_argument("--epoch-preset", default="original_wikitext")
    p.add_argument("--mode", choices=["windows", "stream"], default="windows")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--trials", type=int, default=2)
    args = p.parse_args()
    if args.build_from:
        build_file(args.file, args.build_from, args.build_mb)
    print(f"machine: {machine()}")
    row = prepare(args)
    res = row.pop("_res")
    print(" | ".join(row))
    print(" | ".join(str(v) for v in row.values()))
    print(f"cache {'reused: no tokenizing' if not res.built else 'built'}: "
          f"{', '.join(str(t.path) for t in res.splits.values())}")
    if args.epoch:
        import pandas as pd

        print(pd.DataFrame(epoch_times(args, res)).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

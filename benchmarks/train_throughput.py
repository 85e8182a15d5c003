"""Training throughput: the seed's per-token loop vs this package's eager and fast paths, cuDNN LSTM
and a causal Transformer of about equal parameters. Whole training steps (forward, backward, clip,
Adam), random tokens, median of --steps steps after warm-up.

    python benchmarks/train_throughput.py                 # B=2048, both configs, on the GPU if present
    python benchmarks/train_throughput.py --batch 64 --steps 5 --rounds 3   # CPU: variants interleaved 3 times

Off CUDA the package's eager step runs the hand-written BPTT (``package eager + BPTT``); ``package eager
(hoisted)`` is the same step with autograd through the time loop (``fast_path="off"``). ``--rounds N`` times
every variant N times in turn (A B C, A B C, ...) and reports the median of its rounds: on a shared machine the
load then falls on all variants alike.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from newllm_nb import ModelConfig
from newllm_nb.baselines import build_model, matched_config
from newllm_nb.bench import probe_throughput

from seed_loop import SeedLoop

CONFIGS = {"L1-T127": (1, 127), "L4-T63": (4, 63)}  # Dolly and WikiText configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="also time the fast path with a torch.compile'd cell")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--only", help="comma-separated substrings: time only the variants whose label contains one")
    ap.add_argument("--rounds", type=int, default=1, help="time every variant this many times, interleaved")
    ap.add_argument("--csv", help="write the table here too")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    rows = []
    for name in args.configs.split(","):
        layers, T = CONFIGS[name]
        cfg = ModelConfig(num_layers=layers)
        variants = [("seed per-token loop", cfg, dict(fast_path="off", model=SeedLoop(build_model(cfg)))),
                    ("package eager (hoisted)", cfg, dict(fast_path="off"))]
        if not cuda:
            variants.append(("package eager + BPTT", cfg, dict(fast_path="auto", device="cpu")))
        if cuda:
            variants.append(("fast path: CUDA graph, autograd", cfg, dict(fast_path="graph-autograd")))
            variants.append(("package fast path (graph + BPTT)", cfg, dict(fast_path="graph")))
            variants.append(("fused Triton recurrence (graph)", cfg, dict(fast_path="fused")))
            if args.compile:
                variants.append(("fast path + compiled cell", cfg, dict(fast_path="compile")))
        variants += [("cuDNN LSTM, equal params", matched_config(cfg, "lstm"), dict(fast_path="off")),
                     ("causal Transformer, equal params", matched_config(cfg, "transformer"), dict(fast_path="off"))]
        if args.only:
            variants = [v for v in variants if any(s.strip() in v[0] for s in args.only.split(","))]
        base_ms = None
        runs: dict = {}
        for rnd in range(args.rounds):
            for label, mcfg, kw in variants:
                t0 = time.perf_counter()
                r = probe_throughput(mcfg, args.batch, T, steps=args.steps, precision=args.precision, **kw)
                runs.setdefault(label, []).append(r)
                print(f"{name:8s} round {rnd + 1}/{args.rounds} {label:34s} {r['step_ms']:9.2f} ms  "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
        for label, _, _ in variants:
            rs = sorted(runs[label], key=lambda r: r["step_ms"])
            r = rs[len(rs) // 2]  # the median round
            if label == "seed per-token loop":  # the speed-up column needs the seed row (absent with --only)
                base_ms = r["step_ms"]
            rows.append({"config": name, "variant": label, "params": r["params"], "path": r["path"],
                         "step_ms": round(r["step_ms"], 2), "tokens_per_s": round(r["tokens_per_s"]),
                         "warmup_s": round(r["warmup_s"], 2),
                         "peak_mem_gb": None if r["peak_mem_gb"] is None else round(r["peak_mem_gb"], 2),
                         "speedup_vs_seed": round(base_ms / r["step_ms"], 2) if base_ms else None,
                         "precision": r["precision"],
                         "device": r["device"]})
    df = pd.DataFrame(rows)
    print()
    print(f"device: {rows[0]['device']} | batch {args.batch} | precision {rows[0]['precision']} | "
          f"median of {args.steps} steps" + (f", median of {args.rounds} interleaved rounds" * (args.rounds > 1)))
    shown = df.drop(columns=["device"])
    print(shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False))
    fast = df[df.variant.str.startswith("package fast path") & df.speedup_vs_seed.notna()]
    if len(fast):
        met = int((fast.speedup_vs_seed >= 3).sum())
        ratios = ", ".join(f"{c} {s}x" for c, s in zip(fast.config, fast.speedup_vs_seed))
        print(f"\nsummary: fast path vs seed loop = {ratios} -> >= 3x in {met} of {len(fast)} config(s)")
    for name in df.config.unique():  # the target: the fused step at or below cuDNN's LSTM
        ms = dict(zip(df[df.config == name].variant, df[df.config == name].step_ms))
        lstm = ms.get("cuDNN LSTM, equal params")
        for label in ("fused Triton recurrence (graph)", "package eager + BPTT"):
            if ms.get(label) and lstm:
                print(f"summary: {name} {label} {ms[label]} ms vs LSTM {lstm} ms -> LSTM/New-LLM = "
                      f"{lstm / ms[label]:.2f}x")
    if args.csv:
        df.to_csv(args.csv, index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()

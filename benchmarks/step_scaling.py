"""Training step time against batch size and against FNN depth: New-LLM (the original cell and the plus cell,
each on this device's default path: the fused Triton kernels on a GPU that runs them) against the LSTM of equal
parameters. Whole training steps (forward, backward, clip, Adam) on random tokens, median of --steps.

    python benchmarks/step_scaling.py                                  # the batch and the depth sweep, a plot
    python benchmarks/step_scaling.py --batches 8,64 --layers 1 --steps 2   # a quick CPU look
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import pandas as pd

from newllm_nb import ModelConfig
from newllm_nb.config import PLUS_CELL
from newllm_nb.experiments.bench import probe_throughput
from newllm_nb.models.build import matched_config

from figures import save, subplots


def models(layers: int) -> list[tuple[str, ModelConfig]]:
    base = ModelConfig(num_layers=layers)
    return [("New-LLM (original cell)", base), ("New-LLM (plus cell)", dataclasses.replace(base, **PLUS_CELL)),
            ("LSTM, equal params", matched_config(base, "lstm"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,16,32,64,128,256,512,1024,2048,4096")
    ap.add_argument("--batch-layers", type=int, default=1, help="FNN layers of the batch sweep")
    ap.add_argument("--layers", default="1,2,3,4,5,6,7")
    ap.add_argument("--layer-batch", type=int, default=2048, help="batch of the depth sweep")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    sweeps = [("batch", int(b), args.batch_layers) for b in args.batches.split(",")] + \
             [("layers", args.layer_batch, int(n)) for n in args.layers.split(",")]
    for sweep, B, L in sweeps:
        for name, cfg in models(L):
            r = probe_throughput(cfg, B, args.seq_len, steps=args.steps)
            rows.append({"sweep": sweep, "model": name, "batch": B, "layers": L, "seq_len": args.seq_len,
                         "path": r["path"], "params": r["params"], "step_ms": round(r["step_ms"], 3),
                         "tokens_per_s": round(r["tokens_per_s"]), "precision": r["precision"], "device": r["device"]})
            print(f"{sweep:6s} B{B:<5d} L{L} {name:24s} {r['step_ms']:9.3f} ms  path {r['path']}", flush=True)
    df = pd.DataFrame(rows)
    dev = df.device[0]
    print(f"\ndevice: {dev} | precision {df.precision[0]} | seq_len {args.seq_len} | median of {args.steps} steps")
    print(df.drop(columns=["device", "precision", "seq_len"]).to_string(index=False))
    for sweep, key in (("batch", "batch"), ("layers", "layers")):
        piv = df[df.sweep == sweep].pivot(index=key, columns="model", values="step_ms")
        lstm = piv.pop("LSTM, equal params")
        print(f"\nLSTM / New-LLM step time against {key} (> 1: New-LLM faster)")
        print((1 / piv).mul(lstm, axis=0).round(2).to_string())
    os.makedirs(args.out_dir, exist_ok=True)
    csv = os.path.join(args.out_dir, "step_scaling.csv")
    df.to_csv(csv, index=False)
    fig, (a, b) = subplots(1, 2, figsize=(11, 4))
    for ax, sweep, key in ((a, "batch", "batch"), (b, "layers", "layers")):
        for name, g in df[df.sweep == sweep].groupby("model"):
            ax.plot(g[key], g.step_ms, "o-", label=name)
        ax.set_xlabel(key if key == "layers" else "batch (sequences)")
        ax.set_ylabel("training step (ms)")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_title(f"{args.batch_layers} layer(s), T={args.seq_len}")
    b.set_title(f"batch {args.layer_batch}, T={args.seq_len}")
    fig.suptitle(f"Training step time on {dev} ({df.precision[0]})")
    png = save(fig, (a, b), os.path.join(args.out_dir, "step_scaling.png"))
    print(f"wrote {csv} and {png}")


if __name__ == "__main__":
    main()

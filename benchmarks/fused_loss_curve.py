"""The first training steps of a real WikiText run on the fused Triton path vs the CUDA-graph path (hand-written
BPTT), same preset, seed and data order; one plot overlaying the two loss curves.

Both paths compute the same function but draw their dropout masks from different random streams (the fused
kernels from Philox inside the kernel), so the curves agree in distribution, not bit for bit: the script
prints the mean loss of each over the last 100 steps and the mean absolute gap between their smoothed curves.

    python benchmarks/fused_loss_curve.py --file ../shared/data/wikitext-2/valid.txt   # on a CUDA GPU
    python benchmarks/fused_loss_curve.py --from-csv benchmarks/results/fused_vs_graph_loss.csv --device "NVIDIA H100"
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch

from newllm_nb import preset
from newllm_nb.data import prepare
from newllm_nb.experiments.bench import device_name
from newllm_nb.models.build import build_model
from newllm_nb.train.trainer import Trainer

from figures import save, subplots

ROOT = Path(__file__).resolve().parents[1]


class _Enough(Exception):
    """Raised from the step callback once enough steps ran."""


def run(file: str, preset_name: str, fast_path: str, steps: int, seed: int) -> tuple[list[float], str, float]:
    cfg = preset(preset_name, data__path=file, train__fast_path=fast_path, train__show_progress=False,
                 train__seed=seed, train__epochs=1000, train__patience=1000)
    data = prepare(cfg.data, cfg.model.vocab_size)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    losses: list[float] = []

    def on_step(rec: dict) -> None:
        losses.append(float(rec["loss"]))
        if len(losses) >= steps:
            raise _Enough

    t = Trainer(model, data.train, data.valid, cfg, tokenizer=data.tokenizer, step_callbacks=[on_step])
    t0 = time.perf_counter()
    try:
        t.fit(resume=False)
    except _Enough:
        pass
    return losses, getattr(t.step, "used", fast_path), time.perf_counter() - t0


def smooth(xs: list[float], k: int = 20) -> pd.Series:
    return pd.Series(xs).rolling(k, min_periods=1).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"),
                    help="WikiText text (first 90%% of lines train)")
    ap.add_argument("--preset", default="best_wikitext", help="the package preset to train")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", default="graph,fused", help="two TrainConfig.fast_path values to overlay")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--from-csv", help="redraw the plot from a CSV this script wrote (no training)")
    ap.add_argument("--device", help="device name for the title (default: this machine's)")
    args = ap.parse_args()
    curves = {}
    if args.from_csv:
        df = pd.read_csv(args.from_csv)
        curves = {k: df[k].tolist() for k in args.paths.split(",")}
    for fp in args.paths.split(","):
        if not args.from_csv:
            losses, used, secs = run(args.file, args.preset, fp, args.steps, args.seed)
            curves[fp] = losses
            print(f"{fp:8s} ({used}): {len(losses)} steps in {secs:.1f}s", flush=True)
        losses = curves[fp]
        print(f"{fp:8s} first {losses[0]:.4f} | mean of the last 100 {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    a, b = (curves[k] for k in args.paths.split(","))
    n = min(len(a), len(b))
    gap = float((smooth(a[:n]) - smooth(b[:n])).abs().mean())
    print(f"mean |smoothed {args.paths.replace(',', ' - ')}| over {n} steps: {gap:.4f}")
    dev = args.device or device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.out_dir, exist_ok=True)
    df = pd.DataFrame({"step": range(1, n + 1), **{k: v[:n] for k, v in curves.items()}})
    df.to_csv(os.path.join(args.out_dir, "fused_vs_graph_loss.csv"), index=False)
    fig, ax = subplots(figsize=(7, 4))
    for (k, v), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        ax.plot(range(1, len(v) + 1), v, color=color, alpha=0.25, lw=0.8)
        ax.plot(range(1, len(v) + 1), smooth(v), color=color, lw=2, label=f"{k} (20-step mean)")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (token-weighted CE)")
    ax.set_title(f"{args.preset}, WikiText-2, seed {args.seed}: fused vs graph on {dev}\n"
                 f"mean |gap| of smoothed curves {gap:.3f}", fontsize=9)
    png = save(fig, [ax], os.path.join(args.out_dir, "fused_vs_graph_loss.png"))
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

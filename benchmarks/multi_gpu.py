"""Data-parallel scaling: the same training run (same global batch, same data, same steps) on 1, 2, ... GPUs.

Launches ``torchrun --nproc_per_node=N -m newllm_nb train ...`` itself for each N (N=1 is the plain
single-process run), reads each run's per-epoch history from its checkpoint and prints tokens/s, epoch
time, speed-up and scaling efficiency (speed-up / N). Epoch 1 holds the CUDA graph capture, so the
figures are the median over the later epochs.

    python benchmarks/multi_gpu.py --file .bench_data/valid.txt --repeat 18 --gpus 1,2
    python benchmarks/multi_gpu.py --gpus 1,2,4 --batch 2048 --layers 4 --epochs 4

Data: ``--file`` (WikiText text) repeated ``--repeat`` times into one file (the package gives its last
10% of lines to validation): 18 copies of WikiText-2's validation split is ~3.9M words, about twice
WikiText-2's training split. Repeated text makes the validation figures meaningless, not the timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from newllm_nb.bench import device_name  # noqa: E402
from newllm_nb.checkpoint import load_checkpoint  # noqa: E402

# NVLink multicast stays off: on shared hosts a program that uses it can take the GPUs out of service.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run(n: int, args, data: Path, work: Path) -> dict:
    run_dir = work / f"gpus{n}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "newllm_nb",
           "train", "--data-path", str(data), "--layers", str(args.layers), "--batch-size", str(args.batch),
           "--epochs", str(args.epochs), "--patience", "1000", "--quiet", "--no-resume", "--run-dir", str(run_dir)]
    if args.mode:
        cmd += ["--mode", args.mode]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, **SAFE_ENV, PYTHONPATH=path)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], f"{n} GPU(s): torchrun exited {r.returncode}", sep="\n")
        return {}
    print(r.stdout.strip().splitlines()[-2] if r.stdout.strip() else "", flush=True)
    hist = load_checkpoint(run_dir / "last.safetensors").history
    later = hist[1:] or hist
    return {"gpus": n, "per_gpu_batch": -(-args.batch // n), "epochs": len(hist),
            "epoch_s": round(statistics.median(h["seconds"] for h in later), 3),
            "tokens_per_s": round(statistics.median(h["tokens_per_s"] for h in later)),
            "first_epoch_s": round(hist[0]["seconds"], 2), "val_ppl": round(hist[-1]["val_ppl"], 2),
            "launch_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(ROOT / ".bench_data" / "valid.txt"))
    ap.add_argument("--repeat", type=int, default=18)
    ap.add_argument("--gpus", default="1,2", help="comma-separated process counts (one GPU each)")
    ap.add_argument("--batch", type=int, default=2048, help="global batch, the same for every count")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--mode", choices=["windows", "stream"], help="default: the seed preset's (windows)")
    ap.add_argument("--csv")
    args = ap.parse_args()
    have = torch.cuda.device_count()
    counts = [int(x) for x in args.gpus.split(",")]
    if have and max(counts) > have:
        print(f"only {have} GPU(s) visible: skipping counts above that")
        counts = [c for c in counts if c <= have]
    text = Path(args.file).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "wiki.txt"
        data.write_text(text * args.repeat, encoding="utf-8")
        for n in counts:
            rows.append(run(n, args, data, Path(tmp)))
    df = pd.DataFrame([r for r in rows if r])  # a failed count was reported above
    base = df.loc[df.gpus == df.gpus.min()].iloc[0]
    df["speedup"] = (df.tokens_per_s / base.tokens_per_s * base.gpus).round(2)
    df["efficiency_%"] = (100 * df.speedup / df.gpus).round(1)
    dev = device_name(torch.device("cuda" if have else "cpu"))
    print(f"\n{dev} x {max(counts)} | WikiText L{args.layers}, seq 64, global batch {args.batch}, "
          f"{args.repeat}x {Path(args.file).name} | median of epochs 2-{args.epochs} | torch {torch.__version__}")
    print(df.to_string(index=False))
    if args.csv:
        df.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()

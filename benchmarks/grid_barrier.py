"""What one grid-wide barrier of the persistent decoder costs: a cooperative launch of P programs that only meets
at ``persistent._grid_sync`` N times, timed against the same launch with no barrier in it (the launch's own cost).
A decode step is L + 1 barriers (L + 2 with low-rank gates or a projected tied head) plus its matrix work, so this
says how much of a token the barriers take, and how the cost grows with the number of programs.

    python benchmarks/grid_barrier.py                      # P = 16, 32, 64, SM count; 20,000 barriers
    python benchmarks/grid_barrier.py --programs 132 --warps 4,8
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.language as tl

from newllm_nb.experiments.bench import device_name
from newllm_nb.kernels.persistent import _grid_sync


@triton.jit
def _barriers_kernel(bar_ptr, n, P, spin_limit, SYNC: tl.constexpr, FLAG: tl.constexpr, GROUP: tl.constexpr):
    for i in range(n):
        if SYNC:
            _grid_sync(bar_ptr, (i + 1) * P, spin_limit, P, FLAG, GROUP)


def _time(P: int, n: int, warps: int, sync: bool, variant: int) -> float:
    bar = torch.zeros(128 + 32 * triton.cdiv(P, 16), dtype=torch.int32, device="cuda")
    flag, group = variant >= 2, 16 if variant == 3 else 0
    launch = dict(num_warps=warps, launch_cooperative_grid=True)
    _barriers_kernel[(P,)](bar, 10, P, 1 << 22, SYNC=sync, FLAG=flag, GROUP=group, **launch)  # compile
    bar.zero_()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _barriers_kernel[(P,)](bar, n, P, 1 << 22, SYNC=sync, FLAG=flag, GROUP=group, **launch)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    if int(bar[1]) != 0:
        raise RuntimeError(f"a barrier timed out with {P} programs")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", help="comma-separated program counts (default: 16, 32, 64 and the SM count)")
    ap.add_argument("--warps", default="4", help="comma-separated warps a program")
    ap.add_argument("--barriers", type=int, default=20_000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("grid_barrier.py needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counts = [int(x) for x in args.programs.split(",")] if args.programs else sorted({16, 32, 64, sms})
    print(f"device: {device_name(torch.device('cuda'))} | Triton {triton.__version__} | {args.barriers:,} barriers")
    print(f"{'barrier':>8s} {'programs':>8s} {'warps':>5s} {'us / barrier':>13s} {'launch ms':>10s}")
    # NEWLLM_PDEC_BARRIER 1: all poll the count; 2: the last arrival's flag; 3: counters per 16 programs, then flag
    for variant, label in ((1, "count"), (2, "flag"), (3, "grouped")):
        for w in [int(x) for x in args.warps.split(",")]:
            for P in counts:
                base = _time(P, args.barriers, w, False, variant)
                s = _time(P, args.barriers, w, True, variant)
                print(f"{label:>8s} {P:8d} {w:5d} {1e6 * (s - base) / args.barriers:13.3f} {1e3 * base:10.3f}",
                      flush=True)


if __name__ == "__main__":
    main()

"""What a layered schedule's launches cost: a chain of L x T small GEMM + ReLU Triton launches (batch x hidden x
hidden, bf16) captured in one CUDA graph, per tile shape, against the same chain at batch 64 (the launch floor).
It sized ``fused.fused_schedule``'s layered schedule: T * (L + 1) launches a forward pass.

    python benchmarks/launch_chain.py                       # B 2048, H 512, 5 launches a step, T 63
"""

from __future__ import annotations

import argparse
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the GPU machine has Triton
    triton = None


if triton is not None:
    @triton.jit
    def _mm_relu(a_ptr, w_ptr, o_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            acc = tl.dot(tl.load(a_ptr + rm[:, None] * K + kk[None, :]), tl.load(w_ptr + rn[None, :] * K + kk[:, None]),
                         acc)
        tl.store(o_ptr + rm[:, None] * N + rn[None, :], tl.maximum(acc, 0.0).to(tl.bfloat16))


def chain_ms(B: int, H: int, L: int, T: int, BM: int, BN: int, BK: int, warps: int, stages: int) -> float:
    """Median of 10 replays of the captured chain, ms."""
    W = [torch.randn(H, H, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(L)]
    bufs = [torch.randn(B, H, device="cuda", dtype=torch.bfloat16) for _ in range(L + 1)]
    grid = (B // BM, H // BN)

    def body() -> None:
        for _ in range(T):
            for j in range(L):
                _mm_relu[grid](bufs[j], W[j], bufs[j + 1], B, H, H, BM=BM, BN=BN, BK=BK, num_warps=warps,
                               num_stages=stages)

    body()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
        with torch.cuda.graph(g):
            body()
    torch.cuda.current_stream().wait_stream(s)
    times = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    return sorted(times)[5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--launches-per-step", type=int, default=5, help="L + 1 for L FNN layers")
    ap.add_argument("--steps", type=int, default=63)
    args = ap.parse_args()
    if triton is None or not torch.cuda.is_available():
        sys.exit("launch_chain.py times Triton launches in a CUDA graph: it needs a CUDA GPU and Triton")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    n = args.launches_per_step * args.steps
    tiles = [(64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
             (32, 128, 64, 4, 3), (128, 256, 64, 8, 3)]
    for B, tile in [(args.batch, t) for t in tiles] + [(64, tiles[0])]:
        ms = chain_ms(B, args.hidden, args.launches_per_step, args.steps, *tile)
        print(f"B{B} H{args.hidden} {n} launches, tile {tile[0]}x{tile[1]}x{tile[2]} w{tile[3]} s{tile[4]}, "
              f"{(B // tile[0]) * (args.hidden // tile[1])} programs: {ms:.3f} ms = {1000 * ms / n:.2f} us a launch")


if __name__ == "__main__":
    main()

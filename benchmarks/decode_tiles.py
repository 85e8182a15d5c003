"""Tile sizes of the fused greedy decoder, batch 1: tokens/s of each setting, every row in one run.

A batch-1 token is a few GEMVs whose weights must stream into many SMs, so the tiles (output columns per
program ``BN``, vocab columns ``BV``, K step ``BK``, warps per program) and the graph's chunk (tokens per
replay) set the speed. Each row builds ``fused.FusedDecoder`` with ``NEWLLM_DEC_*`` set, decodes
--tokens tokens from the same start and checks that it emits exactly the tokens of the default setting.

    python benchmarks/decode_tiles.py                       # the grid below, original model L1, bf16
    python benchmarks/decode_tiles.py --layers 4 --tokens 20000
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from newllm_nb.config import ModelConfig  # noqa: E402
from newllm_nb.experiments.bench import device_name, environment  # noqa: E402
from newllm_nb.models.newllm import NewLLM  # noqa: E402

KNOBS = ("BN", "BK", "BV", "WARPS")


def decode(model, tiles: dict, chunk: int, tokens: int) -> tuple[float, torch.Tensor, float]:
    """(tokens/s, the ids, first-use seconds) of one setting."""
    from newllm_nb.kernels.fused import FusedDecoder

    with environment({"NEWLLM_DEC_" + k: str(tiles[k]) for k in KNOBS}):
        t0 = time.perf_counter()
        dec = FusedDecoder(model, 1, chunk=chunk)
        dec.run(torch.tensor([[2]]), 2 * chunk)  # compile + capture
        first = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = dec.run(torch.tensor([[2]]), tokens)
        torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t0), ids, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--bn", default="16,32,64")
    ap.add_argument("--bk", default="64,128")
    ap.add_argument("--bv", default="32,64")
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--chunks", default="32,128")
    ap.add_argument("--repeat", type=int, default=2, help="times each setting is decoded; the best is kept")
    ap.add_argument("--best-env", help="write the fastest setting here as NEWLLM_DEC_* shell exports")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_tiles.py times the CUDA decoder: no GPU is visible")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = NewLLM(ModelConfig(num_layers=args.layers, dropout=0.0)).to(dev, torch.bfloat16).eval()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    grid = [dict(zip(KNOBS, v)) for v in itertools.product(ints(args.bn), ints(args.bk), ints(args.bv),
                                                            ints(args.warps))]
    reference = None
    rows = []
    for chunk in ints(args.chunks):
        for tiles in [dict(BN=32, BK=64, BV=64, WARPS=4)] + grid:
            try:
                best, ids, first = 0.0, None, None
                for _ in range(args.repeat):
                    tps, ids, t_first = decode(model, tiles, chunk, args.tokens)
                    best, first = max(best, tps), t_first if first is None else first  # first: compile + capture
            except Exception as e:  # a setting the compiler refuses is a row, not the end of the sweep
                rows.append({**tiles, "chunk": chunk, "tokens_per_s": None, "error": f"{type(e).__name__}: {e}"[:80]})
                continue
            if reference is None:
                reference = ids
            rows.append({**tiles, "chunk": chunk, "tokens_per_s": round(best), "first_use_s": round(first, 2),
                         "same_tokens": bool(torch.equal(ids, reference))})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows).sort_values("tokens_per_s", ascending=False)
    print(f"\n{device_name(dev)} | original model L{args.layers}, bf16, batch 1, {args.tokens} greedy tokens | "
          f"torch {torch.__version__} | best of {args.repeat}; the first row of each chunk is the default tiles")
    print(df.to_string(index=False))
    if args.best_env:
        same = df.dropna(subset=["tokens_per_s"])
        best = same[same["same_tokens"].astype(bool)].iloc[0]  # only settings that decode the default's tokens
        Path(args.best_env).write_text("".join(f"export NEWLLM_DEC_{k}={int(best[k.lower() if k == 'CHUNK' else k])}\n"
                                               for k in (*KNOBS, "CHUNK")))


if __name__ == "__main__":
    main()

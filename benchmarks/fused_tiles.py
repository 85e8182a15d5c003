"""Tile sizes of the fused training kernels: forward and backward time of each preset's recurrence per setting,
every row in one run.

Each program owns BLOCK_B batch rows for all steps and streams the cell's weights through ``tl.dot`` every step,
so the output tile ``BN``, the K step ``BK``, the warps and the pipeline stages set how fast the weights reach
the tensor cores. Each row sets ``NEWLLM_FUSED_*``, runs the preset's recurrence (its own cell options, batch,
window, dropout, bf16) forward and backward on the same inputs and reports the median of --steps calls.
The backward includes its weight-gradient GEMMs. "default" is what ``fused._blocks`` picks with nothing set.

    python benchmarks/fused_tiles.py                                   # the presets and grid below
    python benchmarks/fused_tiles.py --presets original_wikitext --grid 8,256,64,3 16,512,64,3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from newllm_nb import preset  # noqa: E402
from newllm_nb.experiments.bench import device_name  # noqa: E402
from newllm_nb.models.build import build_model  # noqa: E402

KNOBS = ("WARPS", "BN", "BK", "STAGES")
GRID = ["default", "4,128,64,3", "8,256,64,3", "8,256,64,4", "8,512,64,3", "16,512,64,3", "8,256,32,3",
        "8,256,128,3"]


def recurrence_call(name: str):
    """A function running ``name``'s recurrence forward and backward once, on fixed random inputs."""
    from newllm_nb.kernels.fused import fused_recurrence

    cfg = preset(name)
    B, T, mc = cfg.train.batch_size, cfg.data.max_seq_length - 1, cfg.model
    torch.manual_seed(0)
    model = build_model(mc).cuda().train()
    ids = torch.randint(4, mc.vocab_size, (B, T), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        x_proj = model._embed_proj(ids).detach().requires_grad_()
    c0 = model.init_context(B).cuda()

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        return model.run_recurrence(fused_recurrence, x_proj, c0, None)
    return call, B, T, mc.num_layers


def time_setting(call, steps: int) -> tuple[float, float]:
    """Median forward and backward milliseconds of ``steps`` calls after two warm-up calls."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    fwd, bwd = [], []
    for i in range(steps + 2):
        ev[0].record()
        hs, c = call()
        ev[1].record()
        (hs.float().sum() + c.sum()).backward()
        ev[2].record()
        torch.cuda.synchronize()
        if i >= 2:
            fwd.append(ev[0].elapsed_time(ev[1]))
            bwd.append(ev[1].elapsed_time(ev[2]))
    return sorted(fwd)[steps // 2], sorted(bwd)[steps // 2]


def sweep(name: str, grid: list[str], steps: int) -> list[dict]:
    call, B, T, L = recurrence_call(name)
    rows = []
    for setting in grid:
        values = {} if setting == "default" else dict(zip(KNOBS, setting.split(",")))
        for k, v in values.items():
            os.environ["NEWLLM_FUSED_" + k] = v
        try:
            fwd, bwd = time_setting(call, steps)
            row = {"forward_ms": round(fwd, 3), "backward_ms": round(bwd, 3), "total_ms": round(fwd + bwd, 3)}
        except Exception as e:  # a setting the GPU cannot run (e.g. out of shared memory) is a row, not the end
            row = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
        finally:
            for k in values:
                os.environ.pop("NEWLLM_FUSED_" + k, None)
        rows.append({"preset": name, "batch": B, "steps": T, "layers": L, "tiles (warps,BN,BK,stages)": setting,
                     **row})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="original_wikitext,original_dolly,newllm_plus,newllm_plus_10k")
    ap.add_argument("--grid", nargs="+", default=GRID, help="settings 'warps,BN,BK,stages', or 'default'")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fused_tiles.py times the Triton training kernels: it needs a CUDA GPU")
    rows = [r for name in args.presets.split(",") for r in sweep(name, args.grid, args.steps)]
    print(f"\ndevice: {device_name(torch.device('cuda'))}, torch {torch.__version__}")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()

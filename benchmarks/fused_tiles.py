"""Tile sizes of the fused training kernels: forward and backward time of each preset's recurrence per setting,
every row in one run.

``--schedule persistent``: each program owns BLOCK_B batch rows for all steps and streams the cell's weights
through ``tl.dot`` every step, so the output tile ``BN``, the K step ``BK``, the warps and the pipeline stages set
how fast the weights reach the tensor cores (settings 'warps,BN,BK,stages', ``NEWLLM_FUSED_*``).
``--schedule layered``: a launch a phase a step, each program a BB x BN tile of a layer (BB x BC of the gates);
settings 'BB,BN,BC,warps,stages' (``NEWLLM_FUSED_LAYERED_*``).
Each row runs the preset's recurrence (its own cell options, batch, window, dropout, bf16) forward and backward on
the same inputs, both captured in CUDA graphs as in training, and reports the median of --steps replays. The
backward includes its weight-gradient GEMMs. "default" is what ``fused`` picks with nothing set.

    python benchmarks/fused_tiles.py                                   # the presets and grid below
    python benchmarks/fused_tiles.py --presets original_wikitext --grid 8,256,64,3 16,512,64,3
    python benchmarks/fused_tiles.py --schedule layered --grid default 64,128,64,8,3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from newllm_nb import preset  # noqa: E402
from newllm_nb.experiments.bench import device_name, environment  # noqa: E402
from newllm_nb.models.build import build_model  # noqa: E402

KNOBS = {"persistent": ("NEWLLM_FUSED_", ("WARPS", "BN", "BK", "STAGES")),
         "layered": ("NEWLLM_FUSED_LAYERED_", ("BB", "BN", "BC", "WARPS", "STAGES"))}
GRID = ["default", "4,128,64,3", "8,256,64,3", "8,256,64,4", "8,512,64,3", "16,512,64,3", "8,256,32,3",
        "8,256,128,3"]


def recurrence_call(name: str, dropout: bool = True):
    """A function running ``name``'s recurrence once, on fixed random inputs (``dropout`` False: every dropout of
    the cell off, to see what the masks cost)."""
    from newllm_nb.kernels.fused import fused_recurrence

    cfg = preset(name) if dropout else preset(name, model__dropout=0.0, model__context_dropout=0.0)
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
    """Median forward and backward milliseconds of ``steps`` replays of CUDA graphs of the forward alone and of
    the forward with its backward; backward = the second minus the first."""
    graphs = capture(call)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    fwd, total = [], []
    for _ in range(steps):
        ev[0].record()
        graphs[0].replay()
        ev[1].record()
        graphs[1].replay()
        ev[2].record()
        torch.cuda.synchronize()
        fwd.append(ev[0].elapsed_time(ev[1]))
        total.append(ev[1].elapsed_time(ev[2]))
    f, t = sorted(fwd)[steps // 2], sorted(total)[steps // 2]
    return f, t - f


def capture(call) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
    """CUDA graphs of the forward alone and of the forward with its backward, captured after two warm-up calls."""
    def both() -> None:
        hs, c = call()
        (hs.float().sum() + c.sum()).backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs = []
    with torch.cuda.stream(stream):
        for fn in (call, both):
            fn()
            fn()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graphs.append(g)
    torch.cuda.current_stream().wait_stream(stream)
    return graphs[0], graphs[1]


def profile(name: str, schedule: str, dropout: bool) -> None:
    """The kernels of one forward + backward replay, by CUDA time (torch.profiler)."""
    call, B, T, L = recurrence_call(name, dropout)
    with environment({"NEWLLM_FUSED_SCHEDULE": schedule}):
        _, both = capture(call)
        both.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            both.replay()
            torch.cuda.synchronize()
    print(f"\n{name} (B {B}, T {T}, L {L}), {schedule} schedule, dropout {'as the preset' if dropout else 'off'}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def sweep(name: str, schedule: str, grid: list[str], steps: int, dropout: bool = True) -> list[dict]:
    call, B, T, L = recurrence_call(name, dropout)
    prefix, knobs = KNOBS[schedule]
    rows = []
    for setting in grid:
        values = {} if setting == "default" else dict(zip(knobs, setting.split(",")))
        try:
            with environment({"NEWLLM_FUSED_SCHEDULE": schedule, **{prefix + k: v for k, v in values.items()}}):
                fwd, bwd = time_setting(call, steps)
            row = {"forward_ms": round(fwd, 3), "backward_ms": round(bwd, 3), "total_ms": round(fwd + bwd, 3)}
        except Exception as e:  # a setting the GPU cannot run (e.g. out of shared memory) is a row, not the end
            row = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
        rows.append({"preset": name, "batch": B, "steps": T, "layers": L, "schedule": schedule, "dropout": dropout,
                     f"tiles ({','.join(knobs).lower()})": setting, **row})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="original_wikitext,original_dolly,newllm_plus,newllm_plus_10k")
    ap.add_argument("--schedule", default="persistent", choices=list(KNOBS))
    ap.add_argument("--grid", nargs="+", default=None, help="settings 'warps,BN,BK,stages' (persistent) or "
                                                             "'BB,BN,BC,warps,stages' (layered), or 'default'")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dropout", default="preset", choices=["preset", "off"],
                    help="off: every dropout of the cell off, to see what drawing the masks costs")
    ap.add_argument("--profile", action="store_true", help="also print each preset's kernels in one forward + "
                                                           "backward replay (torch.profiler), default tiles")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fused_tiles.py times the Triton training kernels: it needs a CUDA GPU")
    grid = args.grid or (GRID if args.schedule == "persistent" else ["default"])
    dropout = args.dropout == "preset"
    rows = [r for name in args.presets.split(",") for r in sweep(name, args.schedule, grid, args.steps, dropout)]
    print(f"\ndevice: {device_name(torch.device('cuda'))}, torch {torch.__version__}")
    print(pd.DataFrame(rows).to_string(index=False))
    if args.profile:
        for name in args.presets.split(","):
            profile(name, args.schedule, dropout)


if __name__ == "__main__":
    main()

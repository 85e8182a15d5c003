"""What a greedy decode costs before its first token and per token, at batch 1, on the weight-stationary
decoder (``generate.persistent_decoder``): the prompt's prime, then whole ``run(prompt, n)`` calls for n from 1 to
4096 (mean of 5 after a warm-up call). ``run(1)`` is the fixed cost of a call; the slope between n = 512 and 4096 is
the cost of a token.

    PYTHONPATH=. python benchmarks/decode_fixed_cost.py --presets original_wikitext,best_wikitext_10k,newllm_plus_10k
    PYTHONPATH=. python benchmarks/decode_fixed_cost.py --presets original_wikitext --profile   # one run(1000) traced
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from newllm_nb import NewLLM, preset  # noqa: E402
from newllm_nb.experiments.bench import device_name  # noqa: E402
from newllm_nb.infer.generate import persistent_decoder  # noqa: E402
from newllm_nb.kernels.decoding import prime  # noqa: E402

LENGTHS = (1, 64, 512, 1000, 4096)


def mean_ms(fn, n: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def measure(name: str, profile: bool) -> None:
    torch.manual_seed(0)
    model = NewLLM(preset(name).model).cuda().to(torch.bfloat16).eval()
    dec = persistent_decoder(model, 1, max_batch=1)
    prompt = torch.tensor([[2]])
    print(name, type(dec).__name__, "chunk", getattr(dec, "chunk", "?"))
    print(f"  prime ms {mean_ms(lambda: prime(model, prompt.cuda()), 20):.3f}")
    for n in LENGTHS:
        ms = mean_ms(lambda n=n: dec.run(prompt, n), 5)
        print(f"  run({n}) ms {ms:.3f}  tok/s {n / ms * 1e3:,.0f}", flush=True)
    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            dec.run(prompt, 1000)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=38))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="original_wikitext,best_wikitext_10k,newllm_plus_10k")
    ap.add_argument("--profile", action="store_true", help="also trace one run(1000) per preset (torch.profiler)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_fixed_cost.py times the GPU decoders: it needs a CUDA GPU")
    print(f"device: {device_name(torch.device('cuda'))}, torch {torch.__version__}")
    for name in args.presets.split(","):
        measure(name, args.profile)


if __name__ == "__main__":
    main()

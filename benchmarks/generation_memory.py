"""Memory and speed of batch-1 generation vs length: New-LLM (one context vector) against a causal
Transformer with a KV cache of about equal parameters.

New-LLM: prime on a 1-token prompt, then one cell update per token (``generate.decode_ids``; on CUDA
the single-token step is captured in a CUDA graph, 32 steps a replay). Transformer: ``decode_step``
with a preallocated KV cache for the whole length. Where the Transformer would take too long
(length > --tf-full-max), its cache is allocated at full length and only the last --tf-tail steps
run (memory is real, tokens/s comes from those steps; the CSV says so in ``measured_steps``).

    python benchmarks/generation_memory.py                       # 1k, 10k, 100k (+1M on GPU)
    python benchmarks/generation_memory.py --lengths 1000,10000  # a quick CPU look
    python benchmarks/generation_memory.py --models newllm,fused,fused64   # graph vs fused Triton decode
    python benchmarks/generation_memory.py --preset newllm_plus_10k --models fused,fused64   # a preset's model
    python benchmarks/generation_memory.py --preset original_wikitext --models fused,persistent,fused64,persistent64

Fused rows (CUDA with Triton): ``fused.FusedDecoder``, the same graphed loop with the cell as Triton kernels
and layer 1's embedding half read from a vocab x hidden table; at batch 1 and at batch 64 (``fused64``,
tokens/s counts all 64 rows; lengths up to --fused-batch-max). Persistent rows (``persistent``, ``persistent64``):
``persistent.PersistentDecoder`` through ``generate.persistent_decoder``, one cooperative launch a chunk of greedy
tokens with the weights kept on chip (or, with the one line saying why, the decoder it falls back to).
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import torch

from newllm_nb import ModelConfig, NewLLM, preset
from newllm_nb.experiments.bench import device_name
from newllm_nb.infer.generate import GraphDecoder, decode_ids, graph_decoder, persistent_decoder
from newllm_nb.kernels.available import fused_kernels
from newllm_nb.models.baselines import TransformerLM
from newllm_nb.models.build import matched_config

from figures import save, subplots


def _mem_reset(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev, fallback_bytes: int) -> float:
    # GPU: the allocator's peak. CPU: the bytes of weights + generation state (context or KV cache).
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else fallback_bytes / 2**20


def bench_newllm(model, n: int, dev, decoder, batch: int = 1) -> dict:
    prompt = torch.full((batch, 1), 2)
    run = decoder.run if decoder is not None else (lambda p, k: decode_ids(model, p, k))
    run(prompt, 64)  # warm-up (graph capture) outside the timing
    _mem_reset(dev)
    t0 = time.perf_counter()
    ids = run(prompt, n)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = model.config.context_dim * 4
    assert ids.shape == (batch, n)
    return {"tokens_per_s": batch * n / s, "peak_mem_mb": _peak(dev, weights + batch * state), "measured_steps": n,
            "state_mb": batch * state / 2**20}


@torch.no_grad()
def bench_transformer(model, n: int, dev, full_max: int, tail: int) -> dict:
    _mem_reset(dev)
    cache = model.init_cache(1, n)
    steps = n if n <= full_max else min(tail, n)
    cache["len"] = n - steps
    tok = torch.tensor([2], device=dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model.decode_step(tok, cache)
        tok = logits.argmax(-1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = cache["k"].numel() * cache["k"].element_size() * 2
    return {"tokens_per_s": steps / s, "peak_mem_mb": _peak(dev, weights + kv), "measured_steps": steps,
            "state_mb": kv / 2**20}


def _parser(cuda: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1000,10000,100000" + (",1000000" if cuda else ""))
    ap.add_argument("--layers", type=int, default=1, help="New-LLM FNN layers (original defaults otherwise)")
    ap.add_argument("--preset", help="decode this preset's model instead (its cell, sizes and vocabulary); the fused "
                                     "rows then take generate.graph_decoder's choice for it")
    ap.add_argument("--tf-full-max", type=int, default=100_000, help="longest Transformer run done in full")
    ap.add_argument("--tf-tail", type=int, default=2000, help="steps timed at the end of longer Transformer runs")
    ap.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["bf16", "fp32"])
    ap.add_argument("--models", default="newllm,transformer,fused,fused64",
                    help="comma-separated subset of: newllm (graph decode), transformer, fused, fused64, "
                         "persistent, persistent64")
    ap.add_argument("--fused-batch-max", type=int, default=100_000, help="longest fused batch-64 run")
    ap.add_argument("--out-dir", default="benchmarks/results")
    return ap


def main() -> None:
    cuda = torch.cuda.is_available()
    args = _parser(cuda).parse_args()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, dropout=0.0) if not args.preset else preset(args.preset).model
    newllm = NewLLM(cfg).to(dev, dtype).eval()
    tf = TransformerLM(matched_config(cfg, "transformer")).to(dev, dtype).eval()
    decoder = GraphDecoder(newllm) if cuda else None  # one captured single-token step for every length
    models = args.models.split(",")
    fused, keys = fast_decoders(newllm, models, args.preset, dev) if cuda else ({}, {})
    names = ([("New-LLM", "newllm")] if "newllm" in models else []) + \
        ([("Transformer+KV", "transformer")] if "transformer" in models else []) + \
        [(k, keys[k]) for k in fused]
    # Every decoder captures its graph before any row is measured: a graph captured later would hold its
    # memory pool during the later rows only and show up as a spread over lengths that is not generation's.
    for dec, batch in [(decoder, 1)] * (decoder is not None and "newllm" in models) + list(fused.values()):
        dec.run(torch.full((batch, 1), 2), 64)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        for name, key in names:
            if key not in models or (key.endswith("64") and n > args.fused_batch_max):
                continue
            rows.append(measure_row(name, n, newllm, tf, decoder, fused, dev, args))
    df = pd.DataFrame(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "generation_memory" + (f"_{args.preset}" if args.preset else ""))
    df.to_csv(stem + ".csv", index=False)
    print_table(df, args, dev)
    plot(df, device_name(dev), stem + ".png")
    print(f"wrote {stem}.csv and {stem}.png")


def fast_decoders(newllm, models: list[str], preset_name, dev) -> tuple[dict, dict]:
    """The fused and persistent decoders asked for in ``models`` (CUDA only): {row name: (decoder, batch)} and
    {row name: its --models key}. Each is used once here, so its compile time is printed apart."""
    fused = {}
    if {"fused", "fused64"} & set(models):
        kernels, why = fused_kernels(dev)
        if kernels:
            t0 = time.perf_counter()
            make = kernels.FusedDecoder if not preset_name else graph_decoder
            fused = {"New-LLM fused": (make(newllm, 1), 1), "New-LLM fused x64": (make(newllm, 64), 64)}
            print("fused rows decode with " + ", ".join(f"{type(d).__name__} (batch {b})" for d, b in fused.values()))
            fused["New-LLM fused"][0].run(torch.tensor([[2]]), 64)  # first use: Triton compile + graph capture
            print(f"fused decoder first use (compile + capture): {time.perf_counter() - t0:.1f}s", flush=True)
        else:
            print(f"fused decode skipped: {why}")
    keys = {"New-LLM fused": "fused", "New-LLM fused x64": "fused64"}
    for key, batch in (("persistent", 1), ("persistent64", 64)):
        if key in models:
            t0 = time.perf_counter()
            dec = persistent_decoder(newllm, batch, max_batch=batch)  # first use (compile + a launch) inside
            name = "New-LLM persistent" + (f" x{batch}" if batch > 1 else "")
            fused[name], keys[name] = (dec, batch), key
            info = getattr(dec, "kernel_info", None)  # registers, spills, programs an SM holds
            print(f"{name} decodes with {type(dec).__name__}; first use {time.perf_counter() - t0:.1f}s"
                  + (f"; {getattr(dec, 'P', '?')} programs, {info}" if info else ""), flush=True)
    return fused, keys


def measure_row(name: str, n: int, newllm, tf, decoder, fused: dict, dev, args: argparse.Namespace) -> dict:
    """One row: ``n`` tokens generated by the row's model and decoder, with its speed and peak memory."""
    batch = 1
    if name == "New-LLM":
        r = bench_newllm(newllm, n, dev, decoder)
    elif name in fused:
        dec, batch = fused[name]
        r = bench_newllm(newllm, n, dev, dec, batch)
    else:
        r = bench_transformer(tf, n, dev, args.tf_full_max, args.tf_tail)
    params = sum(p.numel() for p in (tf if name == "Transformer+KV" else newllm).parameters())
    print(f"{name:15s} {n:>9,} tokens  {r['tokens_per_s']:>10,.0f} tok/s  peak {r['peak_mem_mb']:9.1f} MiB "
          f"(steps timed {r['measured_steps']:,})", flush=True)
    return {"model": name, "batch": batch, "params": params, "tokens": n, **r, "device": device_name(dev),
            "dtype": args.dtype}


def print_table(df: pd.DataFrame, args: argparse.Namespace, dev) -> None:
    """The table, then each New-LLM row's peak-memory spread over the lengths and its slowest speed."""
    print(f"\ndevice: {device_name(dev)} | dtype {args.dtype}" + (f" | preset {args.preset}" if args.preset else ""))
    print(df.drop(columns=["device"]).round(2).to_string(index=False))
    for name in [m for m in df.model.unique() if m.startswith("New-LLM")]:
        nl = df[df.model == name].sort_values("tokens")
        spread = (nl.peak_mem_mb.max() - nl.peak_mem_mb.min()) / nl.peak_mem_mb.min()
        print(f"{name} peak memory spread over {nl.tokens.min():,}..{nl.tokens.max():,} tokens: {100 * spread:.2f}% | "
              f"min speed {nl.tokens_per_s.min():,.0f} tok/s")


def plot(df: pd.DataFrame, device: str, png: str) -> None:
    """Peak memory and tokens/s against length, one line per model, written to ``png``."""
    fig, (a, b) = subplots(1, 2, figsize=(10, 3.6))
    for name, g in df.groupby("model"):
        a.plot(g.tokens, g.peak_mem_mb, "o-", label=name)
        b.plot(g.tokens, g.tokens_per_s, "o-", label=name)
    for ax, yl in ((a, "peak memory (MiB)"), (b, "tokens / s (all rows of the batch)")):
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel(yl)
    a.set_yscale("log")
    fig.suptitle(f"Generation vs length on {device}")
    save(fig, (a, b), png)


if __name__ == "__main__":
    main()

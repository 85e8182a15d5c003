"""Training throughput: the original's per-token loop vs this package's eager and fast paths, cuDNN LSTM
and a causal Transformer of about equal parameters. Whole training steps (forward, backward, clip,
Adam), random tokens, median of --steps steps after warm-up.

    python benchmarks/train_throughput.py                 # B=2048, both configs, on the GPU if present
    python benchmarks/train_throughput.py --batch 64 --steps 5 --rounds 3   # CPU: variants interleaved 3 times

Off CUDA the package's eager step runs the hand-written BPTT (``package eager + BPTT``); ``package eager
(hoisted)`` is the same step with autograd through the time loop (``fast_path="off"``). ``--rounds N`` times
every variant N times in turn (A B C, A B C, ...) and reports the median of its rounds: on a shared machine the
load then falls on all variants alike.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from newllm_nb import ModelConfig, preset
from newllm_nb.config import apply_overrides
from newllm_nb.data.batching import StreamData
from newllm_nb.experiments.bench import environment, probe_throughput
from newllm_nb.models.build import build_model, matched_config
from newllm_nb.train.trainer import Trainer

from original_loop import OriginalLoop

CONFIGS = {"L1-T127": (1, 127), "L4-T63": (4, 63)}  # Dolly and WikiText configs
WIKITEXT2_TRAIN_TOKENS = 2_088_628  # WikiText-2's train split, word level: the epoch of --epoch-presets


def preset_rows(names: list[str], steps: int, rounds: int, schedules: tuple[str, ...] = (),
                graph_row: bool = True) -> list[dict]:
    """Each preset at its own batch and window length: its step on this device's default path, the fused kernels in
    each of ``schedules`` (``fused.fused_schedule``), the autograd CUDA graph (``graph_row``: the path the cell
    options took before the fused kernels covered them) and the equal-parameter LSTM on the same batch, window
    and precision."""
    rows = []
    for name in names:
        cfg = preset(name)
        B, T = cfg.train.batch_size, cfg.data.max_seq_length
        variants = [("New-LLM, fast_path auto", cfg.model, "auto", "")]
        if torch.cuda.is_available():
            variants += [(f"New-LLM, fused, {s} schedule", cfg.model, "fused", s) for s in schedules]
            if graph_row:
                variants.append(("New-LLM, CUDA graph of the autograd loop", cfg.model, "graph-autograd", ""))
        variants.append(("LSTM, equal params", matched_config(cfg.model, "lstm"), "off", ""))
        runs: dict = {}
        for _ in range(rounds):
            for label, mcfg, fp, schedule in variants:
                with environment({"NEWLLM_FUSED_SCHEDULE": schedule}):
                    runs.setdefault(label, []).append(probe_throughput(mcfg, B, T, steps=steps, fast_path=fp))
        for label, _, _, _ in variants:
            r = sorted(runs[label], key=lambda r: r["step_ms"])[(len(runs[label]) - 1) // 2]
            rows.append({"preset": name, "batch": B, "seq_len": T, "variant": label, "path": r["path"],
                         "params": r["params"], "step_ms": round(r["step_ms"], 3), "warmup_s": round(r["warmup_s"], 2),
                         "precision": r["precision"], "device": r["device"]})
            print(f"{name:18s} B{B:<5d} T{T:<4d} {label:42s} {r['step_ms']:8.3f} ms  path {r['path']}", flush=True)
    return rows


def epoch_rows(names: list[str]) -> list[dict]:
    """Two real training epochs (Trainer.fit, its loop and data included) of each preset and its equal-parameter
    LSTM on a random token stream of WikiText-2's train size, articles of about 3.6k tokens (reset between
    them), a 20k-token validation stream: the first epoch with the fast path's first use (compile, capture), the
    second as every later epoch of a run."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in names:
        base = apply_overrides(preset(name), train__epochs=2, train__show_progress=False, train__ema_decay=0.0)
        V, T = base.model.vocab_size, base.data.max_seq_length

        train, valid = (StreamData(torch.randint(4, V, (n,), generator=gen), torch.rand(n, generator=gen) < 1 / 3600, T)
                        for n in (WIKITEXT2_TRAIN_TOKENS, 20_000))
        for label, mcfg in (("New-LLM", base.model), ("LSTM, equal params", matched_config(base.model, "lstm"))):
            cfg = apply_overrides(base, **{f"model__{k}": v for k, v in vars(mcfg).items()})
            torch.manual_seed(0)
            trainer = Trainer(build_model(cfg.model), train, valid, cfg)
            first, rec = trainer.fit(resume=False)[:2]
            rows.append({"preset": name, "model": label, "batch": cfg.train.batch_size, "seq_len": T,
                         "path": trainer.step.used, "first_epoch_s": round(first["seconds"], 2),
                         "epoch_s": round(rec["seconds"], 2), "tokens_per_s": round(rec["tokens_per_s"]),
                         "device": _device()})
            print(f"epoch {name:18s} {label:20s} first {first['seconds']:8.2f} s, then {rec['seconds']:8.2f} s  "
                  f"path {trainer.step.used}", flush=True)
    return rows


def main() -> None:
    args = _parse_args()
    if args.presets or args.epoch_presets:
        _preset_tables(args)
        return
    rows = [row for name in args.configs.split(",") for row in config_rows(name, args)]
    df = pd.DataFrame(rows)
    _print_table(df, args)
    _print_summaries(df)
    if args.csv:
        df.to_csv(args.csv, index=False)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="also time the fast path with a torch.compile'd cell")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--only", help="comma-separated substrings: time only the variants whose label contains one")
    ap.add_argument("--rounds", type=int, default=1, help="time every variant this many times, interleaved")
    ap.add_argument("--presets", help="comma-separated presets: a row each at its own batch and window, beside the "
                                      "LSTM of equal parameters on the same recipe (then the configs are skipped)")
    ap.add_argument("--epoch-presets", help="comma-separated presets: two epochs each on WikiText-2-sized random "
                                            "tokens, beside the LSTM")
    ap.add_argument("--schedules", default="", help="with --presets: also a row per fused schedule named here "
                                                     "(comma-separated: persistent, layered)")
    ap.add_argument("--graph-row", action=argparse.BooleanOptionalAction, default=True,
                    help="with --presets: the autograd CUDA graph's row")
    ap.add_argument("--csv", help="write the table here too")
    return ap.parse_args()


def _preset_tables(args: argparse.Namespace) -> None:
    """The --presets and --epoch-presets tables, each printed and optionally written beside --csv."""
    schedules = tuple(filter(None, args.schedules.split(",")))
    for part, fn, suffix in ((args.presets, lambda n: preset_rows(n, args.steps, args.rounds, schedules,
                                                                  args.graph_row), "_presets.csv"),
                             (args.epoch_presets, epoch_rows, "_epochs.csv")):
        if part:
            df = pd.DataFrame(fn(part.split(",")))
            print(f"\ndevice: {df.device[0] if 'device' in df else _device()}")
            print(df.drop(columns=["device"], errors="ignore").to_string(index=False))
            if args.csv:
                df.to_csv(args.csv.replace(".csv", suffix), index=False)


def config_variants(cfg: ModelConfig, args: argparse.Namespace) -> list[tuple[str, ModelConfig, dict]]:
    """(label, model config, probe options) of every variant timed on one config, filtered by --only."""
    cuda = torch.cuda.is_available()
    variants = [("original per-token loop", cfg, dict(fast_path="off", model=OriginalLoop(build_model(cfg)))),
                ("package eager (hoisted)", cfg, dict(fast_path="off"))]
    if not cuda:
        variants.append(("package eager + BPTT", cfg, dict(fast_path="auto", device="cpu")))
    if cuda:
        variants.append(("fast path: CUDA graph, autograd", cfg, dict(fast_path="graph-autograd")))
        variants.append(("package fast path (graph + BPTT)", cfg, dict(fast_path="graph")))
        variants.append(("fused Triton recurrence (graph)", cfg, dict(fast_path="fused")))
        if args.compile:
            variants.append(("fast path + compiled cell", cfg, dict(fast_path="compile")))
    variants += [("cuDNN LSTM, equal params", matched_config(cfg, "lstm"), dict(fast_path="off")),
                 ("causal Transformer, equal params", matched_config(cfg, "transformer"), dict(fast_path="off"))]
    if args.only:
        variants = [v for v in variants if any(s.strip() in v[0] for s in args.only.split(","))]
    return variants


def _time_rounds(name: str, T: int, variants: list, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every variant's probe results, timed --rounds times in turn (A B C, A B C, ...)."""
    runs: dict = {}
    for rnd in range(args.rounds):
        for label, mcfg, kw in variants:
            t0 = time.perf_counter()
            r = probe_throughput(mcfg, args.batch, T, steps=args.steps, precision=args.precision, **kw)
            runs.setdefault(label, []).append(r)
            print(f"{name:8s} round {rnd + 1}/{args.rounds} {label:34s} {r['step_ms']:9.2f} ms  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return runs


def config_rows(name: str, args: argparse.Namespace) -> list[dict]:
    """One table row per variant of config ``name``: its median round, and its speed-up over the original loop."""
    layers, T = CONFIGS[name]
    variants = config_variants(ModelConfig(num_layers=layers), args)
    runs = _time_rounds(name, T, variants, args)
    base_ms = None
    rows = []
    for label, _, _ in variants:
        rs = sorted(runs[label], key=lambda r: r["step_ms"])
        r = rs[(len(rs) - 1) // 2]  # the median round (the lower of two)
        if label == "original per-token loop":  # the speed-up column needs the original row (absent with --only)
            base_ms = r["step_ms"]
        rows.append({"config": name, "variant": label, "params": r["params"], "path": r["path"],
                     "step_ms": round(r["step_ms"], 2), "tokens_per_s": round(r["tokens_per_s"]),
                     "warmup_s": round(r["warmup_s"], 2),
                     "peak_mem_gb": None if r["peak_mem_gb"] is None else round(r["peak_mem_gb"], 2),
                     "speedup_vs_original": round(base_ms / r["step_ms"], 2) if base_ms else None,
                     "precision": r["precision"],
                     "device": r["device"]})
    return rows


def _print_table(df: pd.DataFrame, args: argparse.Namespace) -> None:
    print()
    print(f"device: {df.device[0]} | batch {args.batch} | precision {df.precision[0]} | "
          f"median of {args.steps} steps" + (f", median of {args.rounds} interleaved rounds" * (args.rounds > 1)))
    shown = df.drop(columns=["device"])
    print(shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False))


def _print_summaries(df: pd.DataFrame) -> None:
    """The fast path's speed-up over the original loop, and each New-LLM step against cuDNN's LSTM."""
    fast = df[df.variant.str.startswith("package fast path") & df.speedup_vs_original.notna()]
    if len(fast):
        met = int((fast.speedup_vs_original >= 3).sum())
        ratios = ", ".join(f"{c} {s}x" for c, s in zip(fast.config, fast.speedup_vs_original))
        print(f"\nsummary: fast path vs original loop = {ratios} -> >= 3x in {met} of {len(fast)} config(s)")
    for name in df.config.unique():  # the target: the fused step at or below cuDNN's LSTM
        ms = dict(zip(df[df.config == name].variant, df[df.config == name].step_ms))
        lstm = ms.get("cuDNN LSTM, equal params")
        for label in ("fused Triton recurrence (graph)", "package eager + BPTT"):
            if ms.get(label) and lstm:
                print(f"summary: {name} {label} {ms[label]} ms vs LSTM {lstm} ms -> LSTM/New-LLM = "
                      f"{lstm / ms[label]:.2f}x")


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()

"""What does the context vector remember? Train (with quality.py's own ``run_one``: the same data split,
training and evaluation) New-LLM recipes and the equal-parameter LSTM, then measure each trained model
with ``newllm_nb.experiments.memory`` on the evaluation text and draw the original model, the best option and the
LSTM side by side.

Every row of the quality table (dev_ppl, eval_ppl) is what ``quality.py --runs newllm-best-L1`` (or
``lstm-best-L1size``) gives for that recipe and seed; choose on dev_ppl only. Outputs under --out:
``screen.csv`` (one row per run), ``position.csv`` (loss by position in the article, carried vs reset),
``fade.csv`` (how fast a changed token fades from the state), and ``context_memory.png`` (or --png). Rows are appended
as runs finish, so a time limit keeps what finished.

    python benchmarks/context_memory.py --file .bench_data/valid.txt --vocab 10000 --best-epochs 60 \\
        --recipe base=best_wikitext_10k --recipe benchmarks/recipes/opt_chrono64.json --jobs 8
    python benchmarks/context_memory.py --plot-only --out benchmarks/results/context_memory   # redraw from CSVs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py and figures.py sit beside this file
from quality import DEFAULT_FILE, load_recipe, load_splits, run_one  # noqa: E402

from newllm_nb.data.batching import wikitext_stream  # noqa: E402
from newllm_nb.data.tokenizer import WordTokenizer  # noqa: E402
from newllm_nb.experiments.memory import loss_by_position, perturbation_fade  # noqa: E402
from newllm_nb.experiments.parallel import spread  # noqa: E402
from newllm_nb.models.build import matched_config  # noqa: E402
from newllm_nb.train.checkpoint import load_model  # noqa: E402

from figures import save, subplots  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def train_and_measure(label: str, model_cfg, train_cfg, seq: int, data: tuple, device: str, workdir: str,
                      seed: int, reset_every: int = 64) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """One quality.py row for ``label`` at ``seed``, then loss by position and perturbation fade of its best
    checkpoint on the evaluation text. Returns (row, position frame, fade frame)."""
    row = run_one(label, model_cfg, train_cfg, "best", data, device, workdir, seq, 8, {"recipe": label, "seed": seed},
                  seed)
    tok, eval_lines = data[0], data[3]
    model, _, _ = load_model(Path(workdir) / f"{label}-v{tok.vocab_size}-s{seed}" / "best.safetensors", device)
    tokens, resets = wikitext_stream(eval_lines, tok)
    keys = {"model": label, "seed": seed}
    pos = loss_by_position(model, tokens, resets, reset_every=(None, reset_every)).assign(**keys)
    fade = perturbation_fade(model, tokens, resets, warmup=32, horizon=128, samples=128).assign(**keys)
    return row, pos, fade


def _append(path: Path, df: pd.DataFrame) -> None:
    df.to_csv(path, mode="a", header=not path.exists(), index=False)


def choose(screen: pd.DataFrame, base: str = "base", lstm: str = "lstm") -> list[str]:
    """[base, the New-LLM recipe with the lowest mean dev PPL other than base, lstm] (those present)."""
    others = screen[~screen.recipe.isin([base, lstm])]
    best = [others.groupby("recipe").dev_ppl.mean().idxmin()] if len(others) else []
    return [m for m in [base, *best, lstm] if m in set(screen.recipe)]


def plot(out: Path, models: list[str], png: Optional[Path] = None) -> Path:
    """Draw loss by position (carried solid, reset dashed) and the fade of a changed token for ``models``."""
    pos = pd.read_csv(out / "position.csv").groupby(["model", "context", "position_lo", "position_hi"],
                                                    as_index=False)[["loss", "tokens"]].mean()
    fade = pd.read_csv(out / "fade.csv").groupby(["model", "distance"], as_index=False)[["rel_diff", "kl"]].mean()
    fig, axes = subplots(1, 3, figsize=(16, 4.6))
    colors = dict(zip(models, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for m in models:
        for ctx, style in (("carried", "-"), (None, "--")):
            d = pos[(pos.model == m) & ((pos.context == "carried") if ctx else (pos.context != "carried"))]
            if len(d):
                mid = (d.position_lo * d.position_hi.clip(upper=8192)) ** 0.5
                label = f"{m}, {d.context.iloc[0]}"
                axes[0].plot(mid, d.loss, style, marker="o", ms=3, color=colors[m], label=label)
        d = fade[fade.model == m]
        axes[1].plot(d.distance, d.rel_diff, color=colors[m], label=m)
        axes[2].plot(d.distance, d.kl, color=colors[m], label=m)
    axes[0].set(xscale="log", xlabel="position of the predicted token in its article", ylabel="eval loss (nats)",
                title="(a) loss by position: state carried vs reset")
    axes[1].set(yscale="log", xlabel="tokens after the changed token", ylabel="||s - s'|| / ||s||",
                title="(b) a changed token fading from the state")
    axes[2].set(yscale="log", xlabel="tokens after the changed token", ylabel="KL(p || p') (nats)",
                title="(c) its effect on the next-token distribution")
    return save(fig, axes, png or out / "context_memory.png", dpi=120, legend_size=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(DEFAULT_FILE))
    ap.add_argument("--eval-file")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--recipe", action="append", default=[],
                    help="LABEL=SPEC or SPEC (a preset or override file; label = its name); the first is the base")
    ap.add_argument("--no-lstm", action="store_true", help="skip the LSTM sized to the base recipe (label lstm)")
    ap.add_argument("--best-epochs", type=int, default=60)
    ap.add_argument("--seeds", default="0", help="seeds of every recipe")
    ap.add_argument("--baseline-seeds", help="seeds of the base recipe and the LSTM (default: --seeds)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--workdir", default=str(ROOT / ".context_memory_runs"), help="run folders (checkpoints)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "context_memory"))
    ap.add_argument("--show", help="comma-separated models to plot (default: base, best option on dev, lstm)")
    ap.add_argument("--plot-only", action="store_true", help="redraw from the CSVs in --out")
    ap.add_argument("--png", help="where the figure goes (default: --out/context_memory.png)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        run(args, out)
    screen = pd.read_csv(out / "screen.csv")
    models = args.show.split(",") if args.show else choose(screen, base=screen.recipe.iloc[0])
    print(f"plot: {plot(out, models, Path(args.png) if args.png else None)} ({', '.join(models)})")


def run(args, out: Path) -> None:
    specs = [(s.partition("=")[0], s.partition("=")[2]) if "=" in s else (Path(s).stem, s)
             for s in (args.recipe or ["base=best_wikitext_10k"])]
    recipes = [(label, load_recipe(spec)) for label, spec in specs]
    train_lines, dev_lines, eval_lines = load_splits(args)
    tok = WordTokenizer.train([x for x in train_lines if x.strip()], args.vocab)
    data = (tok, train_lines, dev_lines, eval_lines)
    seeds = [int(s) for s in args.seeds.split(",")]
    base_seeds = [int(s) for s in (args.baseline_seeds or args.seeds).split(",")]
    calls = []
    for k, (label, rc) in enumerate(recipes):
        mc = dataclasses.replace(rc.model, vocab_size=tok.vocab_size)
        tc = dataclasses.replace(rc.train, epochs=args.best_epochs, show_progress=False)
        for sd in base_seeds if k == 0 else seeds:
            calls.append((label, mc, tc, rc.data.max_seq_length, sd))
        if k == 0 and not args.no_lstm:
            lstm = matched_config(mc, "lstm")
            calls += [("lstm", lstm, tc, rc.data.max_seq_length, sd) for sd in base_seeds]
    for name in ("screen.csv", "position.csv", "fade.csv"):
        (out / name).unlink(missing_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count()
    print(f"{len(calls)} runs, {args.best_epochs} epochs each, on {max(gpus, 1)} {device} device(s)", flush=True)

    def record(k: int, got) -> None:  # as each run ends, so a time limit keeps what finished
        if isinstance(got, BaseException):
            raise got
        row, pos, fade = got
        print(row, flush=True)
        _append(out / "screen.csv", pd.DataFrame([row]))
        _append(out / "position.csv", pos)
        _append(out / "fade.csv", fade)

    spread(train_and_measure, [(label, mc, tc, seq, data, device, str(Path(args.workdir) / str(k)), sd)
                               for k, (label, mc, tc, seq, sd) in enumerate(calls)], args.jobs, on_done=record)
    screen = pd.read_csv(out / "screen.csv")
    order = {label: k for k, (label, _) in enumerate(recipes + [("lstm", None)])}
    screen = screen.sort_values(["recipe", "seed"], key=lambda s: s.map(order) if s.name == "recipe" else s)
    screen.to_csv(out / "screen.csv", index=False)
    cols = ["recipe", "seed", "params", "dev_ppl", "eval_ppl", "epochs", "best_epoch", "train_s", "path"]
    print(screen[cols].to_string(index=False))


if __name__ == "__main__":
    main()

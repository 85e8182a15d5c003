"""What the notebooks call to train, sweep, grow and tabulate; widgets, plots and Colab set-up sit beside it.

This is the notebooks' entry point, so smoke mode (``NEWLLM_SMOKE=1``, set by the tests) is applied
here and nowhere below: every helper that starts training passes the pipeline an already-shrunk
config (``smoke_sized``).

Progress bars: the trainer draws them with ``tqdm.auto`` unless given another class. In a notebook that
is a widget per bar; a finished per-epoch bar (``leave=False``) closes its widget, and a closed widget left
in the saved cell output shows "Error displaying widget: model not found" after a page reload. The helpers
here pass the trainer ``LabelledBar``, a subclass that prefixes each bar with the run it belongs to and,
when a ``leave=False`` bar closes, also removes its output from the cell.
"""

from __future__ import annotations

import contextlib
import html
import shutil
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
import torch
from tqdm.auto import tqdm as auto_tqdm

from ..config import STATE_NORMS, RunConfig, apply_overrides, is_smoke, shrink_for_smoke
from ..data.batching import WindowData, instruction_sequences, wikitext_stream
from ..data.corpus import expand_paths
from ..data.pipeline import prepare
from ..data.prompt import instruction_prompt
from ..data.sources import is_sample, load_wikitext, source_tag
from ..data.token_cache import cache_root
from ..experiments.experiment import RunResult, keyed_run_dir, run_experiment
from ..experiments.growth import growth_experiment
from ..experiments.memory import loss_by_position, perturbation_fade
from ..experiments.sweep import run_sweep
from ..runtime.stopping import Interrupted
from ..train.metrics import evaluate
from .colab import runs_root
from .plots import LivePlot

__all__ = ["smoke_sized", "corpus_budget", "train_live", "sweep_live", "option_sweep_live",
           "CELL_OPTIONS",
           "grow_live", "category_table", "latest_checkpoint",
           "text_table", "instruction_prompt", "labelled_progress"]


def smoke_sized(cfg: RunConfig) -> RunConfig:
    """``cfg`` as the notebook runs it: shrunk (at most 2 epochs, a capped data sample) under
    ``NEWLLM_SMOKE=1``, unchanged otherwise."""
    return shrink_for_smoke(cfg) if is_smoke() else cfg


# Corpora whose size is known before reading them: MB of text (the hub's parquet, decompressed).
KNOWN_CORPORA = {("Salesforce/wikitext", "wikitext-2-raw-v1"): 13, ("Salesforce/wikitext", "wikitext-103-raw-v1"): 540,
                 ("roneneldan/TinyStories", None): 2000}
# Measured on WikiText text (benchmarks/RESULTS.md, "Preparing a corpus"): tokens per MB and MB/s on 2 cores.
TOKENS_PER_MB = {"word": 195_000, "bpe": 371_000}
TOKENIZE_MB_S = {"word": 17.5, "bpe": 2.2}
SESSION_HOURS = 12  # a Colab session's limit without Pro


def corpus_budget(cfg: RunConfig) -> str:
    """One line, before anything is read: a text corpus's size, its token cache on disk, the index in memory
    and the time to tokenize it, against this runtime's free disk and memory; "exceeds" where one would not
    fit (an estimate from measured rates, so it is said before the work starts, not after it crashes)."""
    d = cfg.data
    if d.dataset != "text":
        return ""
    name = d.path or " ".join(x for x in (d.hub_name, d.hub_config) if x)
    if d.path:
        mb = sum(f.stat().st_size for f in expand_paths(d.path)) / 1e6
    else:
        mb = KNOWN_CORPORA.get((d.hub_name, d.hub_config))
    if mb is None:
        return f"text corpus {name}: size not known before reading it (the progress bar shows MB/s as it goes)"
    tokens = mb * TOKENS_PER_MB[d.tokenizer]
    disk = tokens * (2 if cfg.model.vocab_size <= 1 << 16 else 4) / 1e9
    ram = tokens / max(1, d.max_seq_length // 2) * 16 / 1e9 if d.mode == "windows" else tokens * 1e-9
    hours = mb / TOKENIZE_MB_S[d.tokenizer] / 3600
    root = cache_root(d.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free / 1e9
    avail = _available_ram_gb()
    over = [what for what, bad in (("disk", disk > free), ("memory", avail is not None and ram > avail),
                                   ("time", hours > SESSION_HOURS)) if bad]
    line = (f"text corpus {name}: about {mb:,.0f} MB of text -> ~{tokens / 1e6:,.0f}M {d.tokenizer} tokens, a "
            f"~{disk:.1f} GB token cache in {root} ({free:.0f} GB free), ~{ram:.2f} GB of index in memory"
            f"{f' ({avail:.0f} GB available)' if avail is not None else ''}, ~{hours * 60:.0f} min to tokenize "
            f"once on 2 cores")
    if over:
        line += (f". EXCEEDS this runtime's {' and '.join(over)}: use --tokenizer-sample-mb, fewer files, or a "
                 f"cache folder with more room (cache_dir)")
    return line


def _available_ram_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("MemAvailable")) / 1e6
    except (OSError, StopIteration, ValueError):
        return None


def smoke_epochs(epochs: int, cap: int = 1) -> int:
    """An epoch count from a slider, capped at ``cap`` under ``NEWLLM_SMOKE=1``."""
    return min(epochs, cap) if is_smoke() else epochs


RESUME_HINT = "run this cell again to resume"

# -- progress bars --------------------------------------------------------------------------------------------
_runs: list[dict] = []  # the innermost labelled_progress block's label and new-run hook (blocks may nest)


def _bar_class(base: type) -> type:
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:  # pragma: no cover - tqdm without its notebook module
        notebook_tqdm = None
    widget_bars = notebook_tqdm is not None and issubclass(base, notebook_tqdm)

    class LabelledBar(base):
        """A tqdm.auto bar named after its run; a transient (``leave=False``) widget bar leaves no output."""

        def __init__(self, *args, **kwargs):
            leave = kwargs.get("leave", True)
            if _runs and leave and _runs[-1]["on_run"] is not None:
                _runs[-1]["on_run"]()  # a bar that stays is a trainer's epochs bar: a new run starts
            if _runs and _runs[-1]["label"] and kwargs.get("desc"):
                kwargs["desc"] = f"{_runs[-1]['label']} · {kwargs['desc']}"
            self._slot = None
            transient = widget_bars and not leave and not kwargs.get("disable", False)
            if transient:
                kwargs["display"] = False
            super().__init__(*args, **kwargs)
            if transient and getattr(self, "container", None) is not None:
                self._slot = _display_replaceable(self.container)
                self.displayed = True
            if getattr(self, "container", None) is not None:
                # A long run label keeps to one line, and the bar keeps a bar's width: where both do not fit,
                # the bar wraps below the label (ipywidgets 7 would otherwise squeeze it to a few pixels).
                self.container.children[0].layout.flex = "0 0 auto"
                self.container.children[1].layout.min_width = "160px"
                self.container.layout.flex_flow = "row wrap"

        def close(self):
            super().close()
            if self._slot is not None:
                self._slot.update({"text/plain": ""}, raw=True)  # the cell keeps no view of a closed widget
                self._slot = None

    return LabelledBar


def _display_replaceable(widget):
    """Show ``widget`` under a display id and return the handle that can replace it.

    ``display(widget, display_id=True)`` does not do this on ipywidgets 7 (Colab's): its widgets display
    themselves through ``display(data, raw=True)``, which drops the id, so a later update names an output
    the front end never received. The widget's view bundle is built here and sent raw with the id, which
    both ipywidgets 7 and 8 front ends render."""
    from IPython.display import display

    bundle = widget._repr_mimebundle_() if hasattr(widget, "_repr_mimebundle_") else None  # ipywidgets 8
    if not bundle:  # ipywidgets 7 builds the same bundle inside _ipython_display_
        bundle = {"text/plain": repr(widget),
                  "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                               "model_id": widget.model_id}}
    return display(bundle, raw=True, display_id=True)


LabelledBar = _bar_class(auto_tqdm)


@contextlib.contextmanager
def labelled_progress(label: Optional[str] = None,
                      on_run: Optional[Callable[[], None]] = None) -> Iterator[Callable[[str], None]]:
    """While inside, ``LabelledBar`` bars (pass ``progress=LabelledBar`` to the trainer) are prefixed with the
    current label; ``on_run`` is called as each training run opens its epochs bar. Yields a function that
    sets the label (for runs that start one after another)."""
    _runs.append({"label": label or "", "on_run": on_run})

    def set_label(text: str) -> None:
        _runs[-1]["label"] = text

    try:
        yield set_label
    finally:
        _runs.pop()


# -- training ---------------------------------------------------------------------------------------------------
def _on_sample(title: str, prepared) -> str:
    """A plot title that says when the run reads the bundled sample instead of the dataset it names."""
    return f"{title} · bundled sample" if is_sample(prepared.source) else title


def train_live(cfg: RunConfig, name: str, title: str = "") -> RunResult:
    """Train ``cfg`` with a live plot (per-step training loss from the first steps, validation per
    epoch) in the runs folder for these settings and data (``experiment.keyed_run_dir``, the CLI's rule):
    re-running with the same settings resumes, or reports a finished run; other settings start a new run.
    Prints one summary line at the end. Stopped (the Stop button, SIGTERM), it saves the current step and
    returns the partial result (``result.stopped``, ``result.checkpoint``) instead of raising."""
    cfg = smoke_sized(cfg)
    if cfg.data.dataset == "text":
        print(corpus_budget(cfg))
    prepared = prepare(cfg.data, cfg.model.vocab_size)
    print(prepared.summary())
    folder = keyed_run_dir(runs_root(), source_tag(name, prepared.source), cfg, prepared)
    title = _on_sample(title or name, prepared)
    live = LivePlot(title)
    with labelled_progress(title):
        try:
            res = run_experiment(cfg, folder, callbacks=[live.update], step_callbacks=[live.step],
                                 prepared=prepared, progress=LabelledBar)
        except Interrupted as e:  # Stop button / SIGTERM: the work is saved; hand back what there is
            print(e.message(RESUME_HINT))
            return e.result
    if len(res.history) != len(live.history):  # a resumed run: show the epochs from before the restart too
        live.history = list(res.history)
    live.draw()
    print(res.summary())
    print("checkpoint:", res.best_path)
    return res


def sweep_live(cfg: RunConfig, layers: Sequence[int], archs: Sequence[str] = ("newllm",),
               name: str = "sweep", label: str = "") -> pd.DataFrame:
    """The layer sweep (``sweep.run_sweep``, which keys each run's folder by its settings) with one labelled
    live plot and labelled progress bars per run; ``label`` goes before each run's own (what the sweep varies).
    Stopped, it returns the rows so far (the stopped run's row names its checkpoint)."""
    return _kept(lambda: _sweep(cfg, layers, archs, name, label))


def _kept(work: Callable):
    """``work()``; stopped by a signal, print the one stop line and return the partial result it carries."""
    try:
        return work()
    except Interrupted as e:
        print(e.message(RESUME_HINT))
        return e.result


def _sweep(cfg: RunConfig, layers: Sequence[int], archs: Sequence[str], name: str, label: str = "") -> pd.DataFrame:
    cfg = smoke_sized(cfg)
    runs = [(a, n) for a in archs for n in layers]
    with labelled_progress() as set_label:
        def on_run_start(arch: str, n: int):
            count = f" (run {runs.index((arch, n)) + 1}/{len(runs)})" if len(runs) > 1 else ""
            label_ = f"{label}{arch}, {n} layer{'s' if n > 1 else ''}{count}"
            set_label(label_)
            live = LivePlot(label_)
            return [live.update], [live.step]

        return run_sweep(cfg, layers, runs_root() / name, archs=list(archs), on_run_start=on_run_start,
                         progress=LabelledBar)


# The cell options a notebook can sweep, each with the values it offers (the first is the original's).
CELL_OPTIONS = {"state_norm": list(STATE_NORMS), "chrono_init": [0.0, 16.0, 64.0, 256.0],
                "gate_context": [False, True], "fnn_residual": ["none", "residual", "prenorm"],
                "gate_rank": [0, 64, 128], "slow_forget_bias": [0.0, 2.0, 4.0]}


def option_sweep_live(cfg: RunConfig, option: str, values: Sequence, layers: int = 1,
                      name: str = "option") -> pd.DataFrame:
    """Sweep one cell option (``CELL_OPTIONS``) the way ``sweep_live`` sweeps layers: one New-LLM run per value,
    each in its own keyed folder (a finished one is read back), one row per value with an ``option`` column."""
    if option not in CELL_OPTIONS:
        raise ValueError(f"unknown cell option {option!r}: choose one of {sorted(CELL_OPTIONS)}")

    def sweep_values() -> pd.DataFrame:
        frames = []
        for k, value in enumerate(values, 1):
            run_cfg = apply_overrides(cfg, **{f"model__{option}": value})
            try:
                df = _sweep(run_cfg, [layers], ["newllm"], f"{name}-{option}",
                            f"{option}={value} ({k}/{len(values)}) · ")
            except Interrupted as e:  # stop the whole sweep, keeping the rows so far
                frames.append(e.result.assign(option=option, value=str(value)))
                e.result = pd.concat(frames, ignore_index=True)
                raise
            frames.append(df.assign(option=option, value=str(value)))
        return pd.concat(frames, ignore_index=True)

    return _kept(sweep_values)


GROWTH_VARIANTS = ("no growth", "grow, freeze base", "grow, fine-tune all", "context {new_dim} from scratch")


def grow_live(result: RunResult, new_dim: int, extra_epochs: int, cfg: RunConfig,
              name: str = "growth") -> tuple[pd.DataFrame, dict]:
    """The context-growth experiment (``expansion.growth_experiment``): each variant trains with its own
    labelled live plot and progress bars. The experiment's folder is keyed by the base run's settings and
    data (``experiment.keyed_run_dir``) and named with ``new_dim`` and the extra epochs, so other settings
    start a new experiment. ``cfg`` is kept for callers; the base run's own config decides."""
    extra_epochs = smoke_epochs(extra_epochs)
    names = [v.format(new_dim=new_dim) for v in GROWTH_VARIANTS]
    tagged = source_tag(name, result.prepared.source)
    root = keyed_run_dir(runs_root(), f"{tagged}-{new_dim}-x{extra_epochs}", result.config, result.prepared)
    # One set of callbacks serves every variant, which train one after another; each opens its epochs bar
    # first, which is when the next label and live plot take over. (A variant that finished in an earlier
    # run opens no bar: on such a resume the labels of the later ones run one behind.)
    state = {"i": -1, "live": None}

    def next_run() -> None:
        state["i"] += 1
        label = f"{names[state['i']] if state['i'] < len(names) else 'run'} ({state['i'] + 1}/{len(names)})"
        set_label(label)
        state["live"] = LivePlot(label)

    def on_step(rec: dict) -> None:
        if state["live"] is not None:
            state["live"].step(rec)

    def on_epoch(rec: dict) -> None:
        if state["live"] is not None:
            state["live"].update(rec)

    with labelled_progress(on_run=next_run) as set_label:
        return _kept(lambda: growth_experiment(result, new_dim, extra_epochs, root, callbacks=[on_epoch],
                                               step_callbacks=[on_step], progress=LabelledBar))


def context_memory(result: RunResult, samples: int = 64) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the trained model's context vector remembers, on the run's validation text read as articles:
    loss by position (carried vs reset every 64 tokens) and how a changed token fades (``memory.py``)."""
    data = result.config.data
    source = "sample" if is_sample(result.prepared.source) else "hub"  # the run's own text, never another
    lines = load_wikitext(data.path, data.max_examples, source, data.hub_revision).valid
    tokens, resets = wikitext_stream(lines, result.tokenizer, reset_at_articles=True)
    model = result.model.eval()
    horizon = max(8, min(128, len(tokens) // 4))
    return (loss_by_position(model, tokens, resets),
            perturbation_fade(model, tokens, resets, warmup=min(32, horizon), horizon=horizon, samples=samples))


# -- evaluation and files ---------------------------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def category_table(model: torch.nn.Module, tokenizer, records: list, max_seq_length: int,
                   device: Union[str, torch.device, None] = None) -> pd.DataFrame:
    """Validation loss / PPL / accuracy per instruction category (token-weighted, non-PAD targets)."""
    device = device if device is not None else model_device(model)
    rows = []
    for cat in sorted({r.get("category", "unknown") for r in records}):
        recs = [r for r in records if r.get("category", "unknown") == cat]
        m = evaluate(model, WindowData(*instruction_sequences(recs, tokenizer, max_seq_length)), 256, device)
        rows.append({"category": cat, "examples": len(recs), "tokens": m["tokens"], "val_loss": round(m["loss"], 4),
                     "val_ppl": round(m["ppl"], 2), "val_acc_%": round(100 * m["acc"], 1)})
    return pd.DataFrame(rows).set_index("category")


def latest_checkpoint(prefix: str) -> Optional[Path]:
    """The newest ``best.safetensors`` under the runs folder whose run name starts with ``prefix``."""
    found = sorted(runs_root().glob(f"{prefix}*/best.safetensors"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# -- readable text tables ---------------------------------------------------------------------------------------
class TextTable:
    """A DataFrame shown whole: every cell's full text, wrapped at word boundaries, left-aligned and
    top-aligned (notebook front-ends right-align and pandas cuts cells at 50 characters). Only this
    table is affected; no pandas option changes. ``.frame`` is the DataFrame itself."""

    def __init__(self, frame: pd.DataFrame, max_width: int = 60, index: bool = False) -> None:
        self.frame, self.max_width, self.index = frame, max_width, index

    def _repr_html_(self) -> str:
        cell = ("text-align:left;vertical-align:top;white-space:pre-wrap;word-break:normal;"
                "overflow-wrap:anywhere;padding:4px 8px;border-bottom:1px solid #ddd;")
        width = f"max-width:{self.max_width * 0.6:.0f}em;"
        cols = ([self.frame.index.name or ""] if self.index else []) + [str(c) for c in self.frame.columns]
        head = "".join(f'<th style="{cell}font-weight:bold;">{html.escape(c)}</th>' for c in cols)
        body = []
        for idx, row in self.frame.iterrows():
            values = ([idx] if self.index else []) + list(row)
            body.append("<tr>" + "".join(f'<td style="{cell}{width}">{html.escape(str(v))}</td>' for v in values)
                        + "</tr>")
        return (f'<table style="border-collapse:collapse;table-layout:auto;margin:0;">'
                f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def __repr__(self) -> str:
        """Plain text: each row's fields on their own wrapped lines (for consoles and text-only outputs)."""
        out = []
        for idx, row in self.frame.iterrows():
            items = ([(self.frame.index.name or "index", idx)] if self.index else []) + list(row.items())
            for k, v in items:
                lines = textwrap.wrap(str(v), self.max_width) or [""]
                out.append(f"{k}: {lines[0]}")
                out += [" " * (len(str(k)) + 2) + line for line in lines[1:]]
            out.append("")
        return "\n".join(out).rstrip()


def text_table(data: Union[pd.DataFrame, dict, list], max_width: int = 60, index: bool = False) -> TextTable:
    """Show a table of text whole and wrapped (e.g. prompts and generated continuations)."""
    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    return TextTable(frame, max_width=max_width, index=index)

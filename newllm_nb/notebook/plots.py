"""Live training curves (updated in place, no output flood) and result tables / figures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator


def whole_number_ticks() -> MaxNLocator:
    """Ticks on whole numbers only (steps, epochs, layers), even where the axis spans a single one."""
    return MaxNLocator(integer=True, min_n_ticks=1)


HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_ppl", "val_acc", "tokens_per_s", "seconds", "lr"]

# The original's published WikiText-2 layer sweep (val PPL, accuracy %), for display beside ours.
ORIGINAL_SWEEP = pd.DataFrame({"layers": [1, 4, 5, 6, 7], "original_val_ppl": [20.4, 20.1, 20.5, 20.6, 21.8],
                           "original_acc_%": [38.0, 38.3, 38.3, 38.5, 37.9]})


def history_frame(history: Sequence[dict]) -> pd.DataFrame:
    """One row per epoch, rounded for reading."""
    df = pd.DataFrame(list(history))
    if df.empty:
        return df
    cols = [c for c in HISTORY_COLUMNS if c in df.columns]
    return df[cols].round({"train_loss": 4, "val_loss": 4, "val_ppl": 2, "val_acc": 4, "tokens_per_s": 0,
                           "seconds": 1}).set_index("epoch")


class LivePlot:
    """Training loss per step and validation loss / PPL per epoch, redrawn in one display slot.

    ``step`` takes the trainer's per-step records (``{"step", "epoch", "loss"}``), ``update`` its
    per-epoch history records. The figure is titled and labelled from the start, so a slow first epoch
    shows its training loss as it falls instead of empty axes. Redraws on steps are throttled to one
    every ``min_interval`` seconds (a redraw costs far more than a small training step). Outside IPython
    (scripts, the CLI) it only records.
    """

    def __init__(self, title: str = "", history: Optional[Sequence[dict]] = None, min_interval: float = 1.0) -> None:
        self.title = title
        self.history: list[dict] = list(history or [])
        self.steps: list[dict] = []
        self.epoch_end_step: dict[int, int] = {}  # epoch -> global step at its end, to put val loss on the step axis
        self.min_interval = min_interval
        self._last_draw = 0.0
        self.fig, (self.ax_loss, self.ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.4))
        plt.close(self.fig)  # we display it ourselves; keeps inline backends from showing it twice
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self._render()
                self._handle = display(self.fig, display_id=True)
        except ImportError:
            pass

    def step(self, record: dict) -> None:
        """Per-step callback: record the batch loss; redraw at most every ``min_interval`` seconds."""
        self.steps.append(record)
        if time.monotonic() - self._last_draw >= self.min_interval:
            self.draw()

    def update(self, record: dict) -> None:
        """Per-epoch callback: record the epoch and redraw."""
        self.history.append(record)
        if self.steps:
            self.epoch_end_step[record["epoch"]] = self.steps[-1]["step"]
        self.draw()

    def _steps_per_epoch(self) -> Optional[float]:
        if self.epoch_end_step:
            epoch, step = max(self.epoch_end_step.items())
            return step / epoch
        return None

    def _render(self) -> None:
        hist = pd.DataFrame(self.history)
        steps = pd.DataFrame(self.steps)
        for ax in (self.ax_loss, self.ax_ppl):
            ax.clear()
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(whole_number_ticks())  # steps and epochs are whole numbers
        spe = self._steps_per_epoch()
        if not steps.empty:
            self.ax_loss.plot(steps["step"], steps["loss"], color="C0", alpha=0.45, lw=0.9,
                              marker="." if len(steps) < 60 else None, label="train (per step)")
            if len(steps) >= 10:
                smooth = steps["loss"].rolling(max(2, len(steps) // 20), min_periods=1).mean()
                self.ax_loss.plot(steps["step"], smooth, color="C0", lw=1.6, label="train (smoothed)")
            self.ax_loss.set_xlabel("training step")
        else:
            self.ax_loss.set_xlabel("epoch" if not hist.empty else "training step")
        if not hist.empty:
            if not steps.empty and spe:  # validation on the step axis: at each epoch's last step
                x = [self.epoch_end_step.get(e, e * spe) for e in hist["epoch"]]
            else:
                x = hist["epoch"]
                if steps.empty:
                    self.ax_loss.plot(x, hist["train_loss"], "o-", color="C0", label="train (epoch)")
            self.ax_loss.plot(x, hist["val_loss"], "o-", color="C1", label="validation (epoch)")
            self.ax_ppl.plot(hist["epoch"], hist["val_ppl"], "o-", color="C2")
            self.ax_ppl.set_xlim(hist["epoch"].min() - 0.5, hist["epoch"].max() + 0.5)
            best = hist["val_ppl"].idxmin()
            self.ax_ppl.set_title(f"best val PPL {hist['val_ppl'][best]:.2f} (epoch {hist['epoch'][best]})",
                                  fontsize=9)
        else:
            self.ax_ppl.text(0.5, 0.5, "validation PPL appears\nafter the first epoch", ha="center", va="center",
                             transform=self.ax_ppl.transAxes, color="0.4")
            self.ax_ppl.set_xticks([])
            self.ax_ppl.set_yticks([])
        if steps.empty and hist.empty:
            self.ax_loss.text(0.5, 0.5, "training loss appears\nafter the first steps", ha="center", va="center",
                              transform=self.ax_loss.transAxes, color="0.4")
            self.ax_loss.set_xticks([])
            self.ax_loss.set_yticks([])
        else:
            self.ax_loss.legend(fontsize=8)
        self.ax_loss.set_ylabel("loss (token-weighted)")
        self.ax_ppl.set_xlabel("epoch")
        self.ax_ppl.set_ylabel("validation PPL")
        status = (f"epoch {int(self.steps[-1]['epoch'])}, step {int(self.steps[-1]['step'])}" if self.steps
                  else f"{len(self.history)} epochs" if self.history else "starting")
        self.fig.suptitle(f"{self.title} · {status}" if self.title else status)
        self.fig.tight_layout()

    def draw(self) -> None:
        self._render()
        self._last_draw = time.monotonic()
        if self._handle is not None:
            self._handle.update(self.fig)


def plot_sweep(df: pd.DataFrame):
    """Best val PPL vs layers and vs parameters, one line per model family, the original's table beside."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arch, g in df.groupby("arch"):
        g = g.sort_values("layers")
        a.plot(g["layers"], g["best_val_ppl"], "o-", label=arch)
        b.plot(g["params"], g["best_val_ppl"], "o-", label=arch)
    a.plot(ORIGINAL_SWEEP["layers"], ORIGINAL_SWEEP["original_val_ppl"], "k--", alpha=0.5, label="original (published)")
    a.set_xlabel("FNN layers")
    a.xaxis.set_major_locator(whole_number_ticks())
    b.set_xlabel("parameters")
    for ax in (a, b):
        ax.set_ylabel("best validation PPL")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    plt.close(fig)  # returned for display once, not also by the inline backend
    return fig


def plot_curves(df: pd.DataFrame, x: str = "epoch", y: str = "val_ppl", by: str = "variant", title: str = ""):
    """One line per ``by`` value (e.g. the context-expansion variants)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, g in df.groupby(by, sort=False):
        ax.plot(g[x], g[y], "o-", ms=3, label=name)
    ax.set_xlabel(x)
    if x in ("epoch", "step", "layers"):
        ax.xaxis.set_major_locator(whole_number_ticks())
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_context_memory(position: pd.DataFrame, fade: pd.DataFrame, title: str = ""):
    """Left: evaluation loss by position in the article, context carried vs reset (``memory.loss_by_position``).
    Right: how a change in one token fades from the state (``memory.perturbation_fade``), one line per model
    when the frames have a ``model`` column."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    pos_groups = position.groupby(["model", "context"] if "model" in position else ["context"], sort=False)
    for key, g in pos_groups:
        label = " · ".join(key) if isinstance(key, tuple) else key
        a.plot((g["position_lo"] + g["position_hi"]) / 2, g["loss"], "o-", ms=3, label=label)
    a.set_xscale("log")
    a.set_xlabel("position of the token in its article")
    a.set_ylabel("evaluation loss (nats)")
    a.set_title("what a carried context is worth", fontsize=10)
    for key, g in (fade.groupby("model", sort=False) if "model" in fade else [("this model", fade)]):
        b.plot(g["distance"], g["rel_diff"].clip(lower=1e-6), "-", label=key)
    b.set_yscale("log")
    b.set_xlabel("tokens after the changed one")
    b.set_ylabel("relative change of the state (floor 1e-6)")
    b.set_title("how fast one changed token fades", fontsize=10)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig

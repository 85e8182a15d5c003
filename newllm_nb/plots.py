"""Live training curves (updated in place, no output flood) and result tables / figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import matplotlib.pyplot as plt
import pandas as pd

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_ppl", "val_acc", "tokens_per_s", "seconds", "lr"]

# The seed's published WikiText-2 layer sweep (val PPL, accuracy %), for display beside ours.
SEED_SWEEP = pd.DataFrame({"layers": [1, 4, 5, 6, 7], "seed_val_ppl": [20.4, 20.1, 20.5, 20.6, 21.8],
                           "seed_acc_%": [38.0, 38.3, 38.3, 38.5, 37.9]})


def history_frame(history: Sequence[dict]) -> pd.DataFrame:
    """One row per epoch, rounded for reading."""
    df = pd.DataFrame(list(history))
    if df.empty:
        return df
    cols = [c for c in HISTORY_COLUMNS if c in df.columns]
    return df[cols].round({"train_loss": 4, "val_loss": 4, "val_ppl": 2, "val_acc": 4, "tokens_per_s": 0,
                           "seconds": 1}).set_index("epoch")


class LivePlot:
    """Loss and validation PPL per epoch, redrawn in one display slot. Use ``update`` as a trainer callback.

    Outside IPython (scripts, the CLI) it only records.
    """

    def __init__(self, title: str = "", history: Optional[Sequence[dict]] = None) -> None:
        self.title = title
        self.history: list[dict] = list(history or [])
        self.fig, (self.ax_loss, self.ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.4))
        plt.close(self.fig)  # we display it ourselves; keeps inline backends from showing it twice
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self._handle = display(self.fig, display_id=True)
        except ImportError:
            pass

    def update(self, record: dict) -> None:
        self.history.append(record)
        self.draw()

    def draw(self) -> None:
        df = pd.DataFrame(self.history)
        for ax in (self.ax_loss, self.ax_ppl):
            ax.clear()
            ax.grid(alpha=0.3)
            ax.set_xlabel("epoch")
        if not df.empty:
            self.ax_loss.plot(df["epoch"], df["train_loss"], "o-", label="train")
            self.ax_loss.plot(df["epoch"], df["val_loss"], "o-", label="validation")
            self.ax_loss.legend()
            self.ax_ppl.plot(df["epoch"], df["val_ppl"], "o-", color="C2")
            best = df["val_ppl"].idxmin()
            self.ax_ppl.set_title(f"best val PPL {df['val_ppl'][best]:.2f} (epoch {df['epoch'][best]})", fontsize=9)
        self.ax_loss.set_ylabel("loss (token-weighted)")
        self.ax_ppl.set_ylabel("validation PPL")
        self.fig.suptitle(self.title)
        self.fig.tight_layout()
        if self._handle is not None:
            self._handle.update(self.fig)


def plot_sweep(df: pd.DataFrame):
    """Best val PPL vs layers and vs parameters, one line per model family, the seed's table beside."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arch, g in df.groupby("arch"):
        g = g.sort_values("layers")
        a.plot(g["layers"], g["best_val_ppl"], "o-", label=arch)
        b.plot(g["params"], g["best_val_ppl"], "o-", label=arch)
    a.plot(SEED_SWEEP["layers"], SEED_SWEEP["seed_val_ppl"], "k--", alpha=0.5, label="seed (published)")
    a.set_xlabel("FNN layers")
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
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig

"""The benchmark scripts' figures: drawn headless, every axis gridded with its legend, written as a PNG."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union


def subplots(*args, **kwargs):
    """``plt.subplots`` on the Agg backend: benchmarks run on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, axes: Iterable, path: Union[str, Path], dpi: int = 110,
         legend_size: Optional[float] = None) -> Union[str, Path]:
    """A light grid and the legend on each of ``axes``, then the figure laid out and written to ``path``."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path

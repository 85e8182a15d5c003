"""Colab set-up: install only what is missing, optional Google Drive for checkpoints, run folders.

Never upgrades what Colab ships (torch, ipywidgets 7, pandas ...): upgrading ipywidgets to 8 there has
broken widget display (googlecolab/colabtools#3020).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

DRIVE_ROOT = Path("/content/drive/MyDrive/newllm-nb")


def in_colab() -> bool:
    return "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG") is not None


def requirements() -> list[tuple[str, str]]:
    """(pip requirement, import name) for what the package and its notebooks need: pyproject.toml's dependencies
    and its notebooks extra, read from the installed package's metadata (the set-up cell installs the package
    first, without its dependencies)."""
    out = []
    for req in importlib.metadata.requires("newllm-nb") or []:
        spec, _, marker = (part.strip() for part in req.partition(";"))
        if marker and marker.replace("'", '"') != 'extra == "notebooks"':
            continue
        name = re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0]
        out.append((spec, name.replace("-", "_")))
    return out


def missing_requirements() -> list[str]:
    """The requirements whose module is absent: installed only those, so Colab keeps what it ships."""
    return [req for req, mod in requirements() if importlib.util.find_spec(mod) is None]


def ensure_requirements() -> list[str]:
    """pip-install the requirements whose module is absent; returns what was installed."""
    missing = missing_requirements()
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    return missing


def runs_root() -> Path:
    """Where runs go: $NEWLLM_RUNS_DIR, else Drive when mounted, else ./runs."""
    if os.environ.get("NEWLLM_RUNS_DIR"):
        return Path(os.environ["NEWLLM_RUNS_DIR"])
    if DRIVE_ROOT.parent.exists():
        return DRIVE_ROOT / "runs"
    return Path.cwd() / "runs"


def mount_drive() -> Optional[Path]:
    if not in_colab():
        print("Google Drive is only available in Colab; checkpoints stay in", runs_root())
        return None
    from google.colab import drive  # type: ignore

    drive.mount("/content/drive")
    DRIVE_ROOT.mkdir(parents=True, exist_ok=True)
    print("checkpoints now go to", runs_root())
    return DRIVE_ROOT


def drive_checkbox():
    """A 'keep checkpoints on Google Drive' checkbox (default off); ticking it mounts Drive."""
    import ipywidgets as w

    box = w.Checkbox(value=False, description="Keep checkpoints on Google Drive",
                     style={"description_width": "initial"})

    def on_change(change):
        if change["new"]:
            mount_drive()

    box.observe(on_change, names="value")
    return box


if __name__ == "__main__":
    if sys.argv[1:] == ["--relink"]:
        sys.exit("--relink is now its own command: python -m newllm_nb.notebook.links")
    elif sys.argv[1:]:
        sys.exit("usage: python -m newllm_nb.notebook.colab")
    else:
        installed = ensure_requirements()
        print("installed: " + (", ".join(installed) if installed else "nothing (all present)"))

"""Colab set-up: install only what is missing, optional Google Drive for checkpoints, run folders.

Never upgrades what Colab ships (torch, ipywidgets 7, pandas ...): upgrading ipywidgets to 8 there has
broken widget display (googlecolab/colabtools#3020).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

# (pip requirement, import name): installed only when the import name is missing.
REQUIREMENTS = [("torch>=2.4", "torch"), ("datasets>=2.14", "datasets"), ("ipywidgets>=7.7", "ipywidgets"),
                ("matplotlib>=3.6", "matplotlib"), ("pandas>=1.5", "pandas"), ("tqdm>=4.64", "tqdm"),
                ("safetensors>=0.4", "safetensors"), ("tokenizers>=0.15", "tokenizers")]
DRIVE_ROOT = Path("/content/drive/MyDrive/newllm-nb")


def in_colab() -> bool:
    return "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG") is not None


def missing_requirements() -> list[str]:
    return [req for req, mod in REQUIREMENTS if importlib.util.find_spec(mod) is None]


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


def run_dir(name: str, cfg=None) -> Path:
    """A run folder named after ``name`` and a hash of the settings: re-running a cell with the same
    settings resumes that run; changing a slider starts a new one (nothing is overwritten)."""
    if cfg is not None:
        from .config import smoke_config

        d = smoke_config(cfg).to_dict()
        d["train"].pop("show_progress", None)
        name = f"{name}-{hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]}"
    return runs_root() / name


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
    installed = ensure_requirements()
    print("installed: " + (", ".join(installed) if installed else "nothing (all present)"))

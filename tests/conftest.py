import os
from pathlib import Path

import pytest

# Never wait ~26 s for an unreachable hub; never open windows.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
REAL_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture
def real_wikitext() -> Path:
    if not REAL_WIKITEXT.exists():
        pytest.skip(f"{REAL_WIKITEXT} absent")
    return REAL_WIKITEXT


@pytest.fixture(autouse=True)
def _no_smoke(monkeypatch):
    # Unit tests control sizes themselves; only notebook / CLI tests run in smoke mode.
    monkeypatch.delenv("NEWLLM_SMOKE", raising=False)

"""Shared test set-up: offline hub, no windows, and tiny configs / data / trainers on the bundled sample."""

import os
from pathlib import Path

import pytest
import torch

# Never wait ~26 s for an unreachable hub; never open windows.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from newllm_nb import preset  # noqa: E402
from newllm_nb.config import RunConfig, apply_overrides  # noqa: E402
from newllm_nb.data import Prepared, prepare  # noqa: E402
from newllm_nb.models.build import build_model  # noqa: E402
from newllm_nb.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REAL_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

TINY = dict(model__vocab_size=200, model__embed_dim=16, model__context_dim=16, model__hidden_dim=32,
            data__max_seq_length=16, data__max_examples=60, train__batch_size=16, train__lr=5e-3,
            train__epochs=3, train__patience=10)


def tiny_config(**overrides) -> RunConfig:
    """A seconds-long run on the bundled WikiText sample: the smoke preset, smaller, then ``overrides``."""
    return preset("smoke", **{**TINY, **overrides})


def make_trainer(cfg: RunConfig, prepared: Prepared, run_dir=None, seed=None, **kw) -> Trainer:
    """prepare -> vocab from the tokenizer -> seed -> model -> Trainer, as run_experiment does."""
    cfg = apply_overrides(cfg, model__vocab_size=prepared.tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return Trainer(build_model(cfg.model), prepared.train, prepared.valid, cfg, prepared.tokenizer, run_dir, **kw)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def tiny_prepared() -> Prepared:
    return prepare(tiny_config().data, 200)


@pytest.fixture
def make():
    return make_trainer


@pytest.fixture
def real_wikitext() -> Path:
    if not REAL_WIKITEXT.exists():
        pytest.skip(f"{REAL_WIKITEXT} absent")
    return REAL_WIKITEXT

"""A checkpoint written before the "seed" -> "original" rename (its config says ``clip="seed"`` and
``seed_compatible``) still loads, generates and evaluates exactly as it did when it was written.

tests/fixtures/checkpoint_before_rename.safetensors: preset seed_wikitext at tiny dims, one epoch on the
bundled WikiText sample; checkpoint_before_rename.json holds what that code generated and measured."""

import json
from pathlib import Path

import pytest

from newllm_nb.config import RunConfig
from newllm_nb.data import prepare
from newllm_nb.infer.generate import generate
from newllm_nb.train.checkpoint import load_model
from newllm_nb.train.metrics import evaluate

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_before_rename.safetensors"
EXPECTED = json.loads(FIXTURE.with_suffix(".json").read_text())


def test_checkpoint_from_before_the_rename_loads_generates_and_evaluates():
    model, tokenizer, ckpt = load_model(FIXTURE)
    assert generate(model, tokenizer, "the", max_new_tokens=8, temperature=0.0) == EXPECTED["generated"]
    cfg = RunConfig.from_dict(ckpt.config)
    data = prepare(cfg.data, cfg.model.vocab_size)
    m = evaluate(model, data.valid, 16, "cpu", "fp32", True)
    assert m["tokens"] == EXPECTED["metrics"]["tokens"]
    for k in ("loss", "acc"):
        assert m[k] == pytest.approx(EXPECTED["metrics"][k], rel=1e-4)

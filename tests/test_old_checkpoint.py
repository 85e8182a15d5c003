"""A checkpoint written before the "seed" -> "original" rename (its config says ``clip="seed"`` and
``seed_compatible``) still loads, generates and evaluates exactly as it did when it was written.

tests/fixtures/checkpoint_before_rename.safetensors: preset seed_wikitext at tiny dims, one epoch on the
bundled WikiText sample; checkpoint_before_rename.json holds what that code generated and measured."""

import json
from pathlib import Path

import pytest

from newllm_nb import cli, preset
from newllm_nb.config import RunConfig, TrainConfig
from newllm_nb.data import prepare
from newllm_nb.infer.generate import generate
from newllm_nb.train.checkpoint import load_model
from newllm_nb.train.metrics import evaluate
from newllm_nb.train.runs import run_fingerprint

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_before_rename.safetensors"
EXPECTED = json.loads(FIXTURE.with_suffix(".json").read_text())


def test_checkpoint_from_before_the_rename_loads_generates_and_evaluates(capsys):
    model, tokenizer, ckpt = load_model(FIXTURE)
    assert ckpt.config["train"]["clip"] == "seed" and ckpt.config["train"]["seed_compatible"] is True
    assert generate(model, tokenizer, "the", max_new_tokens=8, temperature=0.0) == EXPECTED["generated"]
    cfg = RunConfig.from_dict(ckpt.config)
    assert cfg.train.clip == "original" and cfg.train.original_metrics is True
    data = prepare(cfg.data, cfg.model.vocab_size)
    # Same fingerprint as when it was written: its run folder keeps its name and the run resumes.
    assert run_fingerprint(cfg, data.train, data.valid, tokenizer) == ckpt.fingerprint
    m = evaluate(model, data.valid, 16, "cpu", "fp32", True)
    assert m["tokens"] == EXPECTED["metrics"]["tokens"]
    for k in ("loss", "acc"):
        assert m[k] == pytest.approx(EXPECTED["metrics"][k], rel=1e-4)


def test_former_names_work_and_each_says_its_new_name_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr("newllm_nb.config._told", set())
    assert preset("seed_wikitext") == preset("original_wikitext")
    assert TrainConfig(clip="seed").clip == "original"
    assert RunConfig.from_dict({"train": {"seed_compatible": True}}).train.original_metrics
    args = cli._parser().parse_args(cli._current_names(["train", "--preset=seed_dolly", "--seed-compatible"]))
    assert (args.preset, args.original_metrics) == ("original_dolly", True)
    args = cli._parser().parse_args(cli._current_names(["train", "--preset", "seed_dolly"]))
    assert args.preset == "original_dolly"
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["note: 'seed_wikitext' is now called 'original_wikitext'; the old name still works",
                     "note: \"clip='seed'\" is now called \"clip='original'\"; the old name still works",
                     "note: 'seed_compatible' is now called 'original_metrics'; the old name still works",
                     "note: 'seed_dolly' is now called 'original_dolly'; the old name still works",
                     "note: '--seed-compatible' is now called '--original-metrics'; the old name still works"]

"""benchmarks/quality.py end to end on the bundled sample (CPU, one epoch): seeds repeat runs, seed 0 is
the seedless run, the mean / std table summarises them, and --recipe / --set choose the "best" rows'
recipe from presets and override files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "wikitext-sample" / "wiki.train.raw"
pytestmark = pytest.mark.skipif(not SAMPLE.exists(), reason="bundled WikiText sample missing")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """The sample's first third: the rows below train on it and are compared with each other, not with a number."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("quality") / "wiki.train.raw"
    path.write_text("".join(lines[:len(lines) // 3]), encoding="utf-8")
    return path


def _run(text: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--file", str(text), "--vocab", "300",
           "--runs", "newllm-best-L1", "--best-epochs", "1", "--device", "cpu", "--no-append", *extra]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=600)


def _rows(out: str) -> list[dict]:
    import ast

    return [ast.literal_eval(line) for line in out.splitlines() if line.startswith("{'")]


@pytest.fixture(scope="module")
def plain(text):
    out = _run(text).stdout
    return _rows(out)[0], out


def test_seeds_repeat_runs_and_seed_zero_is_the_default_run(plain, text):
    seeded_out = _run(text, "--seeds", "0,1").stdout
    seeded = _rows(seeded_out)
    assert [r["seed"] for r in seeded] == [0, 1]
    assert seeded[0]["eval_ppl"] == plain[0]["eval_ppl"]  # seed 0 reproduces the seedless run
    assert seeded[1]["eval_ppl"] != seeded[0]["eval_ppl"]  # another seed is another run
    assert "eval_ppl_std" in seeded_out and "eval_ppl_std" not in plain[1]


def test_recipes_are_presets_or_override_files(plain, text, tmp_path):
    # vocab 300 takes the best_wikitext preset by default: a file based on it that changes nothing gives
    # the same row; a file or --set that changes a field gives another.
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"base": "best_wikitext", "train": {"lr": 2e-3}}))
    other = tmp_path / "other.toml"
    other.write_text('base = "best_wikitext"\n[model]\ndropout = 0.1\n')
    rows = {r["recipe"]: r for r in _rows(_run(text, "--recipe", str(same), "--recipe", str(other)).stdout)}
    assert rows[str(same)]["eval_ppl"] == plain[0]["eval_ppl"]
    assert rows[str(other)]["eval_ppl"] != plain[0]["eval_ppl"]
    assert _rows(_run(text, "--set", "model.dropout=0.1").stdout)[0]["eval_ppl"] == rows[str(other)]["eval_ppl"]


@pytest.mark.parametrize("args,expected", [
    (("--recipe", "no-such-recipe"), "neither a preset"),
    (("--set", "model.no_such_field=1"), "no_such_field"),
    (("--set", "dropout"), "section.field=value"),
])
def test_bad_recipes_are_refused_before_training(args, expected, text):
    bad = _run(text, *args, check=False)
    assert bad.returncode == 2 and expected in bad.stderr and "Traceback" not in bad.stderr


def test_a_recipe_of_another_depth_gets_its_own_row_and_the_L1_row_says_it_differs(text, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps({"base": "best_wikitext", "model": {"num_layers": 2, "fnn_residual": "residual"}}))
    out = _run(text, "--recipe", str(deep), "--runs", "newllm-best-L1,newllm-best-L2").stdout
    assert "note: recipe" in out and "newllm-best-L2 row" in out
    rows = {r["run"]: r for r in _rows(out)}
    assert set(rows) == {"newllm-best-L1", "newllm-best-L2"} and rows["newllm-best-L2"]["params"] > rows[
        "newllm-best-L1"]["params"]

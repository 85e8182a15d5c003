"""Every notebook executes headless in smoke mode (through nbmake), stays paired with its .py, and is
committed without outputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = ["00_setup", "01_wikitext", "02_dolly", "03_layer_sweep", "04_chat"]


def test_all_five_notebooks_exist_as_pairs():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    assert sorted(p.stem for p in NB_DIR.glob("*.py")) == EXPECTED


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_and_py_are_in_sync(nb):
    jupytext = pytest.importorskip("jupytext")
    a, b = jupytext.read(nb), jupytext.read(nb.with_suffix(".py"))
    assert _cells(a) == _cells(b), f"{nb.name} and {nb.with_suffix('.py').name} drifted: run `jupytext --sync`"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(nb):
    nbformat = pytest.importorskip("nbformat")
    for cell in nbformat.read(nb, as_version=4).cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{nb.name} carries outputs"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    # One folder for the whole session: 04_chat finds the checkpoint 02_dolly wrote.
    return tmp_path_factory.mktemp("notebook-runs")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_in_smoke_mode(nb, runs_dir):
    pytest.importorskip("nbmake")
    env = dict(os.environ, NEWLLM_SMOKE="1", NEWLLM_RUNS_DIR=str(runs_dir), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=240", "-q",
                        "-p", "no:cacheprovider", str(nb)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_training_panel_reads_widget_values_into_a_valid_config():
    pytest.importorskip("ipywidgets")
    from newllm_nb.widgets import TrainingPanel, parse_field_map

    p = TrainingPanel("seed_dolly")
    cfg = p.config()
    assert cfg.data.dataset == "dolly" and cfg.model.num_layers == 1 and cfg.data.max_seq_length == 128
    p.layers.value, p.seq.value, p.seed_lr.value, p.lr.value = 3, 64, False, 1e-3
    p.source.value, p.path.value, p.field_map.value = "path", "x.jsonl", "context=input, response=output"
    p.tokenizer.value = "bpe"
    cfg = p.config()
    assert (cfg.model.num_layers, cfg.data.max_seq_length, cfg.data.dataset, cfg.data.tokenizer) == \
        (3, 64, "instruct", "bpe")
    assert cfg.data.field_map == {"context": "input", "response": "output"} and cfg.train.lr == pytest.approx(1e-3)
    p.path.value = ""
    with pytest.raises(ValueError, match="path="):
        p.config()
    with pytest.raises(ValueError, match="field_map="):
        parse_field_map("answer=output")


def test_recipe_dropdown_refills_the_panel_from_the_chosen_preset():
    pytest.importorskip("ipywidgets")
    from newllm_nb.config import preset
    from newllm_nb.widgets import TrainingPanel

    p = TrainingPanel("seed_wikitext")
    assert set(p.recipe.options) == {"seed_wikitext", "best_wikitext", "best_wikitext_10k"}
    seed_batch = p.config().train.batch_size  # the seed recipe takes this machine's batch
    for name in ("best_wikitext", "best_wikitext_10k"):
        p.recipe.value = name
        cfg, best = p.config(), preset(name)
        assert (cfg.model, cfg.data, cfg.train) == (best.model, best.data, best.train)  # measured recipe kept whole
    assert (p.input_dropout.value, p.output_dropout.value, p.vocab.value) == (0.5, 0.5, 10000)
    p.ema.value, p.tie.value, p.context_dropout.value, p.output_dropout.value = 0.0, False, 0.1, 0.0
    cfg = p.config()
    assert (cfg.train.ema_decay, cfg.model.tie_embeddings, cfg.model.context_dropout) == (0.0, False, 0.1)
    assert (cfg.model.input_dropout, cfg.model.output_dropout) == (0.5, 0.0)  # an explicit 0 is kept
    p.recipe.value = "seed_wikitext"
    cfg, seed = p.config(), preset("seed_wikitext")
    assert (cfg.model, cfg.data) == (seed.model, seed.data)  # unset input/output dropout stays unset (None)
    assert cfg.train.lr is None and cfg.train.batch_size == seed_batch and cfg.train.ema_decay == 0.0

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
    # One folder for the whole test run: 04_chat finds the checkpoint 02_dolly wrote.
    return tmp_path_factory.mktemp("notebook-runs")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_in_smoke_mode(nb, runs_dir):
    pytest.importorskip("nbmake")
    env = dict(os.environ, NEWLLM_SMOKE="1", NEWLLM_RUNS_DIR=str(runs_dir), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    # A cell's limit catches a hang; 03's five-run sweep cell needs over 240 s on 2 cores shared with other work.
    r = subprocess.run([sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=600", "-q",
                        "-p", "no:cacheprovider", str(nb)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_training_panel_reads_widget_values_into_a_valid_config():
    pytest.importorskip("ipywidgets")
    from newllm_nb.notebook.widgets import TrainingPanel, parse_field_map

    p = TrainingPanel("original_dolly")
    cfg = p.config()
    assert cfg.data.dataset == "dolly" and cfg.model.num_layers == 1 and cfg.data.max_seq_length == 128
    p.layers.value, p.seq.value, p.original_lr.value, p.lr.value = 3, 64, False, 1e-3
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
    from newllm_nb.notebook.widgets import TrainingPanel

    p = TrainingPanel("original_wikitext")
    assert set(p.recipe.options) == {"original_wikitext", "best_wikitext", "best_wikitext_10k", "newllm_plus",
                                     "newllm_plus_10k"}
    original_batch = p.config().train.batch_size  # the original recipe takes this machine's batch
    for name in ("newllm_plus_10k", "best_wikitext", "best_wikitext_10k"):
        p.recipe.value = name
        cfg, best = p.config(), preset(name)
        assert (cfg.model, cfg.data, cfg.train) == (best.model, best.data, best.train)  # measured recipe kept whole
    assert (p.input_dropout.value, p.output_dropout.value, p.vocab.value) == (0.5, 0.5, 10000)
    p.ema.value, p.tie.value, p.context_dropout.value, p.output_dropout.value = 0.0, False, 0.1, 0.0
    cfg = p.config()
    assert (cfg.train.ema_decay, cfg.model.tie_embeddings, cfg.model.context_dropout) == (0.0, False, 0.1)
    assert (cfg.model.input_dropout, cfg.model.output_dropout) == (0.5, 0.0)  # an explicit 0 is kept
    p.recipe.value = "original_wikitext"
    cfg, original = p.config(), preset("original_wikitext")
    assert (cfg.model, cfg.data) == (original.model, original.data)  # unset input/output dropout stays unset (None)
    assert cfg.train.lr is None and cfg.train.batch_size == original_batch and cfg.train.ema_decay == 0.0


def test_sweep_panel_leaves_out_the_layer_slider_it_does_not_use():
    pytest.importorskip("ipywidgets")
    from newllm_nb.notebook.widgets import TrainingPanel

    def shown(widget):
        return [widget] + [x for child in getattr(widget, "children", ()) for x in shown(child)]

    p = TrainingPanel("original_wikitext", hide=("layers",))
    assert p.layers not in shown(p.widget) and p.epochs in shown(p.widget)
    assert p.config().model.num_layers == 4  # the recipe's value stays in the config
    full = TrainingPanel("original_wikitext")
    assert full.layers in shown(full.widget)
    with pytest.raises(ValueError, match="hide="):
        TrainingPanel("original_wikitext", hide=("layer",))


class _EchoSession:
    """Stands in for generate.ChatSession: replies 'echo <message>' in two pieces."""

    def __init__(self):
        from newllm_nb.infer.generate import Sampling

        self.sampling, self.turns = Sampling(), []

    def stream(self, message):
        yield "echo "
        yield message
        self.turns.append(message)

    def reset(self):
        self.turns = []


def _press_enter(text):
    text._handle_string_msg(None, {"event": "submit"}, [])  # what the browser sends when Enter is pressed


def test_chat_panel_sends_on_enter_with_the_whole_message_and_not_on_leaving_the_box():
    pytest.importorskip("ipywidgets")
    from newllm_nb.notebook.widgets import ChatPanel

    chat = ChatPanel(_EchoSession())
    assert chat.text.continuous_update is False and "starts here" in chat.transcript.value
    chat.text.value = "typed, then the box lost focus"  # a value committed without Enter sends nothing
    assert chat.session.turns == []
    # Enter: the submit message first, then the whole value (continuous_update=False sends it once).
    shown = []
    chat.transcript.observe(lambda change: shown.append(change["new"]), names="value")
    _press_enter(chat.text)
    chat.text.value = "Name three birds & <fish>"
    assert any("echo </div>" in v for v in shown), "the reply is not shown piece by piece as it streams"
    assert chat.session.turns == ["Name three birds & <fish>"] and chat.text.value == ""
    assert "echo Name three birds &amp; &lt;fish&gt;" in chat.transcript.value  # shown, escaped
    assert "max-height" in chat.transcript.value and "overflow-y:auto" in chat.transcript.value  # bounded box
    _press_enter(chat.text)  # Enter on an empty box sends nothing
    chat.text.value = "   "
    assert len(chat.session.turns) == 1
    chat.reset()
    assert chat.session.turns == [] and "starts here" in chat.transcript.value


def test_text_table_shows_whole_left_aligned_text_without_touching_pandas_options():
    import pandas as pd

    from newllm_nb.notebook.live import text_table

    long = "a continuation " * 12 + "that ends here"
    before = pd.get_option("display.max_colwidth")
    t = text_table({"prompt": ["the river is"], "continuation": [long + " <b>"]})
    html = t._repr_html_()
    assert long in html and "&lt;b&gt;" in html and "text-align:left" in html and "white-space:pre-wrap" in html
    assert "…" not in html and "..." not in html
    assert "that ends here" in repr(t) and pd.get_option("display.max_colwidth") == before


def test_every_badge_and_clone_line_names_the_one_repository():
    from newllm_nb.notebook import links
    from newllm_nb.repository import REPOSITORY, badge_url, clone_url

    assert links.stale_links() == [], "run `python -m newllm_nb.notebook.links`"
    for nb in NOTEBOOKS:
        for path in (nb, nb.with_suffix(".py")):
            text = path.read_text()
            assert badge_url(nb.stem) in text, f"{path.name} has no Colab badge for {REPOSITORY}"
            assert f"git clone -q --depth 1 {clone_url()} " in text, f"{path.name} clones another repository"
    fork = links.relink_text(NOTEBOOKS[1].read_text(), "someone/fork", "dev")
    assert REPOSITORY not in fork and "github/someone/fork/blob/dev/notebooks/01_wikitext" in fork
    assert "git clone -q --depth 1 -b dev https://github.com/someone/fork " in fork


def test_progress_bars_are_labelled_and_transient_widget_bars_leave_no_output(monkeypatch):
    pytest.importorskip("ipywidgets")
    import IPython.display

    from newllm_nb.notebook import live as notebook

    shown = []

    class Handle:
        def update(self, obj, raw=False):
            shown.append(("update", obj))

    def fake_display(obj, display_id=False, raw=False, **_):
        shown.append(("display", obj, raw, display_id))
        return Handle() if display_id else None

    monkeypatch.setattr(IPython.display, "display", fake_display)
    runs = []
    from tqdm.notebook import tqdm as widget_tqdm

    bar = notebook._bar_class(widget_tqdm)  # the class notebook.LabelledBar is where tqdm.auto picks widgets
    with notebook.labelled_progress("base", on_run=lambda: runs.append(1)) as set_label:
        set_label("grow, freeze base (2/4)")
        outer = bar(total=2, desc="epochs")
        inner = bar(total=3, desc="epoch 1", leave=False)
        assert outer.desc.startswith("grow, freeze base (2/4) · epochs") and runs == [1]  # only the outer bar
        inner.update(3)
        inner_id = inner.container.model_id
        inner.close()
        outer.close()
    assert bar(total=1, desc="later").desc == "later"  # outside the block: no label
    assert shown[-1] == ("update", {"text/plain": ""})  # the closed transient bar's output is emptied
    # The transient bar went out as its raw widget-view bundle under the display id (ipywidgets 7 drops an id
    # given with the widget object itself, and the update would then name an output the page never got).
    (sent,) = [s for s in shown if s[0] == "display" and s[3]]
    assert sent[2] and sent[1]["application/vnd.jupyter.widget-view+json"]["model_id"] == inner_id
    assert inner.container.comm is None and outer.container.comm is not None  # closed vs kept widget
    assert outer.container.children[1].layout.min_width == "160px"  # a long label cannot squeeze the bar away


def test_option_sweep_labels_each_run_with_its_option_value(monkeypatch):
    from types import SimpleNamespace

    import pandas as pd

    from newllm_nb.config import preset
    from newllm_nb.notebook import live as notebook

    labels, options = [], []
    monkeypatch.setattr(notebook, "LivePlot", lambda label: labels.append(label) or SimpleNamespace(
        update=None, step=None))

    def one_run(cfg, layers, out_dir, archs, on_run_start, progress):  # run_sweep, minus the training
        on_run_start(archs[0], layers[0])
        options.append(cfg.model.state_norm)
        return pd.DataFrame([{"arch": archs[0], "layers": layers[0]}])

    monkeypatch.setattr(notebook, "run_sweep", one_run)
    df = notebook.option_sweep_live(preset("smoke"), "state_norm", ["layernorm", "read"])
    assert labels == ["state_norm=layernorm (1/2) · newllm, 1 layer", "state_norm=read (2/2) · newllm, 1 layer"]
    assert options == ["layernorm", "read"] and list(df["value"]) == ["layernorm", "read"]


def test_live_plot_has_a_title_and_shows_training_loss_from_the_first_steps():
    from newllm_nb.notebook.plots import LivePlot

    live = LivePlot("New-LLM on WikiText-2")
    live.draw()
    assert live.fig._suptitle.get_text().startswith("New-LLM on WikiText-2")
    for s in range(1, 4):
        live.step({"step": s, "epoch": 1, "loss": 6.0 - s / 10})
    live.draw()
    ys = [list(line.get_ydata()) for line in live.ax_loss.get_lines()]
    assert [5.9, 5.8, 5.7] in [[round(y, 6) for y in ys_] for ys_ in ys]
    live.update({"epoch": 1, "train_loss": 5.8, "val_loss": 5.75, "val_ppl": 314.2})
    assert "314.20" in live.ax_ppl.get_title() and "epoch 1" in live.fig._suptitle.get_text()


def test_notebook_helpers_shrink_for_smoke_mode_only_when_it_is_on(monkeypatch):
    from newllm_nb.config import preset
    from newllm_nb.notebook.live import smoke_epochs, smoke_sized

    cfg = preset("original_wikitext")
    assert smoke_sized(cfg) == cfg and smoke_epochs(20) == 20
    monkeypatch.setenv("NEWLLM_SMOKE", "1")
    small = smoke_sized(cfg)
    assert small.train.epochs == 2 and small.data.max_examples and smoke_epochs(20) == 1


def test_training_panel_sets_the_cell_options_and_the_original_cell_by_default():
    pytest.importorskip("ipywidgets")
    from newllm_nb.notebook.widgets import TrainingPanel

    p = TrainingPanel("original_wikitext")
    assert p.config().model.original_cell  # every option off: the original's cell, on the fast path
    p.state_norm.value, p.chrono.value, p.gate_context.value = "read", 64, True
    p.fnn_residual.value, p.gate_rank.value, p.slow_forget.value = "residual", 128, 3.0
    m = p.config().model
    assert (m.state_norm, m.chrono_init, m.gate_context, m.fnn_residual, m.gate_rank, m.slow_forget_bias) == \
        ("read", 64.0, True, "residual", 128, 3.0)
    assert not m.original_cell

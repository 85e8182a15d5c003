"""Hyperparameter panels built from core ipywidgets only (sliders, dropdowns, checkboxes, text, boxes),
so they work on Colab's ipywidgets 7 and on 8.

The panel never runs anything: a plain notebook cell calls ``panel.config()`` to read the current
values, so headless execution simply uses the defaults.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

from ..config import PRESETS, STATE_NORMS, RunConfig, preset
from ..runtime.hardware import detect, recommend

STYLE = {"description_width": "140px"}
STATE_NORM_LABELS = {"layernorm": "LayerNorm (original)", "noaffine": "no affine", "none": "none",
                     "read": "only what the FNN reads"}


def _w():
    import ipywidgets  # lazy: the GPU box and scripts need not have it

    return ipywidgets


class TrainingPanel:
    """Widgets for model / data / training settings, pre-filled from a preset and this machine.

    The *recipe* dropdown lists the presets for the same dataset (e.g. the original's WikiText recipe and the
    package's measured one); choosing one re-fills every widget from it (it only sets values: the work
    still runs in a plain cell that calls ``config()``).
    """

    def __init__(self, preset_name: str = "original_wikitext", base: Optional[RunConfig] = None,
                 hide: Sequence[str] = ()) -> None:
        """``hide`` names settings another control decides (e.g. ``("layers",)`` under a layer sweep's
        checkboxes): they keep the recipe's value and are left out of the panel."""
        cfg = base or preset(preset_name)
        self.rec = recommend(detect())
        recipes = {n: preset(n) for n in PRESETS if n != "smoke"}
        names = [n for n, r in recipes.items() if r.data.dataset == cfg.data.dataset]
        if base is not None or preset_name not in names:
            names = [preset_name]
        self.recipe = _w().Dropdown(options=names, value=preset_name, description="recipe (preset)", style=STYLE,
                                    layout=_row(), disabled=len(names) == 1)
        # Widgets get their ranges here and their values from _fill(cfg) below, the one place that maps a
        # config onto the panel (the recipe dropdown calls it too).
        self._model_widgets()
        self._training_widgets({cfg.train.batch_size} | {recipes[n].train.batch_size for n in names if n in recipes})
        data_rows = self._data_widgets(cfg.data)
        self._option_widgets()
        self._fill(cfg)
        self.recipe.observe(lambda change: self._fill(preset(change["new"])), names="value")
        self.widget = self._layout(data_rows, hide)

    def _model_widgets(self) -> None:
        w, lay = _w(), _row()
        self.layers = w.IntSlider(min=1, max=8, description="FNN layers", style=STYLE, layout=lay)
        dims = [32, 64, 128, 256, 384, 512, 768, 1024]
        self.embed = w.Dropdown(options=dims, description="embed dim", style=STYLE, layout=lay)
        self.context = w.Dropdown(options=dims, description="context dim", style=STYLE, layout=lay)
        self.hidden = w.Dropdown(options=dims, description="hidden dim", style=STYLE, layout=lay)
        self.vocab = w.Dropdown(options=[500, 1000, 2000, 5000, 10000], description="vocab size", style=STYLE,
                                layout=lay)
        self.dropout = w.FloatSlider(min=0.0, max=0.7, step=0.05, description="dropout", style=STYLE, layout=lay)
        self.context_dropout = w.FloatSlider(min=0.0, max=0.7, step=0.05, description="context dropout",
                                             style=STYLE, layout=lay)
        # Dropout off the recurrent path; 0 on a recipe that leaves it unset keeps each family's own placement.
        self.input_dropout = w.FloatSlider(min=0.0, max=0.7, step=0.05, description="input dropout", style=STYLE,
                                           layout=lay)
        self.output_dropout = w.FloatSlider(min=0.0, max=0.7, step=0.05, description="output dropout",
                                            style=STYLE, layout=lay)
        # Checkbox labels sit right of the box: the full row width fits them.
        self.tie = w.Checkbox(description="tie output layer to embedding", style=STYLE, layout=lay)

    def _training_widgets(self, recipe_batches: set[int]) -> None:
        """``recipe_batches``: the batch sizes of the recipes on offer, so that every recipe can be selected."""
        w, lay = _w(), _row()
        self.ema = w.FloatSlider(min=0.0, max=0.999, step=0.001, readout_format=".3f",
                                 description="weight avg (0=off)", style=STYLE, layout=lay)
        batches = {8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, self.rec.batch_size} | recipe_batches
        self.batch = w.Dropdown(options=sorted(batches), description="batch size", style=STYLE, layout=lay)
        self.lr = w.FloatLogSlider(base=10, min=-5, max=-1.5, step=0.05, readout_format=".1e",
                                   description="learning rate", style=STYLE, layout=lay)
        self.original_lr = w.Checkbox(description="lr = 1e-4·√(batch/32) (original rule)", style=STYLE, layout=lay)
        self.epochs = w.IntSlider(min=1, max=300, description="max epochs", style=STYLE, layout=lay)
        self.patience = w.IntSlider(min=1, max=100, description="patience", style=STYLE, layout=lay)
        self.precision = w.Dropdown(options=["auto", "bf16", "fp16", "fp32"], description="precision", style=STYLE,
                                    layout=lay)
        # Minutes between mid-epoch saves of `last` (a stop signal saves at once, whatever this says).
        self.checkpoint_every = w.BoundedFloatText(min=0.1, max=1440.0, step=1.0, description="checkpoint (min)",
                                                   style=STYLE, layout=lay)

    def _data_widgets(self, d) -> list:
        """The data widgets, filled from the data config ``d`` where _fill does not; returns the data column."""
        w, lay = _w(), _row()
        self.seq = w.IntSlider(min=16, max=512, step=16, description="max seq length", style=STYLE, layout=lay)
        self.mode = w.Dropdown(options=["windows", "stream", "packed"], description="batching", style=STYLE,
                               layout=lay)
        sources = [("hub (sample only if offline)", "auto"), ("hub only", "hub"), ("bundled sample", "sample"),
                   ("local path", "path")]
        if d.dataset not in ("dolly", "instruct"):
            sources.append(("text corpus (hub id or files)", "text"))
        self.source = w.Dropdown(options=sources,
                                 value="text" if d.dataset == "text" else d.source, description="data source",
                                 style=STYLE, layout=lay)
        self.path = w.Text(value="", placeholder="file or folder (local path only)", description="path",
                           style=STYLE, layout=lay)
        self.tokenizer = w.Dropdown(options=[("words (original)", "word"), ("byte-level BPE", "bpe")],
                                    description="tokenizer", style=STYLE, layout=lay)
        data_rows = [self.source, self.path, self.tokenizer]
        self.instruct = d.dataset in ("dolly", "instruct")
        if not self.instruct:  # any text corpus (docs/corpus.md): a hub dataset id, or local files / a glob
            self.corpus = w.Text(value=d.hub_name or (d.path if d.dataset == "text" else "") or "",
                                 placeholder="Salesforce/wikitext or books/*.txt", description="text corpus",
                                 style=STYLE, layout=lay)
            self.hub_config = w.Text(value=d.hub_config or "", placeholder="e.g. wikitext-103-raw-v1",
                                     description="hub config", style=STYLE, layout=lay)
            self.text_field = w.Text(value=d.text_field, description="text field", style=STYLE, layout=lay)
            data_rows += [self.corpus, self.hub_config, self.text_field]
        if self.instruct:  # any instruction dataset: a hub name or a local jsonl, renamed field by field
            self.hub_name = w.Text(value=d.hub_name or "", placeholder="empty = databricks/databricks-dolly-15k",
                                   description="hub dataset", style=STYLE, layout=lay)
            self.field_map = w.Text(value=_format_map(d.field_map), placeholder="e.g. context=input, response=output",
                                    description="field mapping", style=STYLE, layout=lay)
            data_rows += [self.hub_name, self.field_map]
        return data_rows

    def _option_widgets(self) -> None:
        """The cell options (ModelConfig; off = the original's cell). A chosen one trains through the autograd
        loop."""
        w, lay = _w(), _row()
        self.state_norm = w.Dropdown(options=[(STATE_NORM_LABELS[n], n) for n in STATE_NORMS],
                                     description="state norm", style=STYLE, layout=lay)
        self.chrono = w.IntSlider(min=0, max=512, step=8, description="chrono init (0=off)", style=STYLE, layout=lay)
        self.gate_context = w.Checkbox(description="gates also read c_{t-1}", style=STYLE, layout=lay)
        self.fnn_residual = w.Dropdown(options=[("plain (original)", "none"), ("residual", "residual"),
                                                ("pre-norm", "prenorm")], description="FNN layers 2..N",
                                       style=STYLE, layout=lay)
        self.gate_rank = w.IntSlider(min=0, max=512, step=8, description="gate rank (0=full)", style=STYLE,
                                     layout=lay)
        self.slow_forget = w.FloatSlider(min=0.0, max=6.0, step=0.5, description="slow half bias (0=off)",
                                         style=STYLE, layout=lay)

    def _layout(self, data_rows: list, hide: Sequence[str]):
        """The panel: recipe, then model, cell options, data and training in two columns each, less ``hide``."""
        w = _w()
        unknown = set(hide) - set(vars(self))
        if unknown:
            raise ValueError(f"hide={sorted(unknown)}: not settings of this panel")
        hidden = {id(getattr(self, name)) for name in hide}

        def shown(*widgets):
            return w.VBox([x for x in widgets if id(x) not in hidden])

        return w.VBox([
            self.recipe,
            w.HTML("<b>Model</b>"), _columns(shown(self.layers, self.embed, self.context, self.tie),
                                             shown(self.hidden, self.vocab, self.dropout, self.context_dropout,
                                                   self.input_dropout, self.output_dropout)),
            w.HTML("<b>Cell options</b> (off = the original's cell)"),
            _columns(shown(self.state_norm, self.chrono, self.gate_context),
                     shown(self.fnn_residual, self.gate_rank, self.slow_forget)),
            w.HTML("<b>Data</b>"), _columns(shown(*data_rows), shown(self.seq, self.mode)),
            w.HTML("<b>Training</b>"), _columns(shown(self.batch, self.lr, self.original_lr, self.ema),
                                                shown(self.epochs, self.patience, self.precision,
                                                      self.checkpoint_every)),
        ])

    def _batch_for(self, cfg: RunConfig) -> int:
        # Original recipes (lr by the original rule) take this machine's batch; measured recipes keep their own.
        return self.rec.batch_size if cfg.train.lr is None else cfg.train.batch_size

    def _fill(self, cfg: RunConfig) -> None:
        """Set every widget from ``cfg`` (the recipe dropdown's callback; no work runs here)."""
        self.base = cfg
        m, d, t = cfg.model, cfg.data, cfg.train
        for widget, value in ((self.layers, m.num_layers), (self.embed, m.embed_dim), (self.context, m.context_dim),
                              (self.hidden, m.hidden_dim), (self.vocab, m.vocab_size), (self.dropout, m.dropout),
                              (self.context_dropout, m.context_dropout), (self.tie, m.tie_embeddings),
                              (self.input_dropout, m.input_dropout or 0.0),
                              (self.output_dropout, m.output_dropout or 0.0),
                              (self.seq, d.max_seq_length), (self.mode, d.mode), (self.tokenizer, d.tokenizer),
                              (self.batch, self._batch_for(cfg)), (self.lr, t.lr or self.rec.lr),
                              (self.original_lr, t.lr is None), (self.ema, t.ema_decay), (self.epochs, t.epochs),
                              (self.patience, t.patience), (self.precision, t.precision),
                              (self.checkpoint_every, t.checkpoint_every_minutes)):
            widget.value = value
        self._fill_options(cfg)

    def _fill_options(self, cfg: RunConfig) -> None:
        m = cfg.model
        for widget, value in ((self.state_norm, m.state_norm), (self.chrono, int(m.chrono_init)),
                              (self.gate_context, m.gate_context), (self.fnn_residual, m.fnn_residual),
                              (self.gate_rank, m.gate_rank), (self.slow_forget, m.slow_forget_bias)):
            widget.value = value

    def _ipython_display_(self):  # display(panel) shows the widgets
        from IPython.display import display

        display(self.widget)

    def config(self) -> RunConfig:
        """The RunConfig for the widgets' current values (validated: a bad value raises ValueError)."""

        b = self.base
        path, source = None, self.source.value
        if source == "path":
            if not self.path.value.strip():
                raise ValueError("invalid config value path='': choose a file or folder, or another data source")
            path, source = self.path.value.strip(), "auto"
        text = self._text_fields()  # {} unless the data source is a text corpus
        if text:
            path, source = text.pop("path"), "auto"
        return RunConfig(
            model=dataclasses.replace(b.model, num_layers=self.layers.value, embed_dim=self.embed.value,
                                      context_dim=self.context.value, hidden_dim=self.hidden.value,
                                      vocab_size=self.vocab.value, dropout=self.dropout.value,
                                      context_dropout=self.context_dropout.value,
                                      input_dropout=_unless_default(self.input_dropout.value, b.model.input_dropout),
                                      output_dropout=_unless_default(self.output_dropout.value,
                                                                     b.model.output_dropout),
                                      tie_embeddings=bool(self.tie.value), state_norm=self.state_norm.value,
                                      chrono_init=float(self.chrono.value), gate_context=bool(self.gate_context.value),
                                      fnn_residual=self.fnn_residual.value, gate_rank=int(self.gate_rank.value),
                                      slow_forget_bias=float(self.slow_forget.value)),
            data=dataclasses.replace(b.data, max_seq_length=self.seq.value, mode=self.mode.value, path=path,
                                     source=source,
                                     tokenizer=self.tokenizer.value, **self._instruct_fields(path), **text),
            train=dataclasses.replace(b.train, batch_size=self.batch.value,
                                      lr=None if self.original_lr.value else float(self.lr.value),
                                      epochs=self.epochs.value, patience=self.patience.value,
                                      precision=self.precision.value, ema_decay=float(self.ema.value),
                                      checkpoint_every_minutes=float(self.checkpoint_every.value)))


    def _text_fields(self) -> dict:
        """The data settings of the "text corpus" source: local files when the name is a path that exists or
        a glob, else a hub dataset id."""
        if self.instruct or self.source.value != "text":
            return {}
        name = self.corpus.value.strip()
        if not name:
            raise ValueError("invalid config value text corpus='': name a hub dataset (Salesforce/wikitext) or local "
                             "files (a file, folder or glob)")
        local = any(ch in name for ch in "*?[") or Path(name).expanduser().exists()
        return {"dataset": "text", "path": name if local else None, "hub_name": None if local else name,
                "hub_config": self.hub_config.value.strip() or None,
                "text_field": self.text_field.value.strip() or "text"}

    def _instruct_fields(self, path) -> dict:
        if not self.instruct:
            return {}
        fmap = parse_field_map(self.field_map.value)
        hub = self.hub_name.value.strip() or None
        if hub or (fmap and path):
            return {"dataset": "instruct", "hub_name": None if path else hub, "field_map": fmap}
        return {"dataset": "dolly", "field_map": None, "hub_name": None}


def _row():
    """The width of one row of a panel's column."""
    return _w().Layout(width="420px")


def _columns(*boxes):
    """Side by side where the output area is wide enough, one under the other where not (no scroll bar)."""
    return _w().HBox(list(boxes), layout=_w().Layout(flex_flow="row wrap"))


def parse_field_map(text: str) -> Optional[dict]:
    """``"context=input, response=output"`` -> ``{"context": "input", "response": "output"}``."""
    if not text.strip():
        return None
    out = {}
    for part in text.split(","):
        ours, sep, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or ours not in ("instruction", "context", "response", "category") or not theirs:
            raise ValueError(f"invalid config value field_map={text!r}: write ours=theirs pairs, ours one of "
                             "instruction, context, response, category")
        out[ours] = theirs
    return out


def _unless_default(value: float, base: Optional[float]) -> Optional[float]:
    """A slider's value, except that 0 on a field the recipe left unset (None) stays unset."""
    return None if value == 0 and base is None else value


def _format_map(m: Optional[dict]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (m or {}).items())


def choice_boxes(options: Sequence, selected: Sequence, description: str = "") -> tuple:
    """A row of checkboxes (core widgets) and a function returning the ticked options."""
    w = _w()
    boxes = [w.Checkbox(value=o in selected, description=str(o), indent=False,
                        layout=w.Layout(width=f"{40 + 9 * len(str(o))}px")) for o in options]
    row = w.HBox([w.Label(description, layout=w.Layout(width="140px")), *boxes])
    return row, lambda: [o for o, b in zip(options, boxes) if b.value]


class ChatPanel:
    """Text box + Send + a bounded, scrolling transcript + sampling sliders around a ChatSession.

    Enter in the text box sends, like Send. The transcript is an ``HTML`` widget (core on ipywidgets 7
    and 8) updated piece by piece as the reply streams, wrapped at word boundaries, at most
    ``height`` tall and kept scrolled to its newest line. ``ask(text)`` is what Enter and Send call; a
    notebook cell can call it too (headless runs do), and then the exchange also prints as cell output,
    which stays readable where widgets do not render.
    """

    def __init__(self, session, height: str = "320px") -> None:
        w = _w()
        self.session = session
        self.height = height
        s = session.sampling
        lay = w.Layout(width="380px")
        self.temperature = w.FloatSlider(value=s.temperature, min=0.0, max=2.0, step=0.05, description="temperature",
                                         style=STYLE, layout=lay)
        self.top_k = w.IntSlider(value=s.top_k, min=0, max=200, description="top-k (0 = off)", style=STYLE,
                                 layout=lay)
        self.top_p = w.FloatSlider(value=s.top_p, min=0.05, max=1.0, step=0.05, description="top-p", style=STYLE,
                                   layout=lay)
        self.max_tokens = w.IntSlider(value=s.max_new_tokens, min=1, max=400, description="max new tokens",
                                      style=STYLE, layout=lay)
        self.text = w.Text(placeholder="Ask something, then press Enter", layout=w.Layout(width="480px"))
        self.send = w.Button(description="Send", button_style="primary")
        self.reset_btn = w.Button(description="New conversation")
        self.transcript = w.HTML(value=self._render([]), layout=w.Layout(max_width="900px"))
        self._lines: list[tuple[str, str]] = []
        self.send.on_click(lambda _: self._submit())
        self.reset_btn.on_click(lambda _: self.reset())
        self._on_enter(self.text, self._submit)
        self.widget = w.VBox([_columns(self.temperature, self.top_k), _columns(self.top_p, self.max_tokens),
                              _columns(self.text, self.send, self.reset_btn), self.transcript])

    @staticmethod
    def _on_enter(text, callback: Callable[[], None]) -> None:
        # Enter sends the Text's "submit" message at once, while value updates typed just before it may still
        # be queued in the browser (widget managers hold back a model's updates until the kernel has
        # answered the previous one), so a handler that reads the value on submit can see a half-typed
        # message. With continuous_update=False the browser sends the whole value once, right after the
        # submit; sending on the value change that follows a submit gets the whole message, and a value
        # committed by leaving the box (no submit) sends nothing. Same messages on ipywidgets 7 and 8
        # (8 marks on_submit deprecated but keeps it).
        text.continuous_update = False
        entered = {"flag": False}

        def on_submit(_) -> None:
            entered["flag"] = True

        def on_value(change) -> None:
            if entered["flag"] and change["new"].strip():
                entered["flag"] = False
                callback()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            text.on_submit(on_submit)
        text.observe(on_value, names="value")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _render(self, lines: list[tuple[str, str]]) -> str:
        import html

        rows = "".join(
            f'<div style="margin:0 0 6px 0;"><b style="color:{"#1565c0" if who == "you" else "#2e7d32"};">'
            f"{who}:</b> {html.escape(text)}</div>" for who, text in lines) or \
            '<div style="color:#888;">The conversation starts here: type below and press Enter.</div>'
        # column-reverse keeps a scrolled box pinned to its newest line without any script.
        return (f'<div style="max-height:{self.height};overflow-y:auto;display:flex;flex-direction:column-reverse;'
                'border:1px solid #ccc;border-radius:4px;padding:6px 8px;box-sizing:border-box;white-space:pre-wrap;'
                'word-break:normal;'
                f'overflow-wrap:break-word;line-height:1.4;"><div>{rows}</div></div>')

    def _show(self) -> None:
        self.transcript.value = self._render(self._lines)

    def _sync(self) -> None:
        self.session.sampling = dataclasses.replace(self.session.sampling, temperature=self.temperature.value,
                                                    top_k=self.top_k.value, top_p=self.top_p.value,
                                                    max_new_tokens=self.max_tokens.value)

    def _submit(self) -> None:
        message = self.text.value
        if message.strip():
            self.ask(message, echo=False)

    def ask(self, message: str, echo: bool = True) -> str:
        """Send ``message``, stream the reply into the transcript and return it; ``echo`` also prints the
        exchange as cell output."""
        self._sync()
        self.text.value = ""
        self._lines.append(("you", message))
        self._lines.append(("model", ""))
        self._show()
        parts = []
        for piece in self.session.stream(message):
            parts.append(piece)
            self._lines[-1] = ("model", "".join(parts).lstrip())
            self._show()
        reply = "".join(parts).strip()
        self._lines[-1] = ("model", reply or "(empty reply)")
        self._show()
        if echo:
            print(f"you: {message}\nmodel: {reply}")
        return reply

    def reset(self) -> None:
        """Start a new conversation: an empty context vector and an empty transcript."""
        self.session.reset()
        self._lines = []
        self._show()

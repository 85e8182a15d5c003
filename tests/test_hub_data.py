"""The hub path as it runs: ``datasets.load_dataset`` on local repositories laid out like the hub's
(Salesforce/wikitext, databricks/databricks-dolly-15k), a hub that answers errors (an HTTP server on
127.0.0.1 as ``HF_ENDPOINT``), and an unreachable one. The bundled sample stands in only when the hub
cannot be asked or when it is asked for by name, and every result then says so."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from newllm_nb.config import DataConfig
from newllm_nb.data import prepare, sources
from newllm_nb.data.sources import HUB_DATASETS, DataError, HubDataset, is_sample, load_dolly, load_wikitext

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WIKITEXT_README = """---
language:
- en
license: cc-by-sa-3.0
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
---
# WikiText (a local copy laid out like the hub's)
"""


def _paragraphs(word: str, n: int) -> list[str]:
    """WikiText's raw layout: a heading, blank lines, paragraphs of words (this split's ``word`` marks it)."""
    lines = ["", f" = {word.title()} history = ", ""]
    lines += [f" the {word} river runs past the {word} town number {i} and the hills . " for i in range(n)]
    return lines + [""]


@pytest.fixture
def wikitext_repo(tmp_path) -> Path:
    repo = tmp_path / "Salesforce-wikitext"
    (repo / "wikitext-2-raw-v1").mkdir(parents=True)
    (repo / "README.md").write_text(WIKITEXT_README)
    for split, word in (("train", "alder"), ("validation", "birch"), ("test", "cedar")):
        table = pa.table({"text": _paragraphs(word, 30 if split == "train" else 8)})
        pq.write_table(table, repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    return repo


@pytest.fixture
def dolly_repo(tmp_path) -> Path:
    repo = tmp_path / "databricks-dolly-15k"
    repo.mkdir()
    (repo / "README.md").write_text("---\nlicense: cc-by-sa-3.0\ntask_categories:\n- question-answering\n---\n"
                                    "# databricks-dolly-15k (a local copy laid out like the hub's)\n")
    categories = ["open_qa", "general_qa", "classification", "closed_qa", "brainstorming", "information_extraction",
                  "summarization", "creative_writing"]
    with open(repo / "databricks-dolly-15k.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": f"What does heron {i} eat?", "context": "" if i % 2 else f"Heron {i}.",
                                "response": f"Heron {i} eats fish from the river.",
                                "category": categories[i % len(categories)]}) + "\n")
    return repo


@pytest.fixture
def hub_is(monkeypatch):
    """Point a HUB_DATASETS entry at a local repository and let load_hub ask it, as it asks the hub."""
    def use(name: str, repo: Path) -> None:
        monkeypatch.setitem(HUB_DATASETS, name, HubDataset(str(repo), HUB_DATASETS[name].config,
                                                           title=HUB_DATASETS[name].title))
        monkeypatch.setattr(sources, "hub_offline_requested", lambda: False)
        monkeypatch.setattr(sources, "hub_reachable", lambda timeout=1.5: True)
    return use


def test_every_hub_id_has_its_namespace():
    assert HUB_DATASETS["wikitext"] == HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", title="WikiText-2")
    assert HUB_DATASETS["dolly"].repo_id == "databricks/databricks-dolly-15k"
    assert all(re.fullmatch(r"[\w.-]+/[\w.-]+", spec.repo_id) for spec in HUB_DATASETS.values())
    with pytest.raises(DataError, match="needs its namespace"):
        sources.load_instructions(hub_name="dolly-15k")  # a bare id is refused before any request


def test_wikitext_loads_from_a_hub_layout_repository_through_load_dataset(wikitext_repo, hub_is, capsys):
    hub_is("wikitext", wikitext_repo)
    sp = load_wikitext()
    assert sp.source == f"hub {wikitext_repo} wikitext-2-raw-v1" and not is_sample(sp.source)
    assert sp.train == _paragraphs("alder", 30) and sp.valid == _paragraphs("birch", 8)
    assert sp.test == _paragraphs("cedar", 8)
    assert "sample" not in capsys.readouterr().out
    prepared = prepare(DataConfig("wikitext", max_seq_length=16), 200)  # the pipeline's own path
    assert prepared.source == sp.source and "alder" in prepared.tokenizer.to_json()
    assert prepared.summary().startswith(f"data: hub {wikitext_repo}")


def test_dolly_loads_from_its_single_jsonl_through_load_dataset(dolly_repo, hub_is):
    hub_is("dolly", dolly_repo)
    rs = load_dolly()
    assert rs.source == f"hub {dolly_repo}"
    records = rs.train + rs.valid
    assert len(records) == 40 and len(rs.valid) == 4
    assert {r["instruction"] for r in records} == {f"What does heron {i} eat?" for i in range(40)}
    assert {r["category"] for r in records} >= {"open_qa", "creative_writing"}
    assert any(r["context"] == "Heron 0." for r in records) and all(set(r) == {"instruction", "context", "response",
                                                                                "category"} for r in records)


def test_a_hub_layout_repository_without_the_column_stops_with_a_line_naming_it(tmp_path, hub_is):
    repo = tmp_path / "wrong"
    (repo / "wikitext-2-raw-v1").mkdir(parents=True)
    (repo / "README.md").write_text(WIKITEXT_README)
    for split in ("train", "validation", "test"):
        pq.write_table(pa.table({"body": ["some words here and more"]}),
                       repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    hub_is("wikitext", repo)
    with pytest.raises(DataError, match=r"split 'train' has no 'text' column \(it has \['body'\]\)"):
        load_wikitext()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_means_the_sample_said_and_marked_or_an_error_when_the_hub_was_asked_for(
        monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # a mirror nobody serves
    assert sources.hub_reachable() is False
    sp = load_wikitext()
    out = capsys.readouterr().out
    assert "is unreachable: training on the bundled sample data/wikitext-sample (not WikiText-2)" in out
    assert is_sample(sp.source) and sp.source == "bundled sample data/wikitext-sample (not WikiText-2)"
    with pytest.raises(DataError, match=r"unreachable, and hub Salesforce/wikitext wikitext-2-raw-v1 was asked"):
        load_wikitext(source="hub")
    assert is_sample(load_dolly(source="sample").source)  # by name: no hub asked, no message needed
    assert capsys.readouterr().out == ""


def test_hub_reachability_follows_hf_endpoint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}/")
        assert sources.hub_endpoint() == f"http://127.0.0.1:{s.getsockname()[1]}"
        assert sources.hub_reachable() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.hub_reachable() is False


class _ErrorHub(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request with 404 and remembers what was asked."""

    asked: list = []

    def _answer(self):
        _ErrorHub.asked.append(f"{self.command} {self.path}")
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args):
        pass


def test_a_hub_that_answers_errors_stops_the_run_with_one_line_and_never_trains_on_the_sample(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ErrorHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT), NEWLLM_SMOKE="1")
    try:
        # huggingface_hub reads HF_ENDPOINT when it is imported: a fresh process, as a user's run is.
        r = subprocess.run([sys.executable, "-m", "newllm_nb", "train", "--dataset", "wikitext", "--quiet"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert any("Salesforce/wikitext" in a for a in _ErrorHub.asked), _ErrorHub.asked  # it asked this endpoint
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not load hub Salesforce/wikitext wikitext-2-raw-v1 from {endpoint} (")
    assert "--data-path" in last and "--data-source sample" in last and "Traceback" not in r.stderr
    assert "sample" not in r.stdout and "final" not in r.stdout and not (tmp_path / "runs").exists()


def test_the_sample_is_asked_for_by_name_from_the_cli_and_the_panel():
    from newllm_nb.cli import _parser, config_from_args

    args = _parser().parse_args(["train", "--data-source", "sample", "--hub-revision", "abc123"])
    data = config_from_args(args, recommended_batch=32).data
    assert (data.source, data.hub_revision, data.path) == ("sample", "abc123", None)
    assert config_from_args(_parser().parse_args(["train"]), recommended_batch=32).data.source == "auto"
    with pytest.raises(ValueError, match="source"):
        DataConfig(source="samples")
    pytest.importorskip("ipywidgets")
    from newllm_nb.notebook.widgets import TrainingPanel

    panel = TrainingPanel("original_dolly")
    assert panel.source.value == "auto"
    for choice in ("sample", "hub"):
        panel.source.value = choice
        assert (panel.config().data.source, panel.config().data.path) == (choice, None)


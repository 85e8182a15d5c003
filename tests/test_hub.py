"""Sharing on the Hugging Face Hub, offline: a saved folder round-trips, the card says what the model is,
every check a local file gets applies to a shared one, and loading through ``HF_ENDPOINT`` works against a
local server that answers as the hub does (tests/hub_server.py). Uploading is tested as the folder it would
upload (``push --local-dir``); no request ever leaves 127.0.0.1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from huggingface_hub import ModelCard, constants
from safetensors import safe_open

from newllm_nb.cli import main
from newllm_nb.data.tokenizer import WordTokenizer, tokenizer_hash
from newllm_nb.infer.generate import Sampling, generate
from newllm_nb.models.newllm import count_parameters
from newllm_nb.train.checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    load_checkpoint,
    load_model,
    write_checkpoint,
)
from newllm_nb.train.hub import HubModel, best_record, push, share_on_hub
from newllm_nb.train.hub_files import HubError, check_repo_id, parse_hub_id
from newllm_nb.train.runs import fingerprint_id

ROOT = Path(__file__).resolve().parent.parent
SHARED = ["README.md", "config.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_prepared):
    """A real two-epoch run on the bundled sample: its folder holds best.safetensors."""
    from conftest import make_trainer, tiny_config

    run_dir = tmp_path_factory.mktemp("run")
    make_trainer(tiny_config(train__epochs=2), tiny_prepared, run_dir).fit()
    return run_dir


@pytest.fixture(scope="module")
def shared(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("share") / "alice-tiny"
    assert push(run, "alice/tiny", local_dir=folder) == str(folder)
    return folder


def _text(model, tok, **kw):
    return generate(model, tok, "the history of the", Sampling(max_new_tokens=12, **kw), stop=())


def _edit(folder: Path, tmp: Path, name: str, change) -> Path:
    """A copy of a shared folder with ``change(path)`` applied to one file."""
    copy = tmp / f"edited-{len(list(tmp.iterdir()))}"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    change(copy / name)
    return copy


def test_folder_round_trip_gives_the_same_weights_and_text(run, shared):
    assert sorted(os.listdir(shared)) == SHARED
    ref, ref_tok, ref_ck = load_model(run)
    for source in (shared, shared / "model.safetensors"):
        model, tok, ck = load_model(source)
        for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), k
        assert tokenizer_hash(tok) == tokenizer_hash(ref_tok)
        assert ck.fingerprint == ref_ck.fingerprint and ck.history == ref_ck.history
        assert _text(model, tok, greedy=True) == _text(ref, ref_tok, greedy=True)
        assert _text(model, tok, seed=3) == _text(ref, ref_tok, seed=3)
    hub = HubModel.from_pretrained(shared)  # the mixin's own entry point
    assert _text(hub.model, hub.tokenizer, seed=5) == _text(ref, ref_tok, seed=5)
    # only weights travel: no optimizer, RNG or trainer state in the shared file
    with safe_open(str(shared / "model.safetensors"), framework="pt") as f:
        assert all(k.startswith("model.") for k in f.keys())
        meta = json.loads(f.metadata()["newllm_nb"])
    assert "optimizer" not in meta and "trainer_state" not in meta


def test_config_and_tokenizer_files_are_what_the_hub_expects(run, shared):
    from tokenizers import Tokenizer

    ck = load_checkpoint(shared)
    config = json.loads((shared / "config.json").read_text())
    assert {k: config[k] for k in ("model", "data", "train")} == ck.config
    assert config["fingerprint"] == ck.fingerprint and config["checkpoint_sha256"] == ck.sha256
    _, tok, _ = load_model(run)
    hf = Tokenizer.from_file(str(shared / "tokenizer.json"))  # anyone's `tokenizers` reads the same ids
    for text in ("The history of the city", "unknownword zebra, the end"):
        assert hf.encode(text).ids == tok.encode(text)


def test_model_card(run, shared):
    card = ModelCard.load(shared / "README.md")
    ck = load_checkpoint(shared)
    model, _, _ = load_model(shared)
    assert card.data.library_name == "newllm-nb" and card.data.pipeline_tag == "text-generation"
    assert {"newllm", "attention-free", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    text = card.text
    rec = best_record(ck.history)
    assert rec is not None and rec["val_tokens"] > 0
    for needle in ("c_t      = clamp(LayerNorm(σ(W_f h_t) ⊙ c_{t-1} + σ(W_i h_t) ⊙ (W_u h_t)), −10, 10)",
                   f"Parameters: **{count_parameters(model):,}**",
                   f"| validation loss | {rec['val_loss']:.4f} |", f"| validation PPL | {rec['val_ppl']:.2f} |",
                   f"| validation accuracy | {100 * rec['val_acc']:.1f}% |",
                   f"| validation tokens | {rec['val_tokens']:,} |", f"| epoch | {rec['epoch']} of 2 recorded |",
                   "python -m newllm_nb train --config tiny/config.json", 'load_model("alice/tiny")',
                   f"run fingerprint `{fingerprint_id(ck.fingerprint)}`", ck.sha256,
                   "batch 16, up to 2 epochs"):
        assert needle in text, needle


def _with_source(run, tmp_path, source):
    """The run's best weights with a data source recorded, as a checkpoint file."""
    ck = load_checkpoint(run)
    path = tmp_path / "with-source.safetensors"
    write_checkpoint(path, dict(ck.tensors), {**ck.meta, "data_source": source})
    return path


def test_card_marks_the_bundled_sample_and_names_a_hub_dataset(run, tmp_path):
    push(_with_source(run, tmp_path, "bundled sample data/wikitext-sample"), "alice/s", local_dir=tmp_path / "s")
    card = ModelCard.load(tmp_path / "s" / "README.md")
    assert "**the bundled sample**" in card.text and "bundled-sample" in card.data.tags
    assert not card.data.datasets and not card.data.eval_results  # a sample's figures are no hub result
    push(_with_source(run, tmp_path, "hub Salesforce/wikitext wikitext-2-raw-v1"), "alice/h",
         local_dir=tmp_path / "h")
    card = ModelCard.load(tmp_path / "h" / "README.md")
    rec = best_record(load_checkpoint(run).history)
    assert card.data.datasets == ["Salesforce/wikitext"] and "bundled sample" not in card.text
    ppl = [e for e in card.data.eval_results if e.metric_type == "perplexity"]
    assert ppl and ppl[0].metric_value == round(rec["val_ppl"], 4) and ppl[0].dataset_split == "validation"


def test_a_shared_folder_is_checked_like_a_checkpoint(shared, tmp_path):
    def flip(p):
        data = bytearray(p.read_bytes())
        data[-3] ^= 0xFF
        p.write_bytes(bytes(data))

    with pytest.raises(DamagedCheckpointError, match="damaged"):
        load_model(_edit(shared, tmp_path, "model.safetensors", flip))

    def other_config(p):
        c = json.loads(p.read_text())
        c["model"]["num_layers"] = 3
        p.write_text(json.dumps(c))

    with pytest.raises(CheckpointError, match="config.json does not describe model.safetensors"):
        load_model(_edit(shared, tmp_path, "config.json", other_config))
    with pytest.raises(CheckpointError, match="tokenizer.json is not the tokenizer"):
        load_model(_edit(shared, tmp_path, "tokenizer.json",
                         lambda p: p.write_text(WordTokenizer(["a", "b"]).to_hub_json())))
    with pytest.raises(CheckpointError, match="not a newllm_nb tokenizer.json"):
        load_model(_edit(shared, tmp_path, "tokenizer.json", lambda p: p.write_text("{}")))
    with pytest.raises(CheckpointError, match="not a complete shared model: no tokenizer.json"):
        load_model(_edit(shared, tmp_path, "tokenizer.json", os.unlink))


def test_local_dir_refuses_a_folder_holding_something_else(run, shared, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match="already holds other files"):
        push(run, "alice/tiny", local_dir=busy)
    assert sorted(os.listdir(busy)) == ["notes.txt"]
    push(run, "alice/renamed", local_dir=shared)  # the same run again: written over, with a new card
    assert 'load_model("alice/renamed")' in (shared / "README.md").read_text()
    push(run, "alice/tiny", local_dir=shared)


def test_hub_ids():
    assert parse_hub_id("alice/newllm-wt2") == ("alice/newllm-wt2", None)
    assert parse_hub_id("alice/m.v2@v1.0") == ("alice/m.v2", "v1.0")
    for bad in ("alice", "a/b/c", "alice/x--y", "alice/..", "-a/b", "alice/b.", "alice/ b", "alice/b@"):
        assert parse_hub_id(bad) is None, bad
        with pytest.raises(HubError, match="malformed repo id"):
            check_repo_id(bad)
    with pytest.raises(HubError, match="malformed repo id"):
        check_repo_id("alice/m@main")  # push takes no revision
    with pytest.raises(HubError, match="alice/x--y: no such file or folder here, and not a valid hub id"):
        load_model("alice/x--y")
    with pytest.raises(CheckpointError, match="not found"):
        load_model("runs/a/best.safetensors")  # a path, not an id


# ---------------------------------------------------------------------------------------------------
# The CLI: one line and exit code 2 for each way sharing cannot happen
# ---------------------------------------------------------------------------------------------------
def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def online(monkeypatch, tmp_path):
    """huggingface_hub pointed at ``url`` with offline mode off and an empty cache (as HF_ENDPOINT would)."""
    def point(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return point


def test_push_local_dir_from_the_cli(run, tmp_path, capsys, no_token):
    out = tmp_path / "out"
    assert main(["push", "--checkpoint", str(run), "--repo", "alice/tiny", "--local-dir", str(out)]) == 0
    assert sorted(os.listdir(out)) == SHARED
    assert str(out) in capsys.readouterr().out


def test_push_refusals_are_one_line(run, tmp_path, capsys, no_token, online, monkeypatch):
    argv = ["push", "--checkpoint", str(run), "--repo"]
    assert main([*argv, "alice/bad--name"]) == 2
    assert "malformed repo id 'alice/bad--name'" in _one_line(capsys)
    assert main([*argv, "alice/tiny"]) == 2  # the tests run with HF_HUB_OFFLINE=1
    assert "the hub is offline (HF_HUB_OFFLINE=1)" in _one_line(capsys)
    online("http://127.0.0.1:9")  # nothing listens there
    assert main([*argv, "alice/tiny"]) == 2
    line = _one_line(capsys)
    assert "no Hugging Face token" in line and "huggingface_hub.login()" in line and "HF_TOKEN" in line \
        and "Secrets" in line
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    assert main([*argv, "alice/tiny"]) == 2
    assert "cannot be reached" in _one_line(capsys)


def test_push_refuses_a_repo_holding_another_model(run, shared, tmp_path, capsys, online, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "pytorch_model.bin").write_bytes(b"x")
    config = json.loads((shared / "config.json").read_text())
    changed = tmp_path / "changed"
    changed.mkdir()
    config["fingerprint"] = {**config["fingerprint"], "train.seed": 7}
    (changed / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with HubServer({"alice/bert": {"main": other}, "alice/tiny": {"main": changed}}) as server:
        online(server.url)
        assert main(["push", "--checkpoint", str(run), "--repo", "alice/bert"]) == 2
        assert "alice/bert already exists and holds another kind of model (pytorch_model.bin)" in _one_line(capsys)
        assert main(["push", "--checkpoint", str(run), "--repo", "alice/tiny"]) == 2
        line = _one_line(capsys)
        assert "alice/tiny already holds another model (run" in line and "choose another --repo" in line
    assert all(r.startswith(("GET", "HEAD")) for r in server.requests)  # nothing was uploaded


def test_share_cell_without_a_token_does_nothing_and_says_how_to_log_in(run, capsys, no_token, online,
                                                                         monkeypatch):
    online("http://127.0.0.1:9")
    assert share_on_hub(run, "alice/tiny") is None
    out = capsys.readouterr().out
    assert "no Hugging Face token" in out and "huggingface_hub.login()" in out and "Secrets" in out
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    assert share_on_hub(run, "") is None and "set HUB_REPO" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Loading through HF_ENDPOINT from a local server that answers as the hub does
# ---------------------------------------------------------------------------------------------------
def test_load_by_hub_id_and_revision_in_process(run, shared, tmp_path, online):
    other = tmp_path / "v1"
    hub = HubModel.from_checkpoint(run)
    with torch.no_grad():
        for p in hub.model.parameters():
            p.mul_(0.5)
    hub.save_pretrained(other)
    ref, ref_tok, _ = load_model(shared)
    alt, alt_tok, _ = load_model(other)
    with HubServer({"alice/tiny": {"main": shared, "v1": other}}) as server:
        online(server.url)
        model, tok, _ = load_model("alice/tiny")
        assert _text(model, tok, seed=1) == _text(ref, ref_tok, seed=1)
        for m in (load_model("alice/tiny@v1")[0], load_model("alice/tiny", revision="v1")[0],
                  HubModel.from_pretrained("alice/tiny", revision="v1").model):
            for (k, a), (_, b) in zip(alt.state_dict().items(), m.state_dict().items()):
                assert torch.equal(a, b), k
        with pytest.raises(HubError, match="alice/tiny has no revision 'v9'"):
            load_model("alice/tiny@v9")
        with pytest.raises(HubError, match="no such file or folder here, and no model alice/none on the Hugging"):
            load_model("alice/none")
        with pytest.raises(HubError, match="no model alice/none"):
            HubModel.from_pretrained("alice/none")
    assert any("/alice/tiny/resolve/v1/config.json" in r for r in server.requests)


def test_an_unreachable_hub_is_one_line(online):
    # huggingface_hub retries an unreachable hub for ~25 s before it says LocalEntryNotFoundError (what an
    # uncached download raises then); the message is tested on that exception directly.
    from huggingface_hub import errors

    from newllm_nb.train.hub_files import hub_errors

    online("http://127.0.0.1:9")
    with pytest.raises(HubError, match=r"^alice/tiny: no such file or folder here, and not in the local Hugging Face "
                                       r"cache, and the Hugging Face Hub at http://127.0.0.1:9 cannot be reached"):
        with hub_errors("alice/tiny", not_local=True):
            raise errors.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")


def test_chat_takes_a_hub_id(shared, online, monkeypatch, capsys):
    import io

    ref, ref_tok, _ = load_model(shared)
    from newllm_nb.infer.generate import ChatSession

    want = ChatSession(ref, ref_tok, Sampling(max_new_tokens=6, temperature=0)).send("hello there")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\n"))
    with HubServer({"alice/tiny": {"main": shared}}) as server:
        online(server.url)
        assert main(["chat", "--checkpoint", "alice/tiny", "--temperature", "0", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert want.strip() and "chatting with alice/tiny" in out and want.strip() in out


def test_cli_loads_a_hub_id_through_hf_endpoint(shared, tmp_path):
    """The real path end to end: a fresh process, HF_ENDPOINT in its environment, an empty cache; then the
    same id again with the server gone and HF_HUB_OFFLINE=1, from the cache."""
    ref, ref_tok, _ = load_model(shared)
    want = generate(ref, ref_tok, "the history of", Sampling(max_new_tokens=8, temperature=0), stop=())
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "newllm_nb", "generate", "--checkpoint", "alice/tiny", "--prompt",
            "the history of", "--temperature", "0", "--max-tokens", "8"]
    with HubServer({"alice/tiny": {"main": shared}}) as server:
        r = subprocess.run(argv, env={**env, "HF_ENDPOINT": server.url}, capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want.strip()
    assert any(req.startswith("GET /alice/tiny/resolve/") and req.endswith("/model.safetensors")
               for req in server.requests)
    r = subprocess.run(argv, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == want.strip(), r.stderr
    r = subprocess.run([*argv[:5], "alice/other", *argv[6:]], env={**env, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: alice/other: no such file or folder here, and not in the local Hugging Face cache, and the hub is "
        "offline (HF_HUB_OFFLINE=1; unset it to download)"]


def test_the_cards_reproduce_command_reads_the_shared_config(shared, tmp_path, capsys):
    from newllm_nb.cli import _parser, config_from_args

    ck = load_checkpoint(shared)
    args = _parser().parse_args(["train", "--config", str(shared / "config.json")])
    assert config_from_args(args, recommended_batch=4096).to_dict() == ck.config
    args = _parser().parse_args(["train", "--config", str(shared / "config.json"), "--epochs", "7"])
    assert config_from_args(args, recommended_batch=4096).train.epochs == 7
    assert main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert "cannot read it" in _one_line(capsys)
    for name, text in (("list.json", "[1]"), ("empty.json", "{}"), ("other.json", '{"model": {"width": 3}}')):
        (tmp_path / name).write_text(text)
        assert main(["train", "--config", str(tmp_path / name)]) == 2
        assert f"--config {tmp_path / name}: not a run config" in _one_line(capsys)

"""Runs that cannot lie: keyed run folders, one process per folder, checksummed checkpoints, failed runs that
say so, and one clear line (never a traceback) for what a user can get wrong."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from newllm_nb import ModelConfig, NewLLM
from newllm_nb.cli import main
from newllm_nb.data import prepare
from newllm_nb.data.sources import DataError, read_jsonl
from newllm_nb.data.tokenizer import BPETokenizer, WordTokenizer
from newllm_nb.infer.generate import ChatSession, Sampling, generate
from newllm_nb.train.checkpoint import CheckpointError, DamagedCheckpointError, load_checkpoint, load_model
from newllm_nb.train.runs import RunFolderError, RunLock, check_writable

from conftest import make_trainer, tiny_config

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT / "tests"))
SMOKE = ["--preset", "smoke", "--quiet", "--device", "cpu"]


def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "newllm_nb", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished smoke run through the CLI's default (keyed) folder."""
    cwd = tmp_path_factory.mktemp("cli")
    r = cli("train", *SMOKE, "--epochs", "2", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd, r.stdout


def _run_dir(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("device:")).split("run dir ")[1]


def test_other_settings_get_their_own_folder_and_the_same_settings_report_the_finished_run(trained_run):
    cwd, first = trained_run
    folder = _run_dir(first)
    assert folder.startswith("runs/wikitext-sample-newllm-L1-") and len(folder.split("-")[-1]) == 10
    again = cli("train", *SMOKE, "--epochs", "2", cwd=cwd)
    assert again.returncode == 0 and _run_dir(again.stdout) == folder
    assert "finished earlier (2 epochs): not trained again" in again.stdout
    def final(out):  # the metrics, without the seconds taken
        return [re.sub(r"\| \d+s ", "", line) for line in out.splitlines() if line.startswith("final")]

    assert final(first) and final(first) == final(again.stdout)
    other = cli("train", *SMOKE, "--epochs", "3", cwd=cwd)  # another setting: a new folder, trained anew
    assert other.returncode == 0 and _run_dir(other.stdout) != folder
    assert "resumed" not in other.stdout and "finished earlier" not in other.stdout


def test_an_explicit_folder_of_another_configuration_is_refused(trained_run):
    cwd, first = trained_run
    folder = _run_dir(first)
    r = cli("train", *SMOKE, "--epochs", "2", "--lr", "0.001", "--run-dir", folder, cwd=cwd)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "holds another configuration's run (train.lr: 0.003 there vs 0.001 now)" in r.stderr


def test_a_run_folder_that_is_a_file_or_unwritable_fails_before_training(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("train", *SMOKE, "--run-dir", str(f))
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "data:" not in r.stdout
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(RunFolderError, match="not writable"):
            check_writable(locked / "run")
    finally:
        locked.chmod(0o700)


def test_two_processes_on_one_folder_exactly_one_trains(tmp_path):
    worker = ROOT / "tests" / "resume_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "run"), "0.02", str(tmp_path / f"{i}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    loser = outs[[p.returncode for p in procs].index(3)]
    assert "is in use by process" in loser[1]
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_a_lock_is_released_with_its_process(tmp_path):
    code = ("import sys, os; from newllm_nb.train.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=ENV)
    with RunLock(tmp_path):  # the killed process's lock does not block
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()


def _flip_tail(path: Path, n: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[-n:] = bytes(b ^ 0xFF for b in data[-n:])
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_refused_and_resume_falls_back(tmp_path, tiny_prepared, capsys):
    cfg = tiny_config(train__epochs=3)
    t = make_trainer(cfg, tiny_prepared, tmp_path)

    class Stop(Exception):
        pass

    def stop_at_two(rec):
        if rec["epoch"] == 2:
            raise Stop

    t.callbacks.append(stop_at_two)
    with pytest.raises(Stop):
        t.fit()
    _flip_tail(tmp_path / "best.safetensors")
    with pytest.raises(DamagedCheckpointError, match=r"best\.safetensors is damaged"):
        load_model(tmp_path / "best.safetensors")
    _flip_tail(tmp_path / "last.safetensors")
    assert load_checkpoint(tmp_path / "last.prev.safetensors").trainer_state["epoch"] == 1
    resumed = make_trainer(cfg, tiny_prepared, tmp_path)
    hist = resumed.fit()
    out = capsys.readouterr().out
    assert "last.safetensors is damaged" in out and "resuming from the previous checkpoint" in out
    assert [r["epoch"] for r in hist] == [1, 2, 3]  # epoch 2 trained again from the epoch-1 checkpoint


def test_metadata_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "odd.safetensors"
    save_file({"x": torch.zeros(2)}, str(p), metadata={"newllm_nb": "[1, 2]"})
    with pytest.raises(CheckpointError, match="a JSON list, not an object"):
        load_checkpoint(p)


def test_a_diverged_short_run_fails_and_names_no_missing_checkpoint(tmp_path, tiny_prepared):
    from newllm_nb.train.trainer import NonFiniteLossError

    t = make_trainer(tiny_config(train__epochs=1, train__max_nonfinite=1000), tiny_prepared, tmp_path)
    t.step.loss_hook = lambda loss: loss * float("nan")  # the epoch ends before the consecutive-NaN guard
    with pytest.raises(NonFiniteLossError, match="the run diverged.*Last good checkpoint: none"):
        t.fit()
    assert not (tmp_path / "best.safetensors").exists()


def test_cli_turns_training_stops_into_one_line(tmp_path, monkeypatch, capsys):
    import newllm_nb.cli as cli_mod

    for exc in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                cli_mod.TrainingStopped("the run diverged: validation loss is not finite")):
        def boom(*a, _exc=exc, **k):
            raise _exc
        monkeypatch.setattr(cli_mod, "run_experiment", boom)
        assert main(["train", *SMOKE, "--run-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(exc).split(".")[0] in err
        with pytest.raises(type(exc)):
            main(["train", *SMOKE, "--run-dir", str(tmp_path), "--debug"])


@pytest.fixture(scope="module")
def small_model():
    tok = WordTokenizer.train(["the cat sat on the mat", "a dog ran far away"], 20)
    torch.manual_seed(0)
    return NewLLM(ModelConfig(vocab_size=tok.vocab_size, embed_dim=8, context_dim=8, hidden_dim=16)), tok


@pytest.mark.parametrize("kw,expected", [(dict(temperature=float("inf")), "temperature=inf"),
                                         (dict(temperature=float("nan")), "temperature=nan"),
                                         (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
                                         (dict(max_new_tokens=2.5), "max_new_tokens"),
                                         (dict(repetition_penalty=0), "repetition_penalty"),
                                         (dict(stop="Instruction:"), "stop")])
def test_invalid_sampling_values_are_named(small_model, kw, expected):
    with pytest.raises(ValueError, match=expected):
        Sampling(**kw)
    with pytest.raises(ValueError, match=expected):
        generate(*small_model, "the cat", **kw)


def test_prompts_that_are_not_text_or_hold_lone_surrogates(small_model):
    model, tok = small_model
    with pytest.raises(ValueError, match="prompt must be text"):
        generate(model, tok, None)
    assert isinstance(generate(model, tok, "the cat \ud83d sat", max_new_tokens=3), str)
    bpe = BPETokenizer.train(["the cat sat on the mat", "a dog ran far away"], 300)
    assert bpe.decode(bpe.encode("cat \ud83d dog")) == "cat \ufffd dog"  # replaced, not crashed on


def test_a_tokenizer_from_another_model_is_refused(tmp_path, tiny_prepared):
    t = make_trainer(tiny_config(train__epochs=1), tiny_prepared, tmp_path)
    t.fit()
    model, tok, _ = load_model(tmp_path / "best.safetensors")
    assert generate(model, tok, "the", max_new_tokens=2) is not None
    small = WordTokenizer.train(["only a few words here"], 10)
    with pytest.raises(ValueError, match=r"the tokenizer has 9 ids, the model"):
        generate(model, small, "the")
    same_size = WordTokenizer(list(reversed(tok.itos[4:])))  # same vocabulary size, other ids
    assert same_size.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="not the one the model was trained with"):
        ChatSession(model, same_size)


def test_a_device_that_is_not_there_is_one_clear_line(tmp_path, tiny_prepared):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    t = make_trainer(tiny_config(train__epochs=1), tiny_prepared, tmp_path)
    t.fit()
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):
        load_model(tmp_path / "best.safetensors", device="cuda")


def test_empty_validation_splits_name_the_real_cause(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi there."}) + "\n")
    with pytest.raises(DataError, match="validation split .* is empty: 1 usable record"):
        prepare(tiny_config(data__dataset="dolly", data__path=str(one)).data, 50)
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("\n".join(["a long enough line of words to train on"] * 18 + ["short", "tiny"]))
    with pytest.raises(DataError, match="validation split .* is empty"):
        prepare(tiny_config(data__path=str(wiki)).data, 50)


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    p = tmp_path / "bom.jsonl"
    rec = {"instruction": "Say hi.", "response": "Hi."}
    p.write_bytes(b"\xef\xbb\xbf" + (json.dumps(rec) + "\n" + json.dumps(rec)).encode())
    recs, skipped = read_jsonl(p)
    assert len(recs) == 2 and skipped == 0


def test_generate_and_chat_commands_use_a_trained_checkpoint(trained_run):
    cwd, first = trained_run
    ckpt = str(Path(cwd) / _run_dir(first) / "best.safetensors")
    g = cli("generate", "--checkpoint", ckpt, "--prompt", "the history of", "--max-tokens", "5", "--seed", "0",
            "--temperature", "0")
    assert g.returncode == 0, g.stderr
    assert len(g.stdout.split()) >= 1
    again = cli("generate", "--checkpoint", ckpt, "--prompt", "the history of", "--max-tokens", "5", "--seed", "0",
                "--temperature", "0")
    assert again.stdout == g.stdout  # greedy: the same text
    c = subprocess.run([sys.executable, "-m", "newllm_nb", "chat", "--checkpoint", ckpt, "--max-tokens", "4"],
                       input="hello there\nand again\n", capture_output=True, text=True, env=ENV, timeout=120)
    assert c.returncode == 0, c.stderr
    assert c.stdout.count("model:") == 2
    bad = cli("generate", "--checkpoint", ckpt, "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 2 and "temperature=-1.0" in bad.stderr and "Traceback" not in bad.stderr

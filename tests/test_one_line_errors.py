"""What a careless or unlucky user meets ends in one line and exit code 2, never a traceback: a full disk
while a checkpoint is written (saying which checkpoint is intact), names too long for the OS, a device that
is not there, a closed pipe or Ctrl-C while generating, sampling values at float32's edges, a damaged
trainer state, a lock that is a folder."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import newllm_nb.train.checkpoint as checkpoint
from newllm_nb.cli import main
from newllm_nb.infer.generate import Sampling, pick_next
from newllm_nb.train.checkpoint import load_checkpoint

SMOKE = ["train", "--preset", "smoke", "--epochs", "2", "--quiet", "--device", "cpu"]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished smoke run's folder (best, last, last.prev)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main([*SMOKE, "--run-dir", str(run_dir)]) == 0
    return run_dir


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_a_full_disk_during_a_checkpoint_write_names_the_intact_checkpoint(tmp_path, capsys, monkeypatch, failure):
    real, calls = checkpoint.save_file, []

    def save_or_fill_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) < 4:  # epoch 1's best and last, epoch 2's best: written
            return real(tensors, path, metadata=metadata)
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # half a file, then the disk is full
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", save_or_fill_the_disk)
    run_dir = tmp_path / "run"
    assert main([*SMOKE, "--run-dir", str(run_dir)]) == 2
    line = _err_line(capsys)
    last = run_dir / "last.safetensors"
    assert f"could not write {last} (No space left on device)" in line
    assert f"{last} (end of epoch 1) is intact and resumable" in line and "best.safetensors is intact" in line
    assert load_checkpoint(last).trainer_state["epoch"] == 1  # what the line says, untouched
    assert not list(run_dir.glob(".*.tmp"))
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed: the same command resumes and finishes
    assert main([*SMOKE, "--run-dir", str(run_dir)]) == 0
    assert "resumed" in capsys.readouterr().out


def test_names_too_long_for_the_os(tmp_path, capsys):
    long = str(tmp_path / ("x" * 5000))
    for argv in ([*SMOKE, "--data-path", long, "--run-dir", str(tmp_path / "r")], [*SMOKE, "--run-dir", long],
                 ["generate", "--checkpoint", long, "--prompt", "the"]):
        assert main(argv) == 2
        line = _err_line(capsys)
        assert len(line) < 400 and ("too long" in line or "not found" in line), line


def test_a_device_that_is_not_there(tmp_path, capsys, trained):
    assert main([*SMOKE, "--device", "mps", "--run-dir", str(tmp_path / "r")]) == 2
    assert "MPS is not available" in _err_line(capsys)
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "the", "--device", "mps"]) == 2
    assert "MPS is not available" in _err_line(capsys)
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "the", "--device", "cuda:7"]) == 2
    assert "device='cuda:7'" in _err_line(capsys)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_a_closed_pipe_while_generating(trained):
    proc = subprocess.Popen([sys.executable, "-m", "newllm_nb", "generate", "--checkpoint", str(trained), "--prompt",
                             "the", "--max-tokens", "100000", "--seed", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    proc.stdout.read(10)
    proc.stdout.close()  # `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "output was closed" in lines[0], err


def test_ctrl_c_while_generating(trained):
    proc = subprocess.Popen([sys.executable, "-m", "newllm_nb", "generate", "--checkpoint", str(trained), "--prompt",
                             "the", "--max-tokens", "100000", "--seed", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    proc.stdout.read(10)  # generating
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [x for x in err.decode().splitlines() if x.strip()]
    assert lines == ["stopped by SIGINT"], err


@pytest.mark.parametrize("values", [dict(temperature=1e39), dict(temperature=1e-45), dict(temperature=5e-324),
                                    dict(top_p=1e-46), dict(top_p=5e-324), dict(repetition_penalty=1e-300),
                                    dict(repetition_penalty=1e300, temperature=1e-45),
                                    dict(top_k=1, temperature=1e308)])
def test_sampling_values_at_float32s_edges_still_sample(values, trained, capsys):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 10
    seen = torch.rand(3, 50) < 0.3
    for _ in range(5):
        ids = pick_next(logits, Sampling(**values), seen)
        assert ((ids >= 4) | (ids == 1) | (ids == 3)).all() and (ids < 50).all()  # never PAD / BOS
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "the", "--max-tokens", "5", *flags]) == 0
    capsys.readouterr()


def test_greedy_limits_agree_with_argmax():
    logits = torch.randn(4, 30) * 5
    logits[:, :2] = -1e9
    assert torch.equal(pick_next(logits, Sampling(temperature=1e-45)), logits.argmax(-1))
    assert torch.equal(pick_next(logits, Sampling(top_p=1e-46)), logits.argmax(-1))


def _rewrite_trainer_state(path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    meta = json.loads(metadata["newllm_nb"])
    change(meta["trainer_state"])
    meta_json = json.dumps(meta)
    save_file(tensors, str(path), metadata={"newllm_nb": meta_json, "sha256": checkpoint._checksum(tensors, meta_json)})


@pytest.mark.parametrize("change, named", [(lambda ts: ts.pop("global_step"), "lacks global_step"),
                                           (lambda ts: ts["metrics"].pop("n"), "metrics lacks n"),
                                           (lambda ts: ts.update(epoch="two"), "malformed")])
def test_a_last_checkpoint_whose_trainer_state_lacks_a_field(tmp_path, trained, capsys, change, named):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    _rewrite_trainer_state(run_dir / "last.safetensors", change)
    assert main([*SMOKE, "--run-dir", str(run_dir)]) == 2
    line = _err_line(capsys)
    assert str(run_dir / "last.safetensors") in line and named in line, line


def test_a_lock_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    assert main([*SMOKE, "--run-dir", str(tmp_path / "run")]) == 2
    assert ".lock is a folder" in _err_line(capsys)


def test_sigterm_before_training_starts_is_one_line(tmp_path):
    """While the data is read (here: a stand-in that waits), SIGTERM ends the command with one line and 143."""
    code = ("import sys, time; import newllm_nb.cli as c; "
            "c.prepare = lambda *a, **k: (print('reading', flush=True), time.sleep(60)); "
            f"sys.exit(c.main({[*SMOKE, '--run-dir', str(tmp_path / 'r')]!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            text=True)
    assert proc.stdout.readline().strip() == "reading"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert [x for x in err.splitlines() if x.strip()] == ["stopped by SIGTERM before training started: nothing to save"]

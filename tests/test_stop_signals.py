"""Ctrl-C (SIGINT) and SIGTERM mid-epoch save that step and exit 130 / 143 with one line; the re-run resumes
there and ends bit-equal to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from newllm_nb.train.checkpoint import CheckpointError, load_checkpoint

WORKER = Path(__file__).with_name("stop_worker.py")
ARGS = ["train", "--preset", "smoke", "--epochs", "3", "--patience", "10", "--mode", "stream", "--batch-size", "8",
        "--quiet", "--device", "cpu", "--checkpoint-every", "600"]  # no timed save: only the signal saves mid-epoch


def _cli(run_dir, sleep=0.0, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), str(sleep), *ARGS, "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _epoch_of_last(run_dir):
    try:
        return load_checkpoint(run_dir / "last.safetensors").trainer_state["epoch"]
    except CheckpointError:
        return -1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    proc = _cli(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return load_checkpoint(run_dir / "last.safetensors")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_mid_epoch_saves_that_step_and_the_rerun_matches_an_uninterrupted_run(
        tmp_path, uninterrupted, sig, code):
    run_dir = tmp_path / "run"
    proc = _cli(run_dir, sleep=0.1)
    deadline = time.time() + 240
    while _epoch_of_last(run_dir) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    time.sleep(0.6)  # a few steps into the second epoch
    proc.send_signal(sig)
    t0 = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 60  # seconds after the step (a loaded shared machine takes tens to exit)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    ts = load_checkpoint(run_dir / "last.safetensors").trainer_state
    assert ts["epoch"] == 1 and 0 < ts["step_in_epoch"] and not ts["finished"]
    assert lines[-1] == (f"stopped by {signal.Signals(sig).name} at epoch 2, step {ts['step_in_epoch']}: saved "
                         f"{run_dir / 'last.safetensors'}; run the same command again to resume"), err

    proc = _cli(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed {run_dir / 'last.safetensors'} at epoch 2, step {ts['step_in_epoch']}" in out
    resumed = load_checkpoint(run_dir / "last.safetensors")
    assert resumed.trainer_state["finished"]
    assert sorted(resumed.tensors) == sorted(uninterrupted.tensors)
    for name, t in uninterrupted.tensors.items():
        if not name.startswith("rng."):
            assert torch.equal(t, resumed.tensors[name]), name  # weights, optimizer moments, carried context
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in uninterrupted.history]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in resumed.history] == strip

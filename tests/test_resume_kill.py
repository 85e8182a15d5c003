"""Kill a training process with SIGKILL mid-epoch, resume it, and compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from newllm_nb.train.checkpoint import CheckpointError, load_checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(run_dir, sleep, out, **kw):
    return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), str(sleep), str(out)], **kw)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill_mid_epoch_matches_uninterrupted(tmp_path):
    ref_out = tmp_path / "ref.json"
    assert _run("", 0, ref_out).wait(timeout=240) == 0
    reference = json.loads(ref_out.read_text())

    run_dir = tmp_path / "run"
    proc = _run(run_dir, 0.03, tmp_path / "killed.json")
    seen_mid_epoch, checked = False, 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        for f in run_dir.glob("*.safetensors"):  # every visible checkpoint must be complete
            try:
                ts = load_checkpoint(f).trainer_state
            except CheckpointError as e:
                if f.exists():
                    raise AssertionError(f"half-written checkpoint visible: {e}") from e
                continue
            checked += 1
            if f.name == "last.safetensors" and ts["epoch"] == 1 and ts["step_in_epoch"] > 2:
                seen_mid_epoch = True
        if seen_mid_epoch:
            break
        time.sleep(0.01)
    assert seen_mid_epoch, "no mid-epoch checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.json").exists()
    ts = load_checkpoint(run_dir / "last.safetensors").trainer_state
    assert ts["step_in_epoch"] > 0 and not ts["finished"]

    out = tmp_path / "resumed.json"
    assert _run(run_dir, 0, out).wait(timeout=240) == 0
    resumed = json.loads(out.read_text())
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in reference]
    for a, b in zip(reference, resumed):
        for k in ("train_loss", "val_loss", "val_acc", "lr", "best"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["epoch"], k)
    assert checked > 0
    assert not list(run_dir.glob(".*.tmp"))

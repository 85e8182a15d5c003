"""Two CPU processes under torchrun (gloo, 127.0.0.1) train what one process trains on the same global batch,
and a run whose ranks are all killed mid-epoch resumes to the same result. Plus the helpers' arithmetic."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker
import pytest
import torch

from newllm_nb.config import PAD_ID
from newllm_nb.data.batching import StreamData, WindowData
from newllm_nb.experiments.parallel import spread
from newllm_nb.runtime.distributed import gather_state, shard_state, stream_rows
from newllm_nb.train.checkpoint import CheckpointError, load_checkpoint

WORKER = Path(__file__).with_name("distributed_worker.py")

# Two ranks sum their token-weighted gradients in another order than one process sums the same rows
# (and each computes the loss of half the rows), so each update differs from one process's by fp32
# rounding, ~1e-7 relative. Adam divides by sqrt(v), which can enlarge such a difference for weights
# whose gradient is near zero, and ~40 steps add them up: measured, the largest weight differs by
# 5e-6 (weights are up to ~1). 2e-4 is 40x that, and still far below what a wrong all-reduce gives
# (a rank training on its half alone, or a mean of per-rank means with padding, moves weights by 1e-2+).
WEIGHT_ATOL = 2e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(mode, run_dir, sleep, out, nproc=2, **env_extra):
    path = os.pathsep.join(filter(None, [str(WORKER.parent.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=path, NCCL_NVLS_ENABLE="0", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), mode, str(run_dir), str(sleep),
           str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _ranks(proc) -> list[int]:
    """The pids of torchrun's ranks (its children), in start order."""
    ranks = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == proc.pid:  # the parent pid
            ranks.append(int(stat.parent.name))
    return sorted(ranks)


def _kill_all(proc) -> None:
    """SIGKILL torchrun and its ranks (which it starts in process groups of their own, so killpg would miss them)."""
    ranks = _ranks(proc)
    assert len(ranks) == 2, ranks
    for pid in ranks + [proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate()


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _assert_same_run(single, weights_single, out):
    hist = json.loads(Path(out).read_text())
    weights = {k: v.cpu() for k, v in torch.load(str(out) + ".pt").items()}
    assert [r["epoch"] for r in hist] == [r["epoch"] for r in single]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.2  # it learned
    for a, b in zip(single, hist):
        for k in ("train_loss", "val_loss", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (a["epoch"], k)
    assert weights.keys() == weights_single.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], weights_single[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


def test_two_ranks_match_one_process_and_only_rank_0_writes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun("windows", run_dir, 0, tmp_path / "two.json")
    single, weights = distributed_worker.train("windows")  # meanwhile, the same run as one process
    log = _finish(proc)
    _assert_same_run(single, weights, tmp_path / "two.json")
    assert log.count("data parallel: 2 processes | global batch 16 (about 8 per process)") == 1  # rank 0 prints
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert ckpt.trainer_state["finished"] and len(ckpt.history) == 3
    assert ckpt.extra("rng.rank1.cpu") is not None  # rank 1's own RNG stream travels in rank 0's checkpoint
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc (Linux)")
def test_killed_ranks_resume_from_the_last_checkpoint(tmp_path):
    """Stateful streams, 4 per rank: the mid-epoch checkpoint holds all 8 streams' contexts (gathered)."""
    run_dir = tmp_path / "run"
    proc = _torchrun("stream", run_dir, 0.05, tmp_path / "killed.json")
    seen = None
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and seen is None:
        try:
            ts = load_checkpoint(run_dir / "last.safetensors")
        except (CheckpointError, FileNotFoundError):
            ts = None
        if ts is not None and ts.trainer_state["epoch"] == 1 and ts.trainer_state["step_in_epoch"] > 1:
            seen = ts
        time.sleep(0.02)
    assert seen is not None, "no mid-epoch checkpoint appeared"
    assert seen.extra("state.0").shape[0] == 8  # every rank's streams, in the one checkpoint rank 0 wrote
    _kill_all(proc)
    assert not (tmp_path / "killed.json").exists()

    resumed = _torchrun("stream", run_dir, 0, tmp_path / "resumed.json")
    single, weights = distributed_worker.train("stream")  # meanwhile, the uninterrupted run as one process
    log = _finish(resumed)
    assert log.count("resumed ") == 1
    _assert_same_run(single, weights, tmp_path / "resumed.json")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc (Linux)")
def test_sigterm_to_one_rank_stops_all_at_one_step_which_rank_0_saves(tmp_path):
    """The signal reaches rank 1 only: every rank stops after the same step, rank 0 alone writes it and says
    so once, and the resumed run matches one uninterrupted process."""
    run_dir = tmp_path / "run"
    proc = _torchrun("stream", run_dir, 0.05, tmp_path / "stopped.json", NEWLLM_TEST_CHECKPOINT_MINUTES="600")
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not (run_dir / "last.safetensors").exists():
        time.sleep(0.02)  # the end of epoch 1 (no timed saves)
    time.sleep(0.5)
    ranks = _ranks(proc)
    assert len(ranks) == 2 and proc.poll() is None, ranks
    rank1 = [pid for pid in ranks if "LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().decode(
        errors="replace").replace("\0", "\n").splitlines()]
    os.kill(rank1[0], signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    ts = ckpt.trainer_state
    assert ts["epoch"] == 1 and ts["step_in_epoch"] > 0 and not ts["finished"]
    assert ckpt.extra("state.0").shape[0] == 8  # both ranks' streams, gathered into rank 0's file
    line = f"stopped by SIGTERM at epoch 2, step {ts['step_in_epoch']}: saved {run_dir / 'last.safetensors'}"
    assert out.count(line) == 1, out[-3000:]
    assert 'distributed_worker.py", line' not in out, out[-3000:]  # no rank's traceback (torchrun reports its own)
    assert not list(run_dir.glob(".*.tmp")) and not (tmp_path / "stopped.json").exists()

    resumed = _torchrun("stream", run_dir, 0, tmp_path / "resumed.json")
    single, weights = distributed_worker.train("stream")
    log = _finish(resumed)
    assert f"at epoch 2, step {ts['step_in_epoch']}" in log
    _assert_same_run(single, weights, tmp_path / "resumed.json")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_gpu_through_nccl_and_the_cuda_graph_step(tmp_path, monkeypatch):
    """The all-reduce after the graph replay: 2 GPUs (NCCL) against 1 GPU on the same global batch, fp32."""
    proc = _torchrun("windows", "", 0, tmp_path / "two.json", NEWLLM_TEST_DEVICE="cuda")
    log = _finish(proc)
    assert "fast path: cuda-graph+bptt captured for batch 8x15" in log
    monkeypatch.setenv("NEWLLM_TEST_DEVICE", "cuda")
    single, weights = distributed_worker.train("windows")
    _assert_same_run(single, {k: v.cpu() for k, v in weights.items()}, tmp_path / "two.json")


# -- the pieces, in one process -----------------------------------------------------------------------------
def test_window_shards_cover_each_global_batch_once():
    rows = torch.arange(11 * 5).view(11, 5)
    data = WindowData(rows + 4)
    one = list(data.batches(4, shuffle=True, seed=3))
    two = [list(data.batches(4, shuffle=True, seed=3, rank=r, world=2)) for r in range(2)]
    three = [list(data.batches(4, shuffle=True, seed=3, rank=r, world=3)) for r in range(3)]
    for i, b in enumerate(one):
        for shards in (two, three):
            got = torch.cat([s[i].x for s in shards if (s[i].y != PAD_ID).any()])
            assert sorted(got[:, 0].tolist()) == sorted(b.x[:, 0].tolist())
    # The last global batch has 3 rows: with 4 ranks one gets a row whose targets count nothing.
    last = [list(data.batches(4, shuffle=True, seed=3, rank=r, world=4))[-1] for r in range(4)]
    assert (last[3].y == PAD_ID).all() and all((b.y != PAD_ID).any() for b in last[:3])


def test_stream_shards_are_contiguous_blocks_and_state_round_trips():
    data = StreamData(torch.arange(4, 404), torch.zeros(400, dtype=torch.bool), seq_len=5)
    whole = next(iter(data.batches(6)))
    parts = [next(iter(data.batches(6, rank=r, world=4))) for r in range(4)]
    assert [len(stream_rows(6, r, 4)) for r in range(4)] == [2, 2, 1, 1]
    assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
    ctx = torch.randn(6, 3)
    assert torch.equal(torch.cat([shard_state(ctx, r, 4) for r in range(4)]), ctx)
    lstm = (torch.randn(2, 6, 3), torch.randn(2, 6, 3))  # (h, c): [layers, B, H]
    assert torch.equal(torch.cat([shard_state(lstm, r, 4)[1] for r in range(4)], 1), lstm[1])
    assert gather_state(ctx) is ctx  # one process: nothing to gather
    with pytest.raises(ValueError, match="cannot be shared"):
        stream_rows(1, 0, 2)


def _square_or_fail(x):
    if x == 2:
        raise RuntimeError("run 2 broke")
    return x * x


def test_spread_reports_a_failed_run_and_keeps_the_others():
    got = spread(_square_or_fail, [(1,), (2,), (3,)], jobs=2, gpus=0)
    assert got[0] == 1 and got[2] == 9
    assert isinstance(got[1], RuntimeError) and "run 2 broke" in str(got[1])


def test_parallel_sweep_keeps_the_runs_that_finish_and_reports_the_one_that_fails(tmp_path, tiny_prepared):
    from newllm_nb.cli import main
    from newllm_nb.experiments.experiment import keyed_run_dir
    from newllm_nb.experiments.sweep import run_sweep, sweep_configs

    from conftest import tiny_config

    base = tiny_config(train__epochs=1)
    (_, _, cfg1), (_, _, cfg2) = sweep_configs(base, [1, 2])
    keyed_run_dir(tmp_path, "newllm-L2-sample", cfg2, tiny_prepared).write_text("in the way")  # that run fails
    df = run_sweep(base, [1, 2], tmp_path, prepared=tiny_prepared, jobs=2)
    assert list(df["layers"]) == [1, 2]  # the sweep's order, whichever ended first
    ok, failed = df.iloc[0], df.iloc[1]
    assert ok["best_val_ppl"] > 0 and (keyed_run_dir(tmp_path, "newllm-L1-sample", cfg1, tiny_prepared)
                                       / "result.json").exists()
    assert "RunFolderError" in failed["error"] and "is a file" in failed["error"]
    assert main(["sweep", "--layers", "1,x", "--out-dir", str(tmp_path)]) == 2

"""benchmarks/multi_gpu.py without GPUs: its run plan, launch commands, rows and tables on fabricated runs, and
one real end to end run of 1 and 2 CPU processes (torchrun, gloo) on the bundled sample."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "wikitext-sample" / "wiki.train.raw"

_spec = importlib.util.spec_from_file_location("multi_gpu", ROOT / "benchmarks" / "multi_gpu.py")
mg = importlib.util.module_from_spec(_spec)
sys.modules["multi_gpu"] = mg  # dataclasses look their module up there
_spec.loader.exec_module(mg)


def _config(seed=0, batch=2048, fast_path="auto", lr=None):
    return {"model": {"num_layers": 4}, "data": {"dataset": "wikitext", "max_seq_length": 64},
            "train": {"seed": seed, "batch_size": batch, "fast_path": fast_path, "lr": lr}}


def _history(seconds, tokens_per_s, val_ppl=60.0):
    return [{"epoch": i + 1, "seconds": s, "tokens_per_s": t, "train_ppl": 80.0, "val_ppl": val_ppl}
            for i, (s, t) in enumerate(zip(seconds, tokens_per_s))]


def _run(gpus, seed, tokens_per_s, val_ppl, scaling="strong", batch_arg=2048, fast_path="auto"):
    return {"seed": seed, "scaling": scaling, "batch_arg": batch_arg, "fast_path": fast_path, "layers": 4,
            "data_mode": "windows", "gpus": gpus, "global_batch": batch_arg * (gpus if scaling == "weak" else 1),
            "per_gpu_batch": batch_arg // (1 if scaling == "weak" else gpus), "lr": 8e-4, "path": "cuda-graph+fused",
            "epochs": 4, "epoch_s": 1e6 / tokens_per_s, "tokens_per_s": tokens_per_s, "first_epoch_s": 9.0,
            "train_ppl": 80.0, "val_ppl": val_ppl, "launch_wall_s": 30.0}


def test_plan_keeps_one_global_batch_by_default_and_scales_it_per_gpu_seed_by_seed():
    same = mg.plan_runs([1, 2, 4], [0, 10], 2048)
    assert [(s.seed, s.gpus, s.global_batch) for s in same] == [
        (0, 1, 2048), (0, 2, 2048), (0, 4, 2048), (10, 1, 2048), (10, 2, 2048), (10, 4, 2048)]
    assert {s.scaling for s in same} == {"strong"}
    weak = mg.plan_runs([1, 2, 4], [0], 2048, per_gpu_batch=1024, fast_paths=["fused", "graph"])
    assert [(s.fast_path, s.gpus, s.global_batch) for s in weak] == [
        ("fused", 1, 1024), ("fused", 2, 2048), ("fused", 4, 4096),
        ("graph", 1, 1024), ("graph", 2, 2048), ("graph", 4, 4096)]
    assert {(s.scaling, s.batch_arg) for s in weak} == {("weak", 1024)}


def test_close_seeds_are_flagged():
    assert mg.original_overlap_note([0, 1, 2], epochs=4, gpus=2) is not None
    assert mg.original_overlap_note([0, 10, 20], epochs=4, gpus=2) is None
    assert mg.original_overlap_note([5], epochs=4, gpus=2) is None


def test_seed_and_fast_path_use_the_cli_flags_where_train_has_them_else_the_worker_entry():
    spec = mg.RunSpec(2, 7, 4096, "weak", 2048, "fused")
    cmd = mg.launch_command(spec, Path("d.txt"), Path("run"), 4, 3, {"--seed", "--fast-path"})
    assert cmd[cmd.index("--seed") + 1] == "7" and cmd[cmd.index("--fast-path") + 1] == "fused"
    assert "--nproc_per_node=2" in cmd and cmd[cmd.index("--batch-size") + 1] == "4096"
    assert cmd[cmd.index("-m", 3) + 1] == "newllm_nb"  # the CLI itself
    cmd = mg.launch_command(spec, Path("d.txt"), Path("run"), 4, 3, set())
    assert "--seed" not in cmd and mg.WORKER_FLAG in cmd
    assert mg.json.loads(cmd[cmd.index(mg.WORKER_FLAG) + 1]) == {"train__seed": 7, "train__fast_path": "fused"}
    plain = mg.launch_command(mg.RunSpec(1, None, 2048, "strong", 2048), Path("d"), Path("r"), 4, 3, set())
    assert mg.WORKER_FLAG not in plain and "--seed" not in plain  # without overrides: the CLI itself


def test_the_worker_entry_point_puts_the_overrides_into_the_cli_config(monkeypatch, tmp_path):
    from newllm_nb import cli

    seen = {}

    def record(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise ValueError("recorded")  # one of the CLI's user errors: main returns 2

    monkeypatch.setattr(cli, "run_experiment", record)
    monkeypatch.setattr(cli, "config_from_args", cli.config_from_args)  # restored after the test
    code = mg.worker_main({"train__seed": 11, "train__fast_path": "graph"},
                          ["train", "--data-path", str(SAMPLE), "--smoke", "--batch-size", "24", "--quiet",
                           "--run-dir", str(tmp_path / "r")])
    assert code == 2
    cfg = seen["cfg"]
    assert (cfg.train.seed, cfg.train.fast_path, cfg.train.batch_size) == (11, "graph", 24)


def test_a_row_takes_medians_of_the_later_epochs_and_the_lr_rule_of_the_global_batch():
    spec = mg.RunSpec(2, 3, 4096, "weak", 2048)
    hist = _history([9.0, 1.2, 1.0, 1.1], [1e6, 4e6, 5e6, 4.5e6], val_ppl=61.234)
    log = "data: ...\nfast path: cuda-graph+fused captured for batch 2048x63 in 6.8s\n"
    row = mg.make_row(spec, hist, _config(seed=3, batch=4096), log, 33.33)
    assert row["epoch_s"] == 1.1 and row["tokens_per_s"] == 4_500_000 and row["first_epoch_s"] == 9.0
    assert row["lr"] == pytest.approx(1e-4 * math.sqrt(4096 / 32), rel=1e-3)  # 1.13e-3
    assert (row["global_batch"], row["per_gpu_batch"], row["path"], row["val_ppl"]) == (4096, 2048,
                                                                                       "cuda-graph+fused", 61.23)
    assert mg.make_row(spec, hist, _config(seed=3, batch=4096, lr=2e-3), "", 1)["lr"] == 2e-3
    assert mg.training_path("") == "eager"
    assert mg.training_path("CUDA graph capture failed (X); training eagerly") == "eager (capture failed)"


def test_a_row_whose_config_misses_the_seed_or_batch_is_refused():
    hist = _history([2.0, 1.0], [1e6, 2e6])
    with pytest.raises(ValueError, match="seed 42 instead of 3"):
        mg.make_row(mg.RunSpec(1, 3, 2048, "strong", 2048), hist, _config(seed=42), "", 1)
    with pytest.raises(ValueError, match="batch_size 2048 instead of 4096"):
        mg.make_row(mg.RunSpec(2, 0, 4096, "weak", 2048), hist, _config(seed=0), "", 1)
    with pytest.raises(ValueError, match="fast_path 'auto' instead of 'graph'"):
        mg.make_row(mg.RunSpec(1, 0, 2048, "strong", 2048, "graph"), hist, _config(), "", 1)


def test_summary_speedup_efficiency_and_ppl_spread_compare_like_with_like():
    runs = pd.DataFrame([
        _run(1, 0, 100.0, 60.0), _run(1, 1, 110.0, 62.0), _run(1, 2, 90.0, 64.0),
        _run(2, 0, 160.0, 63.0), _run(2, 1, 180.0, 66.0),  # seed 2 on 2 GPUs did not finish
        _run(1, 0, 50.0, 70.0, fast_path="graph"), _run(2, 0, 90.0, 71.0, fast_path="graph"),
        _run(1, 0, 100.0, 60.0, scaling="weak"), _run(2, 0, 190.0, 58.0, scaling="weak"),
    ])
    s = mg.summarize(runs).set_index(["scaling", "fast_path", "gpus"])
    one, two = s.loc[("strong", "auto", 1)], s.loc[("strong", "auto", 2)]
    assert (one.runs, one.seeds, two.runs, two.seeds) == (3, "0,1,2", 2, "0,1")
    assert one.tokens_per_s == 100 and two.tokens_per_s == 170
    assert two.speedup == pytest.approx(170 / 105, abs=0.01)  # against seeds 0 and 1 on 1 GPU, not seed 2
    assert two.speedup == 1.62 and two["efficiency_%"] == 81.0 and one.speedup == 1.0
    assert (one.val_ppl_mean, one.val_ppl_std) == (62.0, 2.0)
    assert (two.val_ppl_mean, two.val_ppl_std) == (64.5, round(math.sqrt(4.5), 2))
    assert (two.dppl, two.dppl_sd) == (3.5, round(math.sqrt(0.5), 2))  # seed by seed: +3, +4
    assert s.loc[("strong", "graph", 2)].speedup == 1.8  # another path: its own baseline
    weak = s.loc[("weak", "auto", 2)]
    assert (weak.speedup, weak["efficiency_%"], weak.global_batch) == (1.9, 95.0, "4096")

    table = mg.run_table(runs)
    assert list(table.columns) == mg.RUN_COLUMNS
    assert list(table.speedup[:5]) == [1.0, 1.0, 1.0, 1.6, pytest.approx(1.64, abs=0.01)]  # same-seed baseline
    assert table.lr[0] == "0.0008"


def test_extra_flags_the_script_sets_itself_are_refused():
    with pytest.raises(SystemExit, match="--batch-size"):
        mg.main(["--gpus", "1", "--", "--batch-size", "64"])


@pytest.mark.skipif(not SAMPLE.exists(), reason="bundled WikiText sample missing")
def test_one_and_two_cpu_processes_end_to_end(tmp_path, capsys):
    """Weak scaling at 32 rows per process with a seed the CLI has no flag for: every row's config is checked
    against the request by the script, and the files under --out are written."""
    out = tmp_path / "out"
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    small = tmp_path / "wiki.txt"  # a third of the sample: a few steps per epoch
    small.write_text("".join(lines[: len(lines) // 3]), encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--file", str(small), "--repeat", "1",
           "--gpus", "1,2", "--seeds", "3", "--per-gpu-batch", "32", "--layers", "1", "--epochs", "1",
           "--out", str(out), "--csv", str(tmp_path / "rows.csv"), "--", "--seq-len", "16", "--vocab-size", "200"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no GPU visible: every process trains on the CPU (gloo)" in r.stdout
    rows = pd.read_csv(tmp_path / "rows.csv")
    assert list(rows.gpus) == [1, 2] and set(rows.seed) == {3}
    assert list(rows.global_batch) == [32, 64] and list(rows.per_gpu_batch) == [32, 32]
    assert list(rows.lr) == [pytest.approx(1e-4), pytest.approx(1e-4 * math.sqrt(2), rel=1e-3)]
    assert set(rows.path) == {"eager"} and (rows.val_ppl > 1).all() and (rows.tokens_per_s > 0).all()
    assert (out / "multi_gpu.csv").read_text() == (tmp_path / "rows.csv").read_text()
    log = (out / "multi_gpu.log").read_text()
    assert "summary (speed-up" in log and "[2/2] gpus2-seed3-b64:" in log
    assert "data parallel: 2 processes | global batch 64" in (out / "runs" / "gpus2-seed3-b64.log").read_text()
    capsys.readouterr()
    assert mg.main(["--summarize", str(tmp_path / "rows.csv")]) == 0
    assert "val_ppl_std" in capsys.readouterr().out

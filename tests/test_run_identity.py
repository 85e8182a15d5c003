"""A run folder's identity rests on every checkpoint in it, not on `last` alone: another configuration's
checkpoint means refusal (or an explicit overwrite), starting over says what it discards, and a run whose
best file is gone says so instead of reporting other metrics as its best."""

import shutil

import pytest

from newllm_nb.experiments.experiment import run_experiment
from newllm_nb.train.checkpoint import CheckpointError, load_model
from newllm_nb.train.runs import RunFolderError

from conftest import tiny_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_prepared):
    """A finished tiny run's folder (best, last, last.prev) and its result."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    res = run_experiment(tiny_config(), run_dir, prepared=tiny_prepared)
    return run_dir, res


def _copy(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    return run_dir


def test_a_folder_holding_only_another_configurations_best_is_refused(finished, tmp_path, tiny_prepared):
    run_dir = _copy(finished, tmp_path)
    for name in ("last.safetensors", "last.prev.safetensors"):  # deleted to save space
        (run_dir / name).unlink()
    best = (run_dir / "best.safetensors").read_bytes()
    with pytest.raises(RunFolderError, match=r"holds another configuration's run \(train.lr: .* there vs 0.001 now\) "
                                             r"in best.safetensors"):
        run_experiment(tiny_config(train__lr=1e-3), run_dir, prepared=tiny_prepared)
    assert (run_dir / "best.safetensors").read_bytes() == best


def test_any_foreign_checkpoint_in_the_folder_is_refused(finished, tmp_path, tiny_prepared):
    """Its own `last`, but an epoch_K file from another configuration beside it."""
    run_dir = _copy(finished, tmp_path)
    other = tmp_path / "other"
    run_experiment(tiny_config(train__lr=1e-3, train__epochs=1, train__keep_every=1), other, prepared=tiny_prepared)
    shutil.copy(other / "epoch_1.safetensors", run_dir / "epoch_1.safetensors")
    with pytest.raises(RunFolderError, match="another configuration's run .* in epoch_1.safetensors"):
        run_experiment(tiny_config(), run_dir, prepared=tiny_prepared)


def test_the_same_settings_report_a_finished_run_of_which_only_best_is_left(finished, tmp_path, tiny_prepared,
                                                                           capsys):
    run_dir = _copy(finished, tmp_path)
    for name in ("last.safetensors", "last.prev.safetensors"):
        (run_dir / name).unlink()
    best = (run_dir / "best.safetensors").read_bytes()
    res = run_experiment(tiny_config(), run_dir, prepared=tiny_prepared)
    out = capsys.readouterr().out
    assert "finished earlier (3 epochs; its last checkpoint is gone, best.safetensors is kept)" in out
    assert res.metrics == pytest.approx(finished[1].metrics)  # the same best weights, not a new run
    assert (run_dir / "best.safetensors").read_bytes() == best and not (run_dir / "last.safetensors").exists()


def test_an_unfinished_run_of_which_only_best_is_left_is_not_trained_over(tmp_path, tiny_prepared):
    run_dir = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(rec):
        raise Stop

    with pytest.raises(Stop):
        run_experiment(tiny_config(), run_dir, callbacks=[stop], prepared=tiny_prepared)
    for name in ("last.safetensors", "last.prev.safetensors"):
        (run_dir / name).unlink(missing_ok=True)
    with pytest.raises(RunFolderError, match="best.safetensors \\(epoch 1\\) but no last checkpoint to resume from"):
        run_experiment(tiny_config(), run_dir, prepared=tiny_prepared)


def test_no_resume_on_another_configurations_folder_needs_overwrite(finished, tmp_path, tiny_prepared, capsys):
    run_dir = _copy(finished, tmp_path)
    best = (run_dir / "best.safetensors").read_bytes()
    with pytest.raises(RunFolderError, match="another configuration's run"):
        run_experiment(tiny_config(train__lr=1e-3), run_dir, prepared=tiny_prepared, resume=False)
    assert (run_dir / "best.safetensors").read_bytes() == best
    res = run_experiment(tiny_config(train__lr=1e-3), run_dir, prepared=tiny_prepared, resume=False, overwrite=True)
    out = capsys.readouterr().out
    assert f"starting over in {run_dir}: discarding another configuration's run (best.safetensors, " in out
    assert len(res.history) == 3 and res.history[0]["lr"] == pytest.approx(1e-3)


def test_no_resume_on_its_own_run_names_what_it_discards(finished, tmp_path, tiny_prepared, capsys):
    run_dir = _copy(finished, tmp_path)
    res = run_experiment(tiny_config(), run_dir, prepared=tiny_prepared, resume=False)
    out = capsys.readouterr().out
    assert (f"starting over in {run_dir}: discarding this configuration's earlier run (best.safetensors, "
            f"last.prev.safetensors, last.safetensors, last saved at epoch 4 step 0)") in out
    assert "finished earlier" not in out and len(res.history) == 3


def test_a_finished_run_whose_best_is_missing_says_so(finished, tmp_path, tiny_prepared):
    run_dir = _copy(finished, tmp_path)
    (run_dir / "best.safetensors").unlink()
    with pytest.raises(RunFolderError, match="finished earlier but its best.safetensors is missing"):
        run_experiment(tiny_config(), run_dir, prepared=tiny_prepared)
    with pytest.raises(CheckpointError, match="no best.safetensors in .*last.safetensors is there"):
        load_model(run_dir)  # generate / chat on the folder: never the last weights in the best's place


def test_the_cli_refuses_and_overwrites_on_request(finished, tmp_path, capsys):
    from newllm_nb.cli import main

    run_dir = _copy(finished, tmp_path)
    argv = ["train", "--preset", "smoke", "--epochs", "1", "--quiet", "--device", "cpu", "--run-dir", str(run_dir)]
    assert main([*argv, "--no-resume"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert "discarding another configuration's run" in capsys.readouterr().out

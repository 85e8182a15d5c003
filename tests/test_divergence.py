"""A run whose validation loss stays above a uniform guess's (log V) or jumps far above its best stops as
diverged, naming the learning rate; a slow but healthy start does not."""

import math

import pytest

import newllm_nb.train.trainer as trainer_module
from newllm_nb.cli import main
from newllm_nb.train.trainer import BLOW_UP, UNIFORM_MARGIN, DivergedError

from conftest import make_trainer, tiny_config


def _scripted(monkeypatch, losses):
    """Validation returns these losses, epoch by epoch (training itself runs for real)."""
    it = iter(losses)
    monkeypatch.setattr(trainer_module, "evaluate",
                        lambda *a, **k: {"loss": next(it), "ppl": 1.0, "acc": 0.0, "tokens": 1})


def _fit(tiny_prepared, epochs, tmp_path=None):
    t = make_trainer(tiny_config(train__epochs=epochs, train__patience=epochs), tiny_prepared, tmp_path)
    return t, math.log(t.cfg.model.vocab_size)


def test_staying_above_the_uniform_guess_stops_the_run(monkeypatch, tiny_prepared, tmp_path):
    t, log_v = _fit(tiny_prepared, 5, tmp_path)
    _scripted(monkeypatch, [log_v + UNIFORM_MARGIN + 0.5] * 5)
    with pytest.raises(DivergedError, match=r"diverged at epoch 2: validation loss .* above .*log V\), for 2 epochs: "
                                            r"the learning rate \(lr=0.005\) is probably too high; try lr=0.0005"):
        t.fit()
    assert len(t.history) == 1  # the diverged epoch is not recorded as a result


def test_one_bad_epoch_then_recovery_is_not_divergence(monkeypatch, tiny_prepared):
    t, log_v = _fit(tiny_prepared, 4)
    _scripted(monkeypatch, [log_v + 3, log_v + 0.5, log_v + 1.5, log_v - 0.2])
    assert len(t.fit()) == 4


def test_a_slow_start_near_log_v_is_not_divergence(monkeypatch, tiny_prepared):
    """Just above log V, as a fresh model's loss is, for every epoch: only far above it counts."""
    t, log_v = _fit(tiny_prepared, 4)
    _scripted(monkeypatch, [log_v + 0.9, log_v + 0.5, log_v + 0.2, log_v + 0.05])
    assert len(t.fit()) == 4


def test_a_blow_up_far_above_the_best_stops_the_run(monkeypatch, tiny_prepared):
    t, log_v = _fit(tiny_prepared, 4)
    _scripted(monkeypatch, [3.0, 2.5, 2.5 + BLOW_UP + 0.1, 2.0])
    with pytest.raises(DivergedError, match=r"diverged at epoch 3: validation loss .* above its best 2.50"):
        t.fit()
    t, log_v = _fit(tiny_prepared, 4)
    _scripted(monkeypatch, [3.0, 2.5, 2.5 + BLOW_UP - 0.1, 2.0])  # overfitting, however bad, is early stopping's
    assert len(t.fit()) == 4


def test_a_real_slow_start_trains_on(tiny_prepared):
    t = make_trainer(tiny_config(train__lr=1e-6, train__epochs=3), tiny_prepared)
    history = t.fit()
    assert len(history) == 3
    assert all(abs(r["val_loss"] - math.log(t.cfg.model.vocab_size)) < 0.1 for r in history)  # near log V


def test_the_cli_stops_a_diverging_run_with_exit_2_naming_the_learning_rate(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--lr", "1", "--epochs", "4", "--quiet", "--device", "cpu",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "diverged" in err and "lr=1)" in err and "try lr=0.1" in err, err

import math

import pytest
import torch

from newllm_nb import NewLLM
from newllm_nb.data import prepare
from newllm_nb.data.batching import WindowData
from newllm_nb.kernels import workspace
from newllm_nb.train.checkpoint import CheckpointError, load_checkpoint
from newllm_nb.train.metrics import Metrics, evaluate
from newllm_nb.train.optim import lr_at
from newllm_nb.train.runs import RunFolderError
from newllm_nb.train.trainer import NonFiniteLossError

from conftest import make_trainer as make
from conftest import tiny_config as tiny


@pytest.fixture
def prepared(tiny_prepared):
    return tiny_prepared


def test_loss_falls_on_the_bundled_sample(prepared):
    hist = make(tiny(train__epochs=4), prepared).fit()
    assert len(hist) == 4
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.3
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert math.log(prepared.tokenizer.vocab_size) > hist[-1]["val_loss"]
    for k in ("train_loss", "val_loss", "val_ppl", "val_acc", "tokens_per_s", "seconds", "lr"):
        assert math.isfinite(hist[-1][k]), k


def test_the_cpu_steps_kept_buffers_go_back_when_training_ends(prepared):
    kept = []
    t = make(tiny(train__epochs=1), prepared, step_callbacks=[lambda r: kept.append(len(workspace._buffers()))])
    t.fit()
    assert t.step.used == "eager+bptt" and kept and min(kept) > 0  # the BPTT step keeps its buffers between steps
    assert not workspace._buffers()


def _losses(h):
    return [(r["epoch"], r["train_loss"], r["val_loss"], r["val_acc"], r["lr"], r["best"]) for r in h]


@pytest.mark.parametrize("mode,ema", [("windows", 0.0), ("stream", 0.0), ("stream", 0.9)])
def test_stop_then_resume_equals_uninterrupted(tmp_path, mode, ema):
    cfg = tiny(train__epochs=4, data__mode=mode, train__optimizer="adamw", train__schedule="cosine",
               train__warmup_steps=3, train__weight_decay=0.01, train__ema_decay=ema, model__tie_embeddings=ema > 0)
    p = prepare(cfg.data, 200)
    full = make(cfg, p).fit()

    class Stop(Exception):
        pass

    def stop_after_two(rec):
        if rec["epoch"] == 2:
            raise Stop

    first = make(cfg, p, tmp_path)
    first.callbacks.append(stop_after_two)
    with pytest.raises(Stop):
        first.fit()
    assert load_checkpoint(tmp_path / "last.safetensors").trainer_state["epoch"] == 2
    # A fresh process would do exactly this: same config, same run dir -> resumes at epoch 3.
    resumed = make(cfg, p, tmp_path).fit()
    assert len(resumed) == 4
    for a, b in zip(_losses(full), _losses(resumed)):
        assert a[0] == b[0] and a[5] == b[5]
        assert a[1:5] == pytest.approx(b[1:5], rel=1e-5, abs=1e-7)


def test_weight_average_math_and_swap():
    from newllm_nb.train.optim import WeightAverage

    lin = torch.nn.Linear(3, 2)
    avg = WeightAverage(lin, 0.5)
    start = [p.detach().clone() for p in lin.parameters()]
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    avg.update()  # decay min(0.5, 2/11): shadow = start + (1 - 2/11) * 1
    for s0, sh in zip(start, avg.shadow):
        torch.testing.assert_close(sh, s0 + 9 / 11)
    trained = [p.detach().clone() for p in lin.parameters()]
    with avg.applied():
        for p, sh in zip(lin.parameters(), avg.shadow):
            torch.testing.assert_close(p, sh)
    for p, t in zip(lin.parameters(), trained):  # restored afterwards
        torch.testing.assert_close(p, t)


def test_validation_and_best_use_the_averaged_weights(tmp_path, prepared):
    cfg = tiny(train__epochs=3, train__ema_decay=0.95)
    t = make(cfg, prepared, tmp_path)
    hist = t.fit()
    raw = [p.detach().clone() for p in t.model.parameters()]
    assert any(not torch.equal(r, s) for r, s in zip(raw, t.ema.shadow))
    with t.ema.applied():  # the trainer validated with batch 16 on its device and precision
        averaged = evaluate(t.model, prepared.valid, 16, t.device, t.precision)
    assert hist[-1]["val_loss"] == pytest.approx(averaged["loss"], rel=1e-6)
    assert evaluate(t.model, prepared.valid, 16, t.device, t.precision)["loss"] != pytest.approx(averaged["loss"],
                                                                                               rel=1e-6)
    last = load_checkpoint(tmp_path / "last.safetensors")  # resumable: the trained weights + the average
    for (name, _), r in zip(t.model.named_parameters(), raw):
        assert torch.equal(last.tensors[f"model.{name}"], r.cpu())
    assert hist[-1]["best"]  # still improving at epoch 3, so `best` holds the final averaged weights
    best = load_checkpoint(tmp_path / "best.safetensors")
    for (name, _), s in zip(t.model.named_parameters(), t.ema.shadow):
        assert torch.equal(best.tensors[f"model.{name}"], s.cpu())


def test_a_state_without_the_average_the_recipe_needs_is_a_clear_error(tmp_path, prepared):
    t = make(tiny(train__epochs=1), prepared, tmp_path)
    t.fit()
    averaged = make(tiny(train__epochs=1, train__ema_decay=0.9), prepared)
    with pytest.raises(CheckpointError, match="no weight average"):
        averaged.state.restore(load_checkpoint(tmp_path / "last.safetensors"), averaged.device)


@pytest.mark.parametrize("change,named", [(dict(model__hidden_dim=48), "model.hidden_dim"),
                                          (dict(train__ema_decay=0.9), "train.ema_decay"),
                                          (dict(train__epochs=3), "train.epochs"),
                                          (dict(train__lr=1e-3), "train.lr")])
def test_finished_run_is_reported_and_other_settings_refused(tmp_path, prepared, capsys, change, named):
    h = make(tiny(train__epochs=1), prepared, tmp_path).fit()
    again = make(tiny(train__epochs=1), prepared, tmp_path)
    assert again.fit() == h
    assert "finished earlier (1 epochs): not trained again" in capsys.readouterr().out
    def files():
        return sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.glob("*.safetensors"))

    before = files()
    with pytest.raises(RunFolderError, match=rf"another configuration's run \({named}: "):
        make(tiny(**{"train__epochs": 1, **change}), prepared, tmp_path).fit()
    assert files() == before  # no checkpoint touched


def test_other_data_is_refused_too(tmp_path, prepared):
    make(tiny(train__epochs=1), prepared, tmp_path).fit()
    other = prepare(tiny(data__max_examples=30).data, 200)
    with pytest.raises(RunFolderError, match=r"data\.train_sha256"):
        make(tiny(train__epochs=1, data__max_examples=60), other, tmp_path).fit()


def test_nonfinite_loss_is_skipped_counted_then_stops(tmp_path, prepared):
    t = make(tiny(train__epochs=2, train__max_nonfinite=3), prepared, tmp_path)
    calls = {"n": 0}

    def inject_nan_once(loss):
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 2 else loss

    t.step.loss_hook = inject_nan_once
    before = [p.detach().clone() for p in t.model.parameters()]
    hist = t.fit()
    assert hist[0]["nonfinite_steps"] == 1 and math.isfinite(hist[-1]["val_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))

    t2 = make(tiny(train__epochs=2, train__max_nonfinite=3), prepared, tmp_path / "b")
    t2.step.loss_hook = lambda loss: loss * float("nan")
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite.*learning rate.*Last good checkpoint"):
        t2.fit()


def test_nonfinite_step_leaves_weights_untouched(prepared):
    t = make(tiny(train__epochs=1, train__max_nonfinite=100), prepared)
    t.step.loss_hook = lambda loss: loss * float("inf")
    before = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(NonFiniteLossError, match="training loss is not finite at epoch 1"):
        t.fit()  # every step skipped: the epoch has no loss to report, and the run fails
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert t.state.nonfinite_epoch == t.train_data.num_batches(16)


def test_metrics_token_weighted_vs_original_per_batch():
    m, s = Metrics(False), Metrics(True)
    for ls, n, c in [(10.0, 10, 5), (1.0, 1, 0)]:
        m.add(torch.tensor(ls), torch.tensor(n), torch.tensor(c))
        s.add(torch.tensor(ls), torch.tensor(n), torch.tensor(c))
    assert m.result()["loss"] == pytest.approx(11 / 11) and m.result()["acc"] == pytest.approx(5 / 11)
    assert s.result()["acc"] == pytest.approx((0.5 + 0.0) / 2)
    x = torch.tensor([[2, 5, 6, 0], [2, 7, 0, 0]])
    data = WindowData(x)
    model = NewLLM(tiny().model)
    r = evaluate(model, data)
    assert r["tokens"] == 3  # PAD targets not counted


def test_lr_schedule_warmup_cosine():
    tc = tiny(train__schedule="cosine", train__warmup_steps=10, train__lr=1e-3, train__min_lr_ratio=0.1).train
    assert lr_at(tc, 0, 100) == pytest.approx(1e-4)
    assert lr_at(tc, 9, 100) == pytest.approx(1e-3)
    assert lr_at(tc, 100, 100) == pytest.approx(1e-4)
    assert lr_at(tiny(train__lr=2e-3).train, 50, 100) == pytest.approx(2e-3)


def test_fp16_on_cpu_is_a_clear_error(prepared):
    with pytest.raises(ValueError, match="precision='fp16'"):
        make(tiny(train__precision="fp16", train__device="cpu"), prepared)


def test_cuda_oom_is_caught_with_advice_and_last_checkpoint_kept(tmp_path, prepared):
    t = make(tiny(train__epochs=3), prepared, tmp_path)
    calls = {"n": 0}
    steps_per_epoch = prepared.train.num_batches(16)

    def oom_in_second_epoch(loss):
        calls["n"] += 1
        if calls["n"] > steps_per_epoch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss

    t.step.loss_hook = oom_in_second_epoch
    with pytest.raises(RuntimeError, match=r"out of memory at batch_size=16: try batch_size=8.*last.safetensors"):
        t.fit()
    assert load_checkpoint(tmp_path / "last.safetensors").trainer_state["epoch"] == 1


def test_keep_every_and_bounded_checkpoint_files(tmp_path, prepared):
    make(tiny(train__epochs=4, train__keep_every=2), prepared, tmp_path).fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".lock", "best.safetensors", "epoch_2.safetensors", "epoch_4.safetensors",
                     "last.prev.safetensors", "last.safetensors"]


def test_sweep_saves_each_run_and_skips_finished_ones(tmp_path, prepared, capsys):
    from newllm_nb.experiments.sweep import run_sweep

    cfg = tiny(train__epochs=1, model__vocab_size=prepared.tokenizer.vocab_size)
    df = run_sweep(cfg, [1, 2], tmp_path, archs=("newllm", "lstm"), prepared=prepared)
    assert list(zip(df.arch, df.layers)) == [("newllm", 1), ("newllm", 2), ("lstm", 1), ("lstm", 2)]
    assert df.params.iloc[2] == pytest.approx(df.params.iloc[0], rel=0.1)  # LSTM sized to match
    again = run_sweep(cfg, [1, 2], tmp_path, archs=("newllm", "lstm"), prepared=prepared)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert again.equals(df)
    other = run_sweep(tiny(train__epochs=1, train__lr=1e-3, model__vocab_size=prepared.tokenizer.vocab_size), [1],
                      tmp_path, prepared=prepared)  # other settings: trained, not read from the folder above
    assert "finished earlier" not in capsys.readouterr().out
    assert other.best_val_ppl.iloc[0] != df.best_val_ppl.iloc[0]


def test_without_checkpoints_the_result_keeps_the_averaged_weights(monkeypatch):
    from newllm_nb.experiments.experiment import run_experiment

    monkeypatch.setenv("NEWLLM_SMOKE", "1")
    cfg = tiny(train__epochs=2, train__ema_decay=0.9, train__show_progress=False)
    r = run_experiment(cfg, None)  # no run folder, so no `best` file to reload
    assert r.metrics["loss"] == pytest.approx(r.history[-1]["val_loss"], rel=1e-6)

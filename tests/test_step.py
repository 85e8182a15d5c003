"""The graphed step computes the same function as the eager step.

CPU: the static-buffer step (everything but the capture) equals the eager step exactly.
GPU (runs where CUDA exists, e.g. on the lent H100): after several optimizer steps the CUDA-graph
path's losses and weights match the eager path within AMP tolerance.
"""

import pytest
import torch

from newllm_nb import ModelConfig, NewLLM
from newllm_nb.config import DataConfig, RunConfig, TrainConfig
from newllm_nb.data.batching import Batch
from newllm_nb.train.step import GraphedStep, make_step
from newllm_nb.train.trainer import Trainer


def _trainer(device, precision, fast_path, dropout=0.0, layers=2, lr=1e-2, tie=False, ema=0.0, **model_kw):
    torch.manual_seed(0)
    cfg = RunConfig(ModelConfig(vocab_size=64, embed_dim=16, context_dim=16, hidden_dim=32, num_layers=layers,
                                dropout=dropout, tie_embeddings=tie, **model_kw),
                    DataConfig(max_seq_length=9), TrainConfig(batch_size=8, lr=lr, precision=precision,
                                                              fast_path=fast_path, device=device, ema_decay=ema))
    return Trainer(NewLLM(cfg.model), None, None, cfg)


def _small_scale(t):
    """fp16: start below GradScaler's default 65536 so the first steps do not overflow."""
    t.scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    t.step = make_step(t.cfg.train.fast_path, t.model, t.optimizer, t.scaler, t.device, t.precision)


def _batches(n, stateful, B=8, T=8):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randint(4, 64, (B, T + 1), generator=g)
        r = (torch.rand(B, T, generator=g) < 0.1) if stateful else None
        out.append(Batch(x[:, :-1], x[:, 1:], r, stateful and i > 0))
    return out


@pytest.mark.parametrize("stateful,tie,ema", [(False, False, 0.0), (True, False, 0.0), (True, True, 0.9)])
def test_static_buffer_step_equals_eager_on_cpu(stateful, tie, ema):
    eager = _trainer("cpu", "fp32", "off", tie=tie, ema=ema)
    static = _trainer("cpu", "fp32", "off", tie=tie, ema=ema)
    static.step = GraphedStep(static.model, static.optimizer, static.scaler, static.device, static.precision,
                              recurrence=None, use_graph=False)
    ce = cs = None
    for b in _batches(5, stateful):
        e, s = eager.step(b, ce, 1.0), static.step(b, cs, 1.0)
        ce, cs = e.context, s.context
        torch.testing.assert_close(e.loss_sum, s.loss_sum)
        assert static.step.used == "static-eager"
    for pe, ps in zip(eager.model.parameters(), static.model.parameters()):
        torch.testing.assert_close(pe, ps)
    torch.testing.assert_close(ce, cs)


def test_fast_path_declines_other_shapes_and_models():
    t = _trainer("cpu", "fp32", "off")
    fast = GraphedStep(t.model, t.optimizer, t.scaler, t.device, t.precision, use_graph=False)
    fast(_batches(1, False)[0], None, 1.0)
    assert fast.used == "static-eager"
    fast(_batches(1, False, B=4)[0], None, 1.0)  # a shorter batch of windows: PAD rows, same buffers
    assert fast.used == "static-eager"
    fast(_batches(1, False, B=8, T=6)[0], None, 1.0)  # another window length -> eager
    assert fast.used == "eager"
    fast(_batches(2, True, B=4)[1], None, 1.0)  # a stateful batch of another shape -> eager
    assert fast.used == "eager"
    from newllm_nb.models.baselines import LSTMLM

    lstm = LSTMLM(ModelConfig(vocab_size=64, embed_dim=16, lstm_hidden=16))
    opt = torch.optim.Adam(lstm.parameters())
    other = GraphedStep(lstm, opt, t.scaler, t.device, t.precision)
    other(_batches(1, False)[0], None, 1.0)
    assert other.used == "eager"


def test_shorter_last_batch_is_padded_into_the_static_buffers_with_the_same_update():
    """An epoch's last, shorter batch of windows replays the captured shape with PAD rows: loss sum, token
    count, correct count and the updated weights equal the eager step's on that batch alone."""
    eager = _trainer("cpu", "fp32", "off")
    static = _trainer("cpu", "fp32", "off")
    static.step = GraphedStep(static.model, static.optimizer, static.scaler, static.device, static.precision,
                              recurrence=None, use_graph=False)
    for b in _batches(2, False) + _batches(1, False, B=3):
        e, s = eager.step(b, None, 1.0), static.step(b, None, 1.0)
        assert static.step.used == "static-eager"
        for a, c in ((e.loss_sum, s.loss_sum), (e.n, s.n), (e.correct, s.correct)):
            torch.testing.assert_close(a, c)
    assert static.step.static["x"].shape[0] == 8 and int(s.n) == int((b.y != 0).sum())
    for pe, ps in zip(eager.model.parameters(), static.model.parameters()):
        torch.testing.assert_close(pe, ps)


def test_a_run_resumed_on_a_short_batch_captures_again_at_the_full_size():
    """Resuming on an epoch's short last batch allocates the static buffers at that size; the next full batch
    must take them over at its size (the graph captured again once), not train eagerly from then on."""
    eager = _trainer("cpu", "fp32", "off")
    static = _trainer("cpu", "fp32", "off")
    static.step = GraphedStep(static.model, static.optimizer, static.scaler, static.device, static.precision,
                              recurrence=None, use_graph=False)
    for b in _batches(1, False, B=3) + _batches(2, False) + _batches(1, False, B=5):
        e, s = eager.step(b, None, 1.0), static.step(b, None, 1.0)
        assert static.step.used == "static-eager"
        torch.testing.assert_close(e.loss_sum, s.loss_sum)
    assert static.step.sig[0] == 8
    for pe, ps in zip(eager.model.parameters(), static.model.parameters()):
        torch.testing.assert_close(pe, ps)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _grads_match(eager, fast, b, tol, context=None):
    """Gradients of one step from identical weights (and carried state). Under AMP both paths round
    differently, so each is measured against an fp32 eager reference: the fast path must be within
    ``tol`` of it, or at worst twice as far as the eager AMP path is."""
    ref = _trainer("cuda", "fp32", "off", tie=fast.model.config.tie_embeddings)
    grads = {}
    for name, t in (("eager", eager), ("ref", ref)):
        t.model.load_state_dict(fast.model.state_dict())
        t.step.forward_backward(b, None if context is None else context.clone())
        grads[name] = [p.grad.float() / t.scaler.get_scale() for p in t.model.parameters()]
    fast.step.forward_backward(b, context)
    grads["fast"] = [p.grad.float() / fast.scaler.get_scale() for p in fast.model.parameters()]
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    assert torch.isfinite(flat["fast"]).all() and torch.isfinite(flat["eager"]).all()
    # All gradients as one vector: small bias vectors alone make a noisy relative measure.
    err_fast, err_eager = _rel(flat["fast"], flat["ref"]), _rel(flat["eager"], flat["ref"])
    assert err_fast < max(tol, 2 * err_eager), (err_fast, err_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["graph", "graph-autograd"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("stateful,tie", [(False, False), (True, False), (True, True)])
def test_cuda_graph_matches_eager_on_gpu(precision, stateful, mode, tie):
    # AMP tolerance: 5% relative gradient-norm error against fp32 (bf16 keeps ~3 significant digits and
    # the error compounds through the recurrence); fp32 must agree to 1e-4.
    tol = 1e-4 if precision == "fp32" else 5e-2
    batches = _batches(7, stateful)
    eager, fast = _trainer("cuda", precision, "off", tie=tie), _trainer("cuda", precision, mode, tie=tie)
    if precision == "fp16":  # start below GradScaler's default 65536 so the first steps do not overflow
        for t in (eager, fast):
            _small_scale(t)
    _grads_match(eager, fast, batches[0], tol)  # first step
    eager, fast = _trainer("cuda", precision, "off", tie=tie), _trainer("cuda", precision, mode, tie=tie)
    if precision == "fp16":
        for t in (eager, fast):
            _small_scale(t)
    losses = []
    ce = cf = None
    for b in batches[:6]:  # several optimizer steps: the same losses
        n = (b.y != 0).sum().cuda()
        e, f = eager.step(b, ce, 1.0), fast.step(b, cf, 1.0)
        ce, cf = e.context, f.context
        losses.append((float(e.loss_sum / n), float(f.loss_sum / n)))
    assert fast.step.used.startswith("cuda-graph")
    for le, lf in losses:
        assert abs(le - lf) <= min(tol, 3e-2) * max(1.0, abs(le)), losses
    _grads_match(eager, fast, batches[6], tol, cf)  # gradients after those steps, from the fast path's weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_draws_fresh_dropout_masks_on_gpu():
    # Every dropout on (FNN, embedding, input, output, context). Each graph replay must draw new masks,
    # not repeat the captured ones, and its losses must follow the eager path's distribution. The lr is
    # tiny so the weights (and so that distribution) stay put over the draws.
    b = _batches(1, False)[0]
    n = float((b.y != 0).sum())
    eager, fast = (_trainer("cuda", "fp32", mode, dropout=0.3, lr=1e-9, embed_dropout=0.1, input_dropout=0.3,
                            output_dropout=0.3, context_dropout=0.2) for mode in ("off", "graph"))
    # Weights away from the N(0, 0.02) init: near init the logits are almost uniform and every mask gives
    # about the same loss (log 64), so fresh and repeated masks would look alike.
    torch.manual_seed(1)
    for pe, pf in zip(eager.model.parameters(), fast.model.parameters()):
        pe.data.add_(torch.randn_like(pe), alpha=0.3)
        pf.data.copy_(pe.data)
    le = torch.tensor([float(eager.step(b, None, 1.0).loss_sum) / n for _ in range(24)])
    lf = torch.tensor([float(fast.step(b, None, 1.0).loss_sum) / n for _ in range(24)])
    assert fast.step.used.startswith("cuda-graph")
    assert len(set(lf.tolist())) == len(lf), lf  # fresh masks on every replay
    assert lf.std() > 0.25 * le.std() and lf.std() < 4 * le.std(), (le.std(), lf.std())
    se = (le.var() / len(le) + lf.var() / len(lf)).sqrt()
    assert abs(le.mean() - lf.mean()) < 4 * se, (le.mean(), lf.mean(), se)

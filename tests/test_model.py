import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from newllm_nb import ModelConfig, NewLLM
from newllm_nb.config import CONTEXT_CLAMP, LN_EPS
from newllm_nb.kernels.recurrence import Dropout, Matmul, NewLLMRecurrence
from newllm_nb.models.newllm import count_parameters

ORIGINAL_PARAMS = {1: 1_426_152, 4: 2_214_120, 6: 2_739_432}


@pytest.mark.parametrize("layers", sorted(ORIGINAL_PARAMS))
def test_parameter_counts_at_original_defaults(layers):
    assert count_parameters(NewLLM(ModelConfig(num_layers=layers))) == ORIGINAL_PARAMS[layers]


def test_init_is_normal_002_with_zero_biases():
    m = NewLLM(ModelConfig(num_layers=2))
    w = torch.cat([m.embed.weight.flatten(), m.fnn[0].weight.flatten(), m.head.weight.flatten()])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert all(float(layer.bias.detach().abs().max()) == 0 for layer in [*m.fnn, m.gates, m.head])


def literal_loop(m: NewLLM, ids, c=None, reset=None):
    """The original cell's equations once more, with nothing hoisted and W_f / W_i / W_u as separate matrices:
    the check of the reference cell (kernels/reference.py) and of the model's hoisting around it."""
    cfg = m.config
    C = cfg.context_dim
    W_f, W_i, W_u = m.gates.weight[:C], m.gates.weight[C:2 * C], m.gates.weight[2 * C:]
    b_f, b_i, b_u = m.gates.bias[:C], m.gates.bias[C:2 * C], m.gates.bias[2 * C:]
    B, T = ids.shape
    c = torch.zeros(B, C) if c is None else c
    out = []
    for t in range(T):
        if reset is not None:
            c = torch.where(reset[:, t, None], torch.zeros_like(c), c)
        h = torch.cat([m.embed(ids[:, t]), c], dim=-1)
        for layer in m.fnn:
            h = F.relu(layer(h))
        out.append(m.head(h))
        u = h @ W_u.T + b_u
        if cfg.context_tanh:
            u = torch.tanh(u)
        pre = torch.sigmoid(h @ W_f.T + b_f) * c + torch.sigmoid(h @ W_i.T + b_i) * u
        c = torch.clamp(F.layer_norm(pre, (C,), m.norm.weight, m.norm.bias, LN_EPS), -CONTEXT_CLAMP, CONTEXT_CLAMP)
    return torch.stack(out, 1), c


def test_the_cell_constants_are_the_seeds():
    assert (CONTEXT_CLAMP, LN_EPS) == (10.0, 1e-5)  # c_t = clamp(LayerNorm(...), -10, 10), torch's LayerNorm eps


def small(**kw):
    return ModelConfig(vocab_size=50, embed_dim=12, context_dim=10, hidden_dim=16, dropout=0.0, **kw)


@pytest.mark.parametrize("layers,tanh,with_reset", [(1, False, False), (3, False, True), (2, True, False)])
def test_hoisted_forward_matches_literal_loop_outputs_and_gradients(layers, tanh, with_reset):
    torch.manual_seed(0)
    m = NewLLM(small(num_layers=layers, context_tanh=tanh))
    with torch.no_grad():  # non-trivial biases / LayerNorm so every term is exercised
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 50, (3, 9))
    c0 = torch.randn(3, 10)
    reset = (torch.rand(3, 9) < 0.3) if with_reset else None
    logits, c = m(ids, c0, reset)
    ref_logits, ref_c = literal_loop(m, ids, c0, reset)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, ref_c, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad((logits.square().mean() + c.sum()), list(m.parameters()))
    g_ref = torch.autograd.grad((ref_logits.square().mean() + ref_c.sum()), list(m.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_state_carried_over_two_calls_equals_one_call():
    torch.manual_seed(1)
    m = NewLLM(small(num_layers=2)).eval()
    ids = torch.randint(0, 50, (2, 20))
    full_logits, full_c = m(ids)
    a_logits, a_c = m(ids[:, :7])
    b_logits, b_c = m(ids[:, 7:], a_c)
    torch.testing.assert_close(torch.cat([a_logits, b_logits], 1), full_logits)
    torch.testing.assert_close(b_c, full_c)


@pytest.mark.parametrize("tie", [False, True])
def test_step_equals_forward_and_trajectory_has_every_context(tie):
    torch.manual_seed(2)
    m = NewLLM(small(num_layers=2, tie_embeddings=tie, embed_dropout=0.3)).eval()
    ids = torch.randint(0, 50, (2, 6))
    logits, c, traj = m(ids, return_trajectory=True)
    assert traj.shape == (2, 6, 10)
    ctx = m.init_context(2)
    for t in range(6):
        step_logits, ctx = m.step(ids[:, t], ctx)
        torch.testing.assert_close(step_logits, logits[:, t])
        torch.testing.assert_close(ctx, traj[:, t])
    assert float(traj.detach().abs().max()) <= CONTEXT_CLAMP


def test_reset_mask_equals_separate_runs():
    torch.manual_seed(3)
    m = NewLLM(small()).eval()
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 4))
    reset = torch.zeros(1, 9, dtype=torch.bool)
    reset[0, 5] = True
    logits, _ = m(torch.cat([a, b], 1), reset=reset)
    torch.testing.assert_close(logits[:, 5:], m(b)[0])


def test_context_dropout_only_in_training():
    # small() has no other dropout, so any randomness in training comes from the context dropout.
    torch.manual_seed(0)
    m = _away_from_init(NewLLM(dataclasses.replace(small(), context_dropout=0.5)))
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        a, b = m(ids)[0], m(ids)[0]
        assert not torch.allclose(a, b)  # fresh masks on the context path while training
        m.eval()
        torch.testing.assert_close(m(ids)[0], m(ids)[0])


def _away_from_init(m: NewLLM) -> NewLLM:
    """Perturb the weights out of the tiny-init regime, where LayerNorm amplifies fp32 rounding."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _assert_fused_matches_autograd(m, ids, c0=None, reset=None, mask_seed=None) -> torch.Tensor:
    """Run ``m`` with autograd and with the hand-written BPTT (re-seeding before each when ``mask_seed`` is
    given, so both draw the same dropout masks); logits, final context and gradients must agree. Returns
    the fused logits."""
    wrt = ([] if c0 is None else [c0]) + list(m.parameters())
    outs = {}
    for fused in (False, True):
        if mask_seed is not None:
            torch.manual_seed(mask_seed)
        logits, c = m(ids, c0, reset, recurrence=NewLLMRecurrence.apply if fused else None)
        outs[fused] = (logits, c, torch.autograd.grad(logits.square().mean() + c.sum(), wrt))
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[True][2], outs[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return outs[True][0]


@pytest.mark.parametrize("layers,with_reset", [(1, False), (3, True)])
def test_hand_written_bptt_equals_the_reference_loop(layers, with_reset):
    torch.manual_seed(0)
    m = _away_from_init(NewLLM(small(num_layers=layers)))
    ids = torch.randint(0, 50, (3, 9))
    c0 = torch.randn(3, 10, requires_grad=True)
    reset = (torch.rand(3, 9) < 0.3) if with_reset else None
    _assert_fused_matches_autograd(m, ids, c0, reset)


@contextlib.contextmanager
def onednn_enabled(enabled: bool):
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@pytest.mark.parametrize("layers,with_reset", [(1, False), (3, True)])
def test_hand_written_bptt_without_onednn_equals_the_reference_loop(layers, with_reset):
    """The mm / addmm products (the path off CPU, or with oneDNN off) against the reference too."""
    torch.manual_seed(0)
    m = _away_from_init(NewLLM(small(num_layers=layers)))
    ids = torch.randint(0, 50, (3, 9))
    reset = (torch.rand(3, 9) < 0.3) if with_reset else None
    with onednn_enabled(False):
        assert Matmul(torch.device("cpu"), torch.float32).op is None
        _assert_fused_matches_autograd(m, ids, torch.randn(3, 10, requires_grad=True), reset)


@pytest.mark.parametrize("onednn", [True, False])
def test_recurrence_matmul_computes_every_form_it_is_asked_for(onednn):
    torch.manual_seed(0)
    x, w, b, other = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7), torch.randn(5, 7)
    mask = (torch.rand(5, 7) < 0.7).float() / 0.7
    with onednn_enabled(onednn):
        mm = Matmul(torch.device("cpu"), torch.float32)
        assert (mm.op is not None) == (onednn and torch.backends.mkldnn.is_available())
        out = torch.empty(5, 7)
        cases = {(None, False, None): x @ w.t(), ("b", False, None): x @ w.t() + b,
                 ("b", True, None): F.relu(x @ w.t() + b), ("o", False, None): x @ w.t() + other,
                 ("o", True, None): F.relu(x @ w.t() + other), ("b", True, "m"): F.relu(x @ w.t() + b) * mask,
                 ("o", True, "m"): F.relu(x @ w.t() + other) * mask, (None, True, "m"): F.relu(x @ w.t()) * mask}
        for weight in (w, mm.pack(w, 5)):
            for (add, relu, m), want in cases.items():
                kw = dict(add={None: None, "b": b, "o": other}[add], relu=relu, mask=mask if m else None)
                torch.testing.assert_close(mm(x, weight, **kw), want)
                got = mm(x, weight, out=out, **kw)
                assert got.data_ptr() == out.data_ptr()
                torch.testing.assert_close(out, want)
        torch.testing.assert_close(mm(x.t(), other.t()), x.t() @ other)  # strided operands
        torch.testing.assert_close(mm.weight_grad(other, x), other.t() @ x)  # a weight's gradient over 5 rows


@pytest.mark.parametrize("onednn", [True, False])
def test_a_packed_weight_gives_the_plain_weights_products_for_any_rows(onednn):
    torch.manual_seed(0)
    w, b = torch.randn(24, 16), torch.randn(24)
    with onednn_enabled(onednn):
        mm = Matmul(torch.device("cpu"), torch.float32)
        packed = mm.pack(w, 8)
        assert (packed is w) == (mm.op is None)  # oneDNN off: the weight itself
        for rows in (8, 3, 40):
            x = torch.randn(rows, 16)
            assert torch.equal(mm(x, packed, b, relu=True), mm(x, w, b, relu=True))
            torch.testing.assert_close(mm(x, packed, b), x @ w.t() + b)


def test_cpu_dropout_drops_its_fraction_and_scales_the_rest():
    torch.manual_seed(0)
    drop = Dropout(20, 2, 64, 128, 0.1, torch.float32, torch.device("cpu"), chunk=8)
    assert drop.bits and abs(drop.p - 0.1) <= 2 ** -17
    masks = torch.stack([drop(t).clone() for t in range(20)])  # [T, L, B, H]
    kept = masks != 0
    assert 0.08 < 1 - kept.float().mean().item() < 0.12
    torch.testing.assert_close(masks[kept], torch.full_like(masks[kept], 1 / (1 - drop.p)))
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[0, 0], kept[0, 1])  # fresh draws
    assert abs(masks.mean().item() - 1) < 0.01  # unbiased: the mean is kept
    torch.manual_seed(0)
    one = Dropout(20, 2, 64, 128, 0.1, torch.float32, torch.device("cpu"), chunk=1)
    torch.testing.assert_close(torch.stack([one(t).clone() for t in range(20)]), masks, rtol=0, atol=0)


@pytest.mark.parametrize("ctx_drop", [0.0, 0.3])
def test_hand_written_bptt_dropout_is_active_only_in_training(ctx_drop):
    torch.manual_seed(0)
    m = NewLLM(dataclasses.replace(small(num_layers=2), dropout=0.5, context_dropout=ctx_drop))
    ids = torch.randint(0, 50, (2, 6))
    a, b = (m(ids, recurrence=NewLLMRecurrence.apply)[0] for _ in range(2))
    assert not torch.allclose(a, b)  # fresh masks each call
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    a, b = (m(ids, recurrence=NewLLMRecurrence.apply)[0] for _ in range(2))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layers", [1, 3])
def test_hand_written_bptt_with_fnn_dropout_matches_the_reference_on_the_same_masks(layers):
    """A hidden size not a multiple of 4 makes the BPTT draw its masks by ``bernoulli_``, layer by layer and step
    by step as the reference's ``nn.Dropout`` does: re-seeded, both drop the same units, so the gradients through
    the kept units (relu' x 1 / (1 - p)) are compared."""
    torch.manual_seed(0)
    m = _away_from_init(NewLLM(dataclasses.replace(small(num_layers=layers), hidden_dim=18, dropout=0.4)))
    assert not Dropout(2, layers, 3, 18, 0.4, torch.float32, torch.device("cpu")).bits
    ids, c0 = torch.randint(0, 50, (3, 7)), torch.randn(3, 10, requires_grad=True)
    logits = _assert_fused_matches_autograd(m, ids, c0, mask_seed=3)
    m.eval()
    assert not torch.allclose(m(ids, c0)[0], logits)  # the masks were in force


def test_hand_written_bptt_with_context_dropout_matches_the_reference_on_the_same_masks():
    """Same masks for both: draw them from one seed (both paths consume bernoulli draws in the same
    order when dropout on h is off)."""
    torch.manual_seed(0)
    m = _away_from_init(NewLLM(dataclasses.replace(small(num_layers=2), context_dropout=0.4)))
    _assert_fused_matches_autograd(m, torch.randint(0, 50, (3, 7)), mask_seed=7)


def test_tied_head_shares_the_embedding_and_saves_it_once(tmp_path):
    from newllm_nb.train.checkpoint import load_checkpoint, save_checkpoint

    untied = NewLLM(ModelConfig())
    tied = NewLLM(ModelConfig(tie_embeddings=True))
    V, E, H = 1000, 256, 512
    assert count_parameters(tied) == count_parameters(untied) - H * V + H * E  # head: H x V -> H x E (+ same bias)
    assert not any("_embed" in k for k in tied.state_dict())
    m = NewLLM(small(tie_embeddings=True))
    ids = torch.randint(0, 50, (2, 6))
    logits, _ = m(ids)
    logits.sum().backward()
    # The embedding gets gradient from both ends: rows never read as input still move through the head.
    unseen = sorted(set(range(50)) - set(ids.flatten().tolist()))
    assert m.embed.weight.grad[unseen].abs().sum() > 0
    with torch.no_grad():
        m.embed.weight[7].add_(1.0)  # changing an embedding row changes that word's logit
    assert not torch.allclose(m(ids)[0][..., 7], logits[..., 7])
    path = save_checkpoint(tmp_path / "t.safetensors", m, config={"model": dataclasses.asdict(m.config)})
    again = NewLLM(small(tie_embeddings=True))
    load_checkpoint(path).load_into(again)
    torch.testing.assert_close(again(ids)[0], m(ids)[0])
    assert again.head._embed[0] is again.embed  # still shared after loading


def test_embed_dropout_drops_whole_word_types_in_training_only():
    m = NewLLM(small(embed_dropout=0.5))
    ids = torch.tensor([[5, 9, 5, 9, 5, 9, 11, 11]])
    from newllm_nb.models.newllm import embed_lookup

    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        e = embed_lookup(m.embed, ids, 0.5, True)
        for w in (5, 9, 11):
            rows = e[0, ids[0] == w]
            assert torch.equal(rows, rows[:1].expand_as(rows))  # one decision per word type
            dropped = bool(rows.abs().sum() == 0)
            if not dropped:
                torch.testing.assert_close(rows[0], 2 * m.embed.weight[w])  # survivors scaled by 1/(1-p)
            seen.add(dropped)
    assert seen == {True, False}
    m.eval()
    torch.testing.assert_close(m(ids)[0], m(ids)[0])
    torch.testing.assert_close(embed_lookup(m.embed, ids, 0.5, False), m.embed(ids))


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_baselines_take_tying_and_embedding_dropout(arch):
    from newllm_nb.models.build import build_model, matched_config

    base = ModelConfig(vocab_size=1000)
    plain = build_model(matched_config(base, arch))
    tied_cfg = matched_config(dataclasses.replace(base, tie_embeddings=True, embed_dropout=0.2), arch)
    tied = build_model(tied_cfg)
    # Matched to the tied New-LLM, which is smaller: the tied baseline is too.
    assert count_parameters(tied) < count_parameters(plain)
    assert abs(count_parameters(tied) - count_parameters(NewLLM(dataclasses.replace(tied_cfg, arch="newllm")))
               ) < 0.03 * count_parameters(tied)  # size steps of 8
    ids = torch.randint(0, 1000, (2, 7))
    logits, _ = tied(ids)
    assert logits.shape == (2, 7, 1000)
    logits.sum().backward()
    assert tied.embed.weight.grad.abs().sum() > 0 if arch == "lstm" else tied.tok.weight.grad.abs().sum() > 0


def test_input_and_output_dropout_stay_off_the_recurrent_path():
    ids = torch.randint(4, 50, (3, 12))
    ref = NewLLM(small()).eval()
    out = NewLLM(small(output_dropout=0.9))
    out.load_state_dict(ref.state_dict())
    logits, c = out.train()(ids)
    logits_ref, c_ref = ref(ids)
    torch.testing.assert_close(c, c_ref)  # the context never sees the output dropout ...
    assert not torch.allclose(logits, logits_ref)  # ... the output layer does
    inp = NewLLM(small(input_dropout=0.9))
    inp.load_state_dict(ref.state_dict())
    assert not torch.allclose(inp.train()(ids)[1], c_ref)  # input dropout reaches the context
    for m in (out, inp):  # both are identity at evaluation
        torch.testing.assert_close(m.eval()(ids)[0], logits_ref)


def test_lstm_dropout_placement_defaults_to_dropout_at_input_and_output():
    from newllm_nb.models.baselines import LSTMLM

    ids = torch.randint(4, 50, (2, 9))
    cfg = dataclasses.replace(small(arch="lstm", lstm_hidden=24), dropout=0.4)
    a = LSTMLM(cfg)
    b = LSTMLM(dataclasses.replace(cfg, input_dropout=0.4, output_dropout=0.4))
    c = LSTMLM(dataclasses.replace(cfg, input_dropout=0.0, output_dropout=0.0))
    for m in (b, c):
        m.load_state_dict(a.state_dict())
    outs = []
    for m in (a, b, c):
        torch.manual_seed(3)
        outs.append(m.train()(ids)[0])
    torch.testing.assert_close(outs[0], outs[1])  # None = `dropout` at both places
    torch.testing.assert_close(outs[2], c.eval()(ids)[0])  # 0 = no dropout at all in a 1-layer LSTM


@pytest.mark.parametrize("arch", ["newllm", "lstm"])
def test_forget_bias_sets_only_the_forget_gate(arch):
    from newllm_nb.models.build import build_model

    m = build_model(small(arch=arch, lstm_hidden=24, forget_bias=1.5))
    if arch == "newllm":  # [forget | input | candidate]
        b, n, f = m.gates.bias.detach(), m.config.context_dim, 0
    else:  # [i | f | g | o], bias_ih + bias_hh; the other gates keep PyTorch's uniform init
        b, n, f = (m.lstm.bias_ih_l0 + m.lstm.bias_hh_l0).detach(), 24, 1
    is_forget = torch.zeros_like(b, dtype=torch.bool)
    is_forget[f * n: (f + 1) * n] = True
    assert torch.all(b[is_forget] == 1.5)
    assert torch.all(b[~is_forget] == 0) if arch == "newllm" else b[~is_forget].abs().max() > 0


def test_hand_written_bptt_with_input_and_output_dropout():
    """Input / output dropout sit outside the hand-written recurrence. Input dropout: on the same masks (one
    seed, no dropout inside the cell) both paths give the same logits and gradients. Output dropout (its mask
    is laid out in the recurrence's memory order, so it differs from eager's): the context is untouched."""
    torch.manual_seed(0)
    m = _away_from_init(NewLLM(small(num_layers=2, input_dropout=0.5, tie_embeddings=True)))
    ids = torch.randint(0, 50, (3, 7))
    fused_logits = _assert_fused_matches_autograd(m, ids, mask_seed=5)
    with torch.no_grad():
        assert not torch.allclose(fused_logits, m.eval()(ids)[0])  # the dropout was active
    out = NewLLM(small(num_layers=2, output_dropout=0.5))
    logits, c = out(ids, recurrence=NewLLMRecurrence.apply)
    with torch.no_grad():
        ref_logits, ref_c = out.eval()(ids)
    torch.testing.assert_close(c, ref_c)
    assert not torch.allclose(logits, ref_logits)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in out.parameters())

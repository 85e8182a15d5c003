"""The fused Triton kernels (newllm_nb/kernels/fused.py) compute the reference cell's function
(newllm_nb/kernels/reference.py).

CPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1, which must be set before triton is
first imported, so those checks run once in a subprocess) against the reference with the kernels' own dropout
masks, the hand-written BPTT and the model's autograd loop (the reference, token by token); the decode cell
against ``model.step`` (the reference cell). GPU (where CUDA and Triton work): gradients after one step and after
several Adam steps against an fp32 reference within the AMP tolerance of test_fastpath.py, bf16 and fp16, stateful
or not, with resets, every dropout on; fresh dropout masks on every CUDA-graph replay; FusedDecoder against the
eager greedy decode.
"""

from __future__ import annotations

import inspect
import os

import interpreter_checks
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the fused kernels (an optional dependency) "
                                     "cannot be checked here")



# -- the reference cell, with the kernels' own dropout masks ------------------------------------------------------
class _Reference(torch.nn.Module):
    """``reference.sequence`` over a NewLLM whose weights ``functional_call`` supplies."""

    def __init__(self, H: int, C: int, L: int) -> None:
        super().__init__()
        from newllm_nb import ModelConfig, NewLLM

        self.m = NewLLM(ModelConfig(vocab_size=5, embed_dim=1, context_dim=C, hidden_dim=H, num_layers=L,
                                    dropout=0.0))

    def forward(self, x_proj, c0, keep, masks, cmask):
        from newllm_nb.kernels import reference

        return reference.sequence(self.m, x_proj, c0, keep, masks, cmask)


def masked_reference(x_proj, c0, keep, W_c, W_g, b_g, ln_w, ln_b, p, p_ctx, training, *layers):
    """``NewLLMRecurrence.apply``'s signature through the reference cell (kernels/reference.py) in fp32, with the
    dropout masks rebuilt from the seed FusedRecurrence draws (same RNG call, so the model's other dropouts stay
    in step too)."""
    from newllm_nb.kernels.fused import kernel_uniforms

    B, T, H = x_proj.shape
    C = c0.shape[1]
    L = 1 + len(layers) // 2
    drop, cdrop = training and p > 0, training and p_ctx > 0
    if drop or cdrop:
        seed = torch.randint(0, 2**31 - 1 - 2 * L, (1,), device=x_proj.device, dtype=torch.int64)
    masks = [(kernel_uniforms(seed, j, (T, B, H)) >= p).float() / (1 - p) for j in range(L)] if drop else None
    cmask = (kernel_uniforms(seed, L, (T, B, C)) >= p_ctx).float() / (1 - p_ctx) if cdrop else None
    weights = {"m.fnn.0.weight": torch.cat([W_c.new_zeros(H, 1), W_c], 1), "m.gates.weight": W_g,
               "m.gates.bias": b_g, "m.norm.weight": ln_w, "m.norm.bias": ln_b}
    for j in range(1, L):
        weights[f"m.fnn.{j}.weight"], weights[f"m.fnn.{j}.bias"] = layers[2 * j - 2], layers[2 * j - 1]
    with torch.random.fork_rng(devices=[]):  # building it draws no number the model's own dropouts would draw
        ref = _Reference(H, C, L).to(x_proj.device)
    with torch.autocast(x_proj.device.type, enabled=False):  # an fp32 reference also under autocast
        hs, c = torch.func.functional_call(ref, {k: v.float() for k, v in weights.items()},
                                           (x_proj.float(), c0.float(), None if keep is None else keep.float(),
                                            masks, cmask))
    # [T, B, H] memory seen as [B, T, H], as both recurrences return it: the output dropout draws its mask in
    # memory order, so the same layout gives the same mask.
    return hs.transpose(0, 1).contiguous().transpose(0, 1).to(x_proj.dtype), c


def _raw_args(B, T, C, H, L, keep, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device).requires_grad_()

    k = (torch.rand(B, T, 1, generator=g) > 0.3).float().to(device) if keep else None
    layers = []
    for _ in range(L - 1):
        layers += [r(H, H, scale=0.3), r(H, scale=0.1)]
    ln_w = (1 + 0.1 * torch.randn(C, generator=g)).to(device).requires_grad_()
    return [r(B, T, H), r(B, C), k, r(H, C, scale=0.3), r(3 * C, H, scale=0.3), r(3 * C, scale=0.1), ln_w,
            r(C, scale=0.1)], layers


def _run(fn, args, layers, p, p_ctx, use_c=True, torch_seed=7):
    torch.manual_seed(torch_seed)
    xp, c0, keep, Wc, Wg, bg, lnw, lnb = args
    hs, c = fn(xp, c0, keep, Wc, Wg, bg, lnw, lnb, p, p_ctx, True, *layers)
    H, C = hs.shape[-1], c.shape[-1]
    loss = (hs.float() * torch.linspace(-1, 1, H, device=hs.device)).sum()
    if use_c:
        loss = loss + (c * torch.linspace(0, 1, C, device=c.device)).pow(2).sum()
    params = [xp, c0, Wc, Wg, bg, lnw, lnb, *layers]
    return [hs.detach(), c.detach(), *torch.autograd.grad(loss, params)]


def _close(a, b, names, rtol=1e-4):
    for n, x, y in zip(names, a, b):
        err = float((x.float() - y.float()).abs().max())
        ref = float(y.float().abs().max())
        assert err <= rtol * max(ref, 1.0), f"{n}: max abs error {err:.3g} vs max {ref:.3g}"


_NAMES = ["hs", "c_T", "d x_proj", "d c0", "d W_c", "d W_g", "d b_g", "d ln_w", "d ln_b", "d W_2", "d b_2",
          "d W_3", "d b_3"]


# -- the interpreter checks (run in a subprocess with TRITON_INTERPRET=1) ------------------------------------------
def _check_matches_reference_and_bptt_with_resets():
    from newllm_nb.kernels.fused import FusedRecurrence
    from newllm_nb.kernels.recurrence import NewLLMRecurrence

    args, layers = _raw_args(B=5, T=4, C=12, H=20, L=3, keep=True)  # odd sizes: every tile is masked
    fused = _run(FusedRecurrence.apply, args, layers, 0.0, 0.0)
    _close(fused, _run(masked_reference, args, layers, 0.0, 0.0), _NAMES)
    _close(fused, _run(NewLLMRecurrence.apply, args, layers, 0.0, 0.0), _NAMES)


def _check_matches_reference_one_layer_hs_only():
    from newllm_nb.kernels.fused import FusedRecurrence

    # More rows than one program holds (two programs), no resets, no gradient through c_T.
    args, layers = _raw_args(B=19, T=3, C=16, H=32, L=1, keep=False, seed=1)
    _close(_run(FusedRecurrence.apply, args, layers, 0.0, 0.0, use_c=False),
           _run(masked_reference, args, layers, 0.0, 0.0, use_c=False), _NAMES)


def _check_dropout_matches_masked_reference():
    from newllm_nb.kernels.fused import FusedRecurrence, kernel_uniforms

    args, layers = _raw_args(B=6, T=4, C=12, H=20, L=2, keep=True, seed=2)
    fused = _run(FusedRecurrence.apply, args, layers, 0.3, 0.2)
    _close(fused, _run(masked_reference, args, layers, 0.3, 0.2), _NAMES)
    again = _run(FusedRecurrence.apply, args, layers, 0.3, 0.2, torch_seed=8)
    assert not torch.equal(fused[0], again[0]), "a new call must draw new masks"
    u = kernel_uniforms(torch.tensor([123], dtype=torch.int64), 0, (4096,))
    assert abs(float((u >= 0.3).float().mean()) - 0.7) < 0.03, "kept fraction must be 1 - p"
    assert not torch.equal(u, kernel_uniforms(torch.tensor([123], dtype=torch.int64), 1, (4096,)))
    quads = kernel_uniforms(torch.tensor([5], dtype=torch.int64), 0, (64, 256)).view(-1, 4)  # one Philox call each
    corr = torch.corrcoef(quads.T) - torch.eye(4)
    assert float(corr.abs().max()) < 0.05, "the four columns of one draw must be independent"


def _check_model_loop_with_every_dropout():
    from newllm_nb import ModelConfig, NewLLM
    from newllm_nb.kernels.fused import FusedRecurrence

    if "recurrence" not in inspect.signature(NewLLM.forward).parameters:
        return "skipped: model.forward has no recurrence argument yet"
    torch.manual_seed(0)
    m = NewLLM(ModelConfig(vocab_size=40, embed_dim=8, context_dim=12, hidden_dim=20, num_layers=2,
                                     dropout=0.0, init_std=0.3))
    ids = torch.randint(4, 40, (5, 6))
    reset = torch.rand(5, 6) < 0.2
    c0 = torch.randn(5, 12)
    out = {}
    for name, rec in (("autograd", None), ("fused", FusedRecurrence.apply)):
        m.zero_grad()
        logits, c = m(ids, c0, reset, recurrence=rec)
        (F.cross_entropy(logits.reshape(-1, 40), ids.reshape(-1)) + c.pow(2).mean()).backward()
        out[name] = [logits.detach(), c.detach(), *[p.grad.clone() for p in m.parameters()]]
    _close(out["fused"], out["autograd"], ["logits", "c_T"] + [n for n, _ in m.named_parameters()])
    # Every dropout on (embedding, input, FNN, context, output): the same as the masked reference.
    m = NewLLM(ModelConfig(vocab_size=40, embed_dim=8, context_dim=12, hidden_dim=20, num_layers=2,
                                     dropout=0.3, context_dropout=0.2, embed_dropout=0.1, input_dropout=0.2,
                                     output_dropout=0.2, init_std=0.3)).train()
    for name, rec in (("masked", masked_reference), ("fused", FusedRecurrence.apply)):
        m.zero_grad()
        torch.manual_seed(5)
        logits, c = m(ids, c0, reset, recurrence=rec)
        (F.cross_entropy(logits.reshape(-1, 40), ids.reshape(-1)) + c.pow(2).mean()).backward()
        out[name] = [logits.detach(), c.detach(), *[p.grad.clone() for p in m.parameters()]]
    _close(out["fused"], out["masked"], ["logits", "c_T"] + [n for n, _ in m.named_parameters()])


# Cell options the kernels implement (tiny dims: every tile masked); the plus presets' cell first.
_OPTION_CELLS = [dict(state_norm="read", chrono_init=8.0, gate_context=True, gate_rank=6),
                 dict(state_norm="noaffine", gate_context=True),
                 dict(state_norm="none", gate_rank=5),
                 dict(state_norm="layernorm", gate_context=True, gate_rank=7, num_layers=1),
                 dict(state_norm="read")]


def _option_model(**kw):
    from newllm_nb import ModelConfig, NewLLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=40, embed_dim=8, context_dim=12, hidden_dim=20, num_layers=2, dropout=0.0, init_std=0.3)
    return NewLLM(ModelConfig(**{**cfg, **kw}))


def _model_outputs(m, ids, c0, reset, rec, torch_seed=5):
    m.zero_grad()
    torch.manual_seed(torch_seed)
    logits, c = m(ids, c0, reset, recurrence=rec)
    (F.cross_entropy(logits.reshape(-1, m.config.vocab_size), ids.reshape(-1)) + c.pow(2).mean()).backward()
    return [logits.detach(), c.detach(), *[p.grad.clone() for p in m.parameters()]]


def _check_option_cells_match_the_reference_cell():
    """Each option cell through the kernels against the model's own autograd loop (the reference cell), with
    resets and a carried context: logits, c_T and every parameter's gradient."""
    from newllm_nb.kernels.fused import fused_recurrence

    ids = torch.randint(4, 40, (5, 6))
    reset = torch.rand(5, 6) < 0.2
    c0 = torch.randn(5, 12)
    for kw in _OPTION_CELLS:
        m = _option_model(**kw)
        assert fused_recurrence.implements(m.config)
        names = ["logits", "c_T"] + [n for n, _ in m.named_parameters()]
        try:
            _close(_model_outputs(m, ids, c0, reset, fused_recurrence), _model_outputs(m, ids, c0, reset, None), names)
        except AssertionError as e:
            raise AssertionError(f"{kw}: {e}") from None


class _KernelMasks(torch.nn.Module):
    """Stands in for the model's FNN and context dropout in its reference loop: the masks the kernels draw, in the
    order the loop asks for them (per step: the context, then FNN layers 1..L). The seed is drawn at the first call,
    where the fused forward draws it, so the model's other dropouts stay in step."""

    def __init__(self, T, B, C, H, L, p, p_ctx):
        super().__init__()
        self.shape, self.p, self.p_ctx, self.queue = (T, B, C, H, L), p, p_ctx, None

    def forward(self, x):
        from newllm_nb.kernels.fused import kernel_uniforms

        T, B, C, H, L = self.shape
        if self.queue is None:
            seed = torch.randint(0, 2**31 - 1 - 2 * L, (1,), dtype=torch.int64)
            fnn = [(kernel_uniforms(seed, j, (T, B, H)) >= self.p).float() / (1 - self.p) for j in range(L)]
            ctx = (kernel_uniforms(seed, L, (T, B, C)) >= self.p_ctx).float() / (1 - self.p_ctx)
            self.queue = [m for t in range(T) for m in [ctx[t]] + [fnn[j][t] for j in range(L)]]
        return x * self.queue.pop(0)


def _check_option_cells_with_every_dropout():
    """The plus cell with every dropout on (embedding, input, FNN, context, output) and resets: the kernels against
    the reference cell given the kernels' masks."""
    from newllm_nb.kernels.fused import fused_recurrence

    B, T = 5, 6
    ids = torch.randint(4, 40, (B, T))
    reset = torch.rand(B, T) < 0.2
    c0 = torch.randn(B, 12)
    for kw in _OPTION_CELLS[:2]:
        m = _option_model(**kw, dropout=0.3, context_dropout=0.2, embed_dropout=0.1, input_dropout=0.2,
                          output_dropout=0.2).train()
        fused = _model_outputs(m, ids, c0, reset, fused_recurrence)
        masks = _KernelMasks(T, B, 12, 20, m.config.num_layers, 0.3, 0.2)
        m.drop, m.ctx_drop = masks, masks
        ref = _model_outputs(m, ids, c0, reset, None)
        assert not masks.queue, "the reference loop must use every mask the kernels drew"
        try:
            _close(fused, ref, ["logits", "c_T"] + [n for n, _ in m.named_parameters()])
        except AssertionError as e:
            raise AssertionError(f"{kw}: {e}") from None


class _Schedule:
    """Runs the fused kernels in one schedule (``fused.fused_schedule``) inside the block."""

    def __init__(self, schedule: str) -> None:
        self.schedule = schedule

    def __enter__(self):
        from newllm_nb.kernels.fused import fused_schedule

        os.environ["NEWLLM_FUSED_SCHEDULE"] = self.schedule
        assert fused_schedule(torch.device("cpu")) == self.schedule

    def __exit__(self, *exc):
        os.environ.pop("NEWLLM_FUSED_SCHEDULE")


def _check_layered_schedule_matches_reference():
    """The layered schedule (a launch a phase a step over row x column blocks; 16-wide tiles under the
    interpreter, so 40 hidden and 40 context columns split into three blocks each and 19 rows into two) against
    the reference: the original cell with every dropout and resets against the masked reference; each option cell
    against the model's autograd loop, and the plus cell with every dropout against the reference given the
    kernels' masks."""
    from newllm_nb.kernels.fused import FusedRecurrence, fused_recurrence

    with _Schedule("layered"):
        args, layers = _raw_args(B=19, T=4, C=40, H=40, L=3, keep=True, seed=3)
        _close(_run(FusedRecurrence.apply, args, layers, 0.3, 0.2), _run(masked_reference, args, layers, 0.3, 0.2),
               _NAMES)
        ids = torch.randint(4, 40, (19, 5))
        reset = torch.rand(19, 5) < 0.2
        c0 = torch.randn(19, 40)
        for kw in _OPTION_CELLS:
            m = _option_model(**{**kw, "context_dim": 40, "hidden_dim": 40, "gate_rank": 2 * kw["gate_rank"]}
                              if "gate_rank" in kw else {**kw, "context_dim": 40, "hidden_dim": 40})
            names = ["logits", "c_T"] + [n for n, _ in m.named_parameters()]
            try:
                _close(_model_outputs(m, ids, c0, reset, fused_recurrence), _model_outputs(m, ids, c0, reset, None),
                       names)
            except AssertionError as e:
                raise AssertionError(f"{kw}: {e}") from None
        m = _option_model(**_OPTION_CELLS[0], context_dim=40, hidden_dim=40, dropout=0.3, context_dropout=0.2,
                          embed_dropout=0.1, input_dropout=0.2, output_dropout=0.2).train()
        fused = _model_outputs(m, ids, c0, reset, fused_recurrence)
        masks = _KernelMasks(5, 19, 40, 40, m.config.num_layers, 0.3, 0.2)
        m.drop, m.ctx_drop = masks, masks
        _close(fused, _model_outputs(m, ids, c0, reset, None), ["logits", "c_T"] + [n for n, _ in m.named_parameters()])


def _assert_decode_cell_follows_step(m, label: str) -> None:
    """FusedCell's logits and contexts against ``m.step`` (the reference cell) over three tokens of 3 rows."""
    from newllm_nb.kernels.fused import FusedCell

    cell = FusedCell(m, batch_size=3)
    c = torch.randn(3, 12)
    cell.set_context(c)
    with torch.no_grad():
        for _ in range(3):
            tok = torch.randint(4, 40, (3,))
            ref_logits, c = m.step(tok, c)
            logits = m.head(cell(tok))
            try:
                _close([logits, cell.context()], [ref_logits, c], ["logits", "context"])
            except AssertionError as e:
                raise AssertionError(f"{label}: {e}") from None


def _check_decode_cell_matches_model_step():
    from newllm_nb import ModelConfig, NewLLM

    torch.manual_seed(0)
    m = NewLLM(ModelConfig(vocab_size=40, embed_dim=8, context_dim=12, hidden_dim=20, num_layers=2,
                                     init_std=0.3)).eval()
    _assert_decode_cell_follows_step(m, "the original cell")


def _check_option_decode_matches_model_step():
    """The decode cell of each option cell against ``model.step`` (contexts and logits over three tokens), and
    greedy decoding of the plus cell against the eager model's tokens."""
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.fused import FusedDecoder

    for kw in _OPTION_CELLS:
        _assert_decode_cell_follows_step(_option_model(**kw).eval(), str(kw))
    torch.manual_seed(1)
    m = _option_model(**_OPTION_CELLS[0], init_std=0.5).eval()
    prompt = torch.randint(4, 40, (3, 4))
    dec = FusedDecoder(m, batch_size=3, chunk=5, use_graph=False)
    assert dec.fused_head
    assert torch.equal(dec.run(prompt, 12), decode_ids(m, prompt, 12, use_graph=False))


def _check_greedy_decode_matches_eager():
    from newllm_nb import ModelConfig, NewLLM
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.fused import FusedDecoder

    for tie, layers in ((False, 1), (True, 2)):  # nn.Linear head; tied head (embed = hidden: no projection)
        torch.manual_seed(1)
        m = NewLLM(ModelConfig(vocab_size=150, embed_dim=20, context_dim=12, hidden_dim=20,
                                         num_layers=layers, init_std=0.5, tie_embeddings=tie)).eval()
        prompt = torch.randint(4, 150, (3, 4))
        ref = decode_ids(m, prompt, 12, use_graph=False)
        dec = FusedDecoder(m, batch_size=3, chunk=5, use_graph=False)
        assert dec.fused_head, "a linear head decodes greedily in the kernels"
        out = dec.run(prompt, 12)
        assert torch.equal(out, ref), (out, ref)
        # Sampling: the same Gumbel-max draws as generate's eager decode for a seed (one CPU random stream).
        sampled = FusedDecoder(m, batch_size=3, chunk=5, temperature=0.8, use_graph=False).run(prompt, 12, seed=3)
        assert torch.equal(sampled, decode_ids(m, prompt, 12, temperature=0.8, seed=3, use_graph=False))
        assert not torch.equal(sampled, ref)


def _check_greedy_decode_with_other_tiles():
    """The NEWLLM_DEC_* tiles (benchmarks/decode_tiles.py) change how the work is split, not the tokens:
    narrower column and vocab tiles (more gate and vocab programs in the shared launch), another K step and
    another graph chunk decode what the eager model decodes."""
    from newllm_nb import ModelConfig, NewLLM
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.fused import FusedDecoder

    torch.manual_seed(2)
    m = NewLLM(ModelConfig(vocab_size=150, embed_dim=20, context_dim=40, hidden_dim=40, num_layers=2,
                                     init_std=0.5)).eval()
    prompt = torch.randint(4, 150, (2, 3))
    tiles = {"BN": "16", "BK": "16", "BV": "16", "CHUNK": "3"}
    os.environ.update({"NEWLLM_DEC_" + k: v for k, v in tiles.items()})
    try:
        dec = FusedDecoder(m, batch_size=2, use_graph=False)
        assert (dec.chunk, dec.cell.BN, dec.cell.BK, dec.cell.BV, dec.cell.NV) == (3, 16, 16, 16, 10)
        out = dec.run(prompt, 10)
    finally:
        for k in tiles:
            os.environ.pop("NEWLLM_DEC_" + k)
    assert torch.equal(out, decode_ids(m, prompt, 10, use_graph=False))


_CHECKS = {f.__name__[len("_check_"):]: f for f in (
    _check_matches_reference_and_bptt_with_resets, _check_matches_reference_one_layer_hs_only,
    _check_dropout_matches_masked_reference, _check_model_loop_with_every_dropout,
    _check_option_cells_match_the_reference_cell, _check_option_cells_with_every_dropout,
    _check_layered_schedule_matches_reference,
    _check_decode_cell_matches_model_step, _check_option_decode_matches_model_step,
    _check_greedy_decode_matches_eager,
    _check_greedy_decode_with_other_tiles)}


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreter_checks.results(__file__, timeout=600)


@pytest.mark.parametrize("check", list(_CHECKS))
def test_kernels_under_triton_interpreter(interpreter_results, check):
    res = interpreter_results[check]
    if res.startswith("skipped"):
        pytest.skip(res)
    assert res == "ok", res


def test_fused_available_says_why_not_on_cpu():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under the interpreter every device counts as available")
    from newllm_nb.kernels.fused import fused_available

    ok, why = fused_available("cpu")
    assert not ok and "CUDA" in why and "\n" not in why


# -- GPU -------------------------------------------------------------------------------------------------------
def _gpu_ok() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    from newllm_nb.kernels.fused import fused_available

    return fused_available("cuda")


_GPU, _WHY = _gpu_ok() if os.environ.get("TRITON_INTERPRET") != "1" else (False, "interpreter run")
gpu = pytest.mark.skipif(not _GPU, reason=_WHY)


def _model(dropout=0.0, layers=2, **kw):
    from newllm_nb import ModelConfig, NewLLM

    torch.manual_seed(0)
    return NewLLM(ModelConfig(vocab_size=64, embed_dim=16, context_dim=16, hidden_dim=32, num_layers=layers,
                                        dropout=dropout, **kw)).cuda()


def _batches(n, stateful, B=8, T=8):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(4, 64, (B, T + 1), generator=g).cuda()
        r = (torch.rand(B, T, generator=g) < 0.1).cuda() if stateful else None
        out.append((x[:, :-1], x[:, 1:], r))
    return out


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _loss_grads(m, batch, c, precision, rec, scale=1.0, torch_seed=3):
    x, y, r = batch
    m.zero_grad(set_to_none=True)
    torch.manual_seed(torch_seed)
    with torch.autocast("cuda", dtype=_DT[precision], enabled=_DT[precision] is not None):
        logits, c_out = m(x, c, r, recurrence=rec)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    (loss * scale).backward()
    for p in m.parameters():
        p.grad.div_(scale)
    return float(loss), torch.cat([p.grad.float().flatten() for p in m.parameters()]), c_out.detach().float()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_fused_matches_fp32_reference_on_gpu(precision, stateful, dropout):
    """One step's gradients, then six Adam steps (losses and gradients), against an fp32 reference with the
    same dropout masks. AMP tolerance as test_fastpath.py: 5% relative gradient-norm error (fp32: 1e-4), or
    at worst twice the eager AMP path's own error."""
    from newllm_nb.kernels.fused import FusedRecurrence

    tol = 1e-4 if precision == "fp32" else 5e-2
    drop = dict(dropout=0.2, context_dropout=0.1, embed_dropout=0.1, input_dropout=0.1, output_dropout=0.1) \
        if dropout else {}
    fused, ref, probe_ref, probe_amp = (_model(**drop) for _ in range(4))
    batches = _batches(7, stateful)
    scale = 1024.0 if precision == "fp16" else 1.0  # a fixed loss scale, as GradScaler's would be in fp16

    def grads_match(b, c, k):
        _, gf, _ = _loss_grads(fused, b, c, precision, FusedRecurrence.apply, scale, k)
        probe_ref.load_state_dict(fused.state_dict())
        probe_amp.load_state_dict(fused.state_dict())
        _, gr, _ = _loss_grads(probe_ref, b, c, "fp32", masked_reference, 1.0, k)
        _, ga, _ = _loss_grads(probe_amp, b, c, precision, masked_reference, scale, k)
        assert torch.isfinite(gf).all()
        err_f, err_a = _rel(gf, gr), _rel(ga, gr)
        assert err_f < max(tol, 2 * err_a), (k, err_f, err_a)

    grads_match(batches[0], None, 0)  # first step
    opt_f = torch.optim.Adam(fused.parameters(), lr=1e-2)
    opt_r = torch.optim.Adam(ref.parameters(), lr=1e-2)
    c_f = c_r = None
    for k, b in enumerate(batches[:6]):  # two trajectories, same batches and masks: the same losses
        lf, _, cf = _loss_grads(fused, b, c_f, precision, FusedRecurrence.apply, scale, k)
        lr, _, cr = _loss_grads(ref, b, c_r, "fp32", masked_reference, 1.0, k)
        assert abs(lf - lr) <= min(tol, 3e-2) * max(1.0, abs(lr)), (k, lf, lr)
        opt_f.step()
        opt_r.step()
        if stateful:
            c_f, c_r = cf, cr
    grads_match(batches[6], c_f, 6)  # gradients after those steps, from the fused path's weights


@gpu
def test_fused_dropout_masks_are_fresh_on_every_graph_replay():
    from newllm_nb.kernels.fused import FusedRecurrence

    m = _model(dropout=0.3, context_dropout=0.2)
    with torch.no_grad():  # away from init: near it every mask gives about the same loss, log 64
        for p in m.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    x, y, r = _batches(1, True)[0]
    sx, sy = x.clone(), y.clone()

    def body():
        m.zero_grad(set_to_none=False)
        logits, _ = m(sx, None, r, recurrence=FusedRecurrence.apply)
        loss = F.cross_entropy(logits.reshape(-1, 64), sy.reshape(-1))
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    losses, grads = [], []
    for _ in range(8):
        graph.replay()
        losses.append(float(out))
        grads.append(m.fnn[0].weight.grad.clone())
    assert len(set(losses)) == len(losses), losses
    assert all(not torch.equal(grads[i], grads[j]) for i in range(8) for j in range(i)), "a replay repeated masks"


@gpu
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("cell", ["original", "plus"])
def test_fused_decoder_matches_eager_greedy_decode(batch, cell):
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.fused import FusedDecoder

    m = _model(layers=2, **(_OPTION_CELLS[0] if cell == "plus" else {})).eval()
    with torch.no_grad():  # weights away from init, so greedy tokens are not near-ties
        for p in m.parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    prompt = torch.randint(4, 64, (batch, 5))
    ref = decode_ids(m, prompt, 40, use_graph=False)
    out = FusedDecoder(m, batch_size=batch, chunk=16).run(prompt, 40)
    assert out.shape == (batch, 40)
    assert float((out == ref).float().mean()) > 0.9, (out, ref)  # fp32 both; rounding may flip a rare near-tie
    assert torch.equal(out[:, :10], ref[:, :10])


if __name__ == "__main__":
    interpreter_checks.main(_CHECKS)


@pytest.mark.parametrize("name,value", [("BN", "24"), ("BK", "8"), ("BV", "abc"), ("WARPS", "3"), ("CHUNK", "0")])
def test_decoder_tile_knobs_refuse_bad_values_in_one_line(monkeypatch, name, value):
    from newllm_nb import ModelConfig, NewLLM
    from newllm_nb.kernels.fused import FusedDecoder

    monkeypatch.setenv("NEWLLM_DEC_" + name, value)
    m = NewLLM(ModelConfig(vocab_size=40, embed_dim=8, context_dim=16, hidden_dim=16))
    with pytest.raises(ValueError, match=f"NEWLLM_DEC_{name}='{value}': must be"):
        FusedDecoder(m, use_graph=False)
    monkeypatch.delenv("NEWLLM_DEC_" + name)
    with pytest.raises(ValueError, match="invalid chunk=0"):
        FusedDecoder(m, chunk=0, use_graph=False)


@gpu
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("cell", range(len(_OPTION_CELLS)))
def test_fused_option_cells_match_the_reference_cell_on_gpu(precision, cell):
    """Each option cell through the compiled kernels against the model's autograd loop in fp32: loss, carried
    context and every gradient, with resets and a carried context; and the trainer's step takes the kernels."""
    from newllm_nb.kernels.fused import fused_recurrence
    from newllm_nb.train.step import make_step

    kw = dict(_OPTION_CELLS[cell])
    m = _model(layers=kw.pop("num_layers", 2), **kw)
    x, y, r = _batches(1, True)[0]
    c = torch.randn(x.shape[0], m.config.context_dim, device="cuda")
    lf, gf, cf = _loss_grads(m, (x, y, r), c, precision, fused_recurrence)
    lr, gr, cr = _loss_grads(m, (x, y, r), c, "fp32", None)
    tol = 2e-3 if precision == "fp32" else 5e-2
    assert abs(lf - lr) <= tol * max(1.0, abs(lr)), (lf, lr)
    assert _rel(cf, cr) <= tol and _rel(gf, gr) <= tol, (_rel(cf, cr), _rel(gf, gr))
    opt = torch.optim.Adam(m.parameters())
    step = make_step("auto", m, opt, torch.amp.GradScaler("cuda", enabled=False), torch.device("cuda"), precision)
    assert step.mode == "cuda-graph+fused" and step.recurrence is fused_recurrence


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the one-line refusal without a GPU")
def test_fused_tiles_benchmark_refuses_without_a_gpu_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "fused_tiles.py"
    r = subprocess.run([sys.executable, str(script), "--presets", "original_wikitext"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "fused_tiles.py times the Triton training kernels: it needs a CUDA GPU"], r.stderr


def test_fused_schedule_takes_layered_on_a_gpu_and_refuses_bad_values(monkeypatch):
    from newllm_nb.kernels import fused

    monkeypatch.delenv("NEWLLM_FUSED_SCHEDULE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused.fused_schedule(cuda) == "layered"
    assert fused.fused_schedule(cpu) == "persistent"  # the interpreter: one launch each way
    monkeypatch.setenv("NEWLLM_FUSED_SCHEDULE", "persistent")
    assert fused.fused_schedule(cuda) == "persistent"
    monkeypatch.setenv("NEWLLM_FUSED_SCHEDULE", "layered")
    assert fused.fused_schedule(cpu) == "layered"
    monkeypatch.setenv("NEWLLM_FUSED_SCHEDULE", "tiled")
    with pytest.raises(ValueError, match="NEWLLM_FUSED_SCHEDULE='tiled'") as e:
        fused.fused_schedule(cuda)
    assert "\n" not in str(e.value)


def test_layered_tiles_follow_the_batch_and_the_knobs(monkeypatch):
    from newllm_nb.kernels.fused import _layered_blocks

    for k in ("BB", "BN", "BC"):
        monkeypatch.delenv("NEWLLM_FUSED_LAYERED_" + k, raising=False)
    cuda = torch.device("cuda")
    small, large = _layered_blocks(8, 256, 512, cuda), _layered_blocks(2048, 256, 512, cuda)
    assert (small["BB"], small["BN"], small["BC"]) == (16, 32, 32)  # one row block, weights over more programs
    assert (large["BB"], large["BN"], large["BC"]) == (64, 64, 64)
    assert _layered_blocks(48, 256, 512, cuda)["BB"] == 64 and _layered_blocks(48, 256, 512, cuda)["BN"] == 64
    monkeypatch.setenv("NEWLLM_FUSED_LAYERED_BN", "128")
    assert _layered_blocks(8, 256, 512, cuda)["BN"] == 128


def test_launch_retries_with_fewer_stages_where_shared_memory_is_short():
    """An L4 has 99 KB of shared memory a block: a tile pipeline that does not fit is launched again with one stage
    fewer, and the depth that fitted is kept for the next launch of the same kernel and tiles."""
    from triton.runtime.errors import OutOfResources

    from newllm_nb.kernels import fused

    class Kernel:  # stands in for a JITFunction: kernel[grid](*args, **kw)
        def __init__(self, fits: int) -> None:
            self.fits, self.calls = fits, []

        def __getitem__(self, grid):
            def launch(*args, **kw):
                self.calls.append(kw["num_stages"])
                if kw["num_stages"] > self.fits:
                    raise OutOfResources(kw["num_stages"] * 40_000, 99_000, "shared memory")
            return launch

    k = Kernel(fits=2)
    fused._launch(k, (1,), 0, BB=64, num_warps=4, num_stages=3)
    fused._launch(k, (1,), 0, BB=64, num_warps=4, num_stages=3)
    assert k.calls == [3, 2, 2]
    never = Kernel(fits=0)
    with pytest.raises(OutOfResources):
        fused._launch(never, (1,), 0, BB=64, num_warps=4, num_stages=2)
    assert never.calls == [2, 1]

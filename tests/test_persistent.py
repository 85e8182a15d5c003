"""The persistent greedy decoder (newllm_nb/kernels/persistent.py) decodes what the reference cell decodes.

CPU: under Triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported, so those checks run once
in a subprocess) the persistent kernel runs with one program (its grid barrier then counts only itself) and the
same phases run one launch each with several programs (the kernel boundary stands in for the barrier), against
``decode_ids``' eager loop over ``model.step`` (the reference cell) for the original cell, several layers, a tied
head with and without its projection and the option cells; the carried context against the reference's; the head
read from memory in chunks instead of kept on chip. GPU (CUDA and a Triton with the cooperative launch): the
cooperative launch against the eager decode, and the fallback to the fused decoder with one line where the grid
cannot be co-resident.
"""

from __future__ import annotations

import os

import interpreter_checks
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the persistent kernel (an optional dependency) "
                                     "cannot be checked here")


# The cells the checks decode: (config overrides, a short name).
_CELLS = [
    (dict(num_layers=1), "original"),
    (dict(num_layers=3), "three layers"),
    (dict(num_layers=2, tie_embeddings=True), "tied head with a projection"),
    (dict(num_layers=1, tie_embeddings=True, embed_dim=20), "tied head without a projection"),
    (dict(num_layers=1, state_norm="read", chrono_init=8.0, gate_context=True, gate_rank=8, tie_embeddings=True),
     "the plus cell"),
    (dict(num_layers=2, gate_context=True, state_norm="none"), "gates reading the context, no norm"),
    (dict(num_layers=2, state_norm="noaffine", gate_rank=6), "low-rank gates, norm without affine"),
    (dict(num_layers=3, fnn_residual="residual", context_tanh=True), "residual FNN, tanh candidate"),
    (dict(num_layers=3, fnn_residual="prenorm", slow_forget_bias=3.0), "prenorm FNN, a LayerNorm per half"),
    (dict(num_layers=1, state_norm="read", slow_forget_bias=3.0, gate_context=True), "read norm per half"),
]


def _model(**kw):
    from newllm_nb import ModelConfig, NewLLM

    torch.manual_seed(1)
    cfg = dict(vocab_size=150, embed_dim=12, context_dim=12, hidden_dim=20, init_std=0.5)
    return NewLLM(ModelConfig(**{**cfg, **kw})).eval()


def _reference_context(m, prompt, ids):
    """The context after reading ``prompt`` and then ``ids``, through ``model.step`` (the reference cell)."""
    from newllm_nb.kernels.decoding import prime

    with torch.no_grad():
        _, c = prime(m, prompt)
        for t in range(ids.shape[1]):
            _, c = m.step(ids[:, t], c)
    return c


def _check_persistent_kernel_one_program():
    """The persistent kernel (one program: every weight slice is the whole matrix) decodes the eager tokens
    across launches (10 tokens, 4 a launch), and leaves the reference's context after exactly those tokens."""
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.persistent import PersistentDecoder

    for kw, name in _CELLS:
        m = _model(**kw)
        prompt = torch.randint(4, 150, (3, 4))
        dec = PersistentDecoder(m, batch_size=3, chunk=4, programs=1, persistent=True)  # launches of 4, 4, 2
        out = dec.run(prompt, 10)
        ref = decode_ids(m, prompt, 10, use_graph=False)
        assert torch.equal(out, ref), f"{name}: {out} != {ref}"
        c = _reference_context(m, prompt, out)
        err = float((dec.context() - c).abs().max()) / max(1.0, float(c.abs().max()))
        # fp32 sums in another order, over the prompt's last token and the 10 ids (init_std 0.5 amplifies them)
        assert err < 2e-3, f"{name}: context off by {err} (relative)"
    one = torch.randint(4, 150, (3, 1))  # a one-token prompt: the kernel reads it, no model launch before
    out = PersistentDecoder(_model(), batch_size=3, chunk=4, programs=1, persistent=True).run(one, 6)
    assert torch.equal(out, decode_ids(_model(), one, 6, use_graph=False)), "one-token prompt"


def _check_phases_one_launch_each_with_many_programs():
    """The same phase functions, one launch a phase, with the rows split over 3 and 7 programs (programs left
    without rows in some phases, a head split unevenly)."""
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.persistent import PersistentDecoder

    for i, counts in ((0, (3, 7)), (4, (5,)), (8, (5,))):
        kw, name = _CELLS[i]
        m = _model(**kw)
        prompt = torch.randint(4, 150, (2, 3))
        ref = decode_ids(m, prompt, 6, use_graph=False)
        for programs in counts:
            out = PersistentDecoder(m, batch_size=2, chunk=4, programs=programs, persistent=False).run(prompt, 6)
            assert torch.equal(out, ref), f"{name}, {programs} programs: {out} != {ref}"


def _check_head_read_in_chunks():
    """A head too large to keep on chip is read in chunks each token: same tokens (the first chunk holding the
    maximum keeps it, torch.argmax's tie rule)."""
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.persistent import PersistentDecoder

    os.environ.update(NEWLLM_PDEC_HEAD_RESIDENT="1", NEWLLM_PDEC_HEAD_CHUNK="512")
    try:
        for i in (0, 2):
            m = _model(**_CELLS[i][0])
            prompt = torch.randint(4, 150, (2, 3))
            dec = PersistentDecoder(m, batch_size=2, chunk=4, programs=1, persistent=True)
            assert not dec.flags["HEAD_RESIDENT"] and dec.flags["BV"] <= 32
            assert torch.equal(dec.run(prompt, 8), decode_ids(m, prompt, 8, use_graph=False)), _CELLS[i][1]
    finally:
        for k in ("HEAD_RESIDENT", "HEAD_CHUNK"):
            os.environ.pop("NEWLLM_PDEC_" + k)


def _check_barrier_that_cannot_be_met_raises():
    """Two programs that run one after the other (the interpreter) can never meet at a barrier: the first gives
    up after spin_limit polls, releases every later wait, and the run raises instead of hanging."""
    from newllm_nb.kernels.persistent import PersistentDecoder

    dec = PersistentDecoder(_model(), batch_size=1, chunk=2, programs=2, persistent=True, spin_limit=50)
    try:
        dec.run(torch.randint(4, 150, (1, 2)), 2)
    except RuntimeError as e:
        assert "timed out" in str(e), e
    else:
        raise AssertionError("a barrier that cannot be met went unnoticed")


def _check_ties_go_to_the_first_index():
    """A head whose second half repeats its first: every maximum occurs twice, in different programs; the decoder
    takes the first, as torch.argmax does."""
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.persistent import PersistentDecoder

    m = _model()
    with torch.no_grad():
        m.head.weight[75:] = m.head.weight[:75]
        m.head.bias[75:] = m.head.bias[:75]
    prompt = torch.randint(4, 150, (2, 3))
    ref = decode_ids(m, prompt, 6, use_graph=False)
    assert int(ref.max()) < 75
    for programs, persistent in ((1, True), (7, False)):
        out = PersistentDecoder(m, batch_size=2, chunk=3, programs=programs, persistent=persistent).run(prompt, 6)
        assert torch.equal(out, ref), (programs, out, ref)


def _check_flag_barriers():
    """The barriers that wait on the last arrival's flag (NEWLLM_PDEC_BARRIER=2) and that count arrivals per group
    of programs first (=3): same tokens; and a barrier that cannot be met still raises."""
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.persistent import PersistentDecoder

    try:
        for variant in ("2", "3"):
            os.environ["NEWLLM_PDEC_BARRIER"] = variant
            for i in (0, 4):
                m = _model(**_CELLS[i][0])
                prompt = torch.randint(4, 150, (2, 3))
                dec = PersistentDecoder(m, batch_size=2, chunk=4, programs=1, persistent=True)
                assert dec.flags["FLAG"] and dec.flags["GROUP"] == (16 if variant == "3" else 0)
                out = dec.run(prompt, 6)
                assert torch.equal(out, decode_ids(m, prompt, 6, use_graph=False)), (variant, _CELLS[i][1])
            _check_barrier_that_cannot_be_met_raises()
    finally:
        os.environ.pop("NEWLLM_PDEC_BARRIER", None)


_CHECKS = {f.__name__[len("_check_"):]: f for f in (
    _check_ties_go_to_the_first_index, _check_flag_barriers,
    _check_persistent_kernel_one_program, _check_phases_one_launch_each_with_many_programs,
    _check_head_read_in_chunks, _check_barrier_that_cannot_be_met_raises)}


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreter_checks.results(__file__, timeout=900)


@pytest.mark.parametrize("check", list(_CHECKS))
def test_persistent_kernel_under_triton_interpreter(interpreter_results, check):
    assert interpreter_results[check] == "ok", interpreter_results[check]


def test_persistent_decoder_refuses_what_it_lacks_in_one_line():
    from newllm_nb import ModelConfig
    from newllm_nb.kernels.persistent import PersistentDecoder, persistent_supported

    ok, why = persistent_supported(ModelConfig(arch="lstm"))
    assert not ok and "lstm" in why and "\n" not in why
    with pytest.raises(ValueError, match="invalid chunk=0"):
        PersistentDecoder(_model(), chunk=0, persistent=False)


# -- GPU ---------------------------------------------------------------------------------------------------------
def _gpu_ok() -> tuple[bool, str]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "interpreter run"
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    from newllm_nb.kernels.fused import fused_available
    from newllm_nb.kernels.persistent import cooperative_launch_available

    ok, why = fused_available("cuda")
    return (cooperative_launch_available() if ok else (ok, why))


_GPU, _WHY = _gpu_ok()
gpu = pytest.mark.skipif(not _GPU, reason=_WHY)


def _stable_model(cell: int):
    """A model of the cell at init 0.1: greedy decoding is stable there (the fp32 and fp64 reference decode the same
    300 tokens), so any difference is the kernel's. At larger weights the recurrence is chaotic: fp32 and fp64
    references part after 6 to 80 tokens, and a token-by-token comparison would test rounding, not the kernel."""
    return _model(**_CELLS[cell][0], vocab_size=1000, embed_dim=64, context_dim=64, hidden_dim=128, init_std=0.1)


@gpu
@pytest.mark.parametrize("programs", [None, 64])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("cell", [0, 1, 2, 4, 8])
def test_cooperative_launch_matches_eager_greedy_decode(batch, cell, programs):
    from newllm_nb.infer.generate import decode_ids
    from newllm_nb.kernels.persistent import PersistentDecoder

    m = _stable_model(cell).cuda()
    prompt = torch.randint(4, 1000, (batch, 5))
    ref = decode_ids(m, prompt, 300, use_graph=False)
    dec = PersistentDecoder(m, batch_size=batch, chunk=128, programs=programs)
    assert dec.persistent and (programs is None or dec.P == programs)
    out = dec.run(prompt, 300)  # three launches, the last one cut short
    assert out.shape == (batch, 300)
    assert torch.equal(out, ref), f"{_CELLS[cell][1]}: {(out == ref).float().mean():.3f} of the tokens agree"
    c = _reference_context(m, prompt.cuda(), out.cuda())
    err = float((dec.context() - c).abs().max()) / max(1.0, float(c.abs().max()))
    assert err < 1e-3, f"{_CELLS[cell][1]}: context off by {err} (relative) after 300 tokens"


@gpu
def test_a_new_token_count_compiles_nothing():
    """Runs of any length reuse the one compiled kernel (the last launch of a run decodes only the tokens still
    wanted: its count must not be specialised on, or every new reply length would compile again)."""
    from newllm_nb.kernels import persistent

    dec = persistent.PersistentDecoder(_stable_model(0).cuda(), chunk=64)
    prompt = torch.randint(4, 1000, (1, 3))
    dec.run(prompt, 5)
    caches = persistent._decode_kernel.device_caches
    before = sum(len(c[0]) for c in caches.values())
    for n in (1, 16, 17, 64, 100, 333):
        assert dec.run(prompt, n).shape == (1, n)
    assert sum(len(c[0]) for c in caches.values()) == before


@gpu
def test_grid_that_cannot_be_co_resident_falls_back_in_one_line(monkeypatch, capsys):
    from newllm_nb.infer.generate import persistent_decoder
    from newllm_nb.kernels.fused import FusedDecoder

    monkeypatch.setenv("NEWLLM_PDEC_PROGRAMS", str(1 << 20))  # far more programs than the GPU holds at once
    dec = persistent_decoder(_model().cuda())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert isinstance(dec, FusedDecoder)
    assert len(lines) == 1 and lines[0].startswith("persistent decoder unavailable"), lines


if __name__ == "__main__":
    interpreter_checks.main(_CHECKS)

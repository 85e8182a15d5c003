"""Fused Triton kernels for the New-LLM recurrence: training (forward + backward) and generation.

``FusedRecurrence`` computes the same function, with the same gradients, as ``recurrence.NewLLMRecurrence``
(same ``apply`` signature), but each direction of the time loop is ONE persistent kernel launch:

* every program (CTA) owns ``BLOCK_B`` rows of the batch and loops over all T steps itself. Batch rows
  are independent, so no program ever waits for another (cuDNN's persistent-RNN layout without the
  inter-CTA barrier). The weights are streamed from L2 through ``tl.dot`` every step; a step's
  activations go to a per-row scratch / saved-activation buffer that the same SM reads back at once.
* inside one step everything is fused: the recurrent matmul plus the hoisted embedding projection,
  ReLU, dropout, the further FNN layers, the gate matmul, sigmoids, ``f*c + i*u``, LayerNorm, clamp
  and the resets; backward the same in reverse.
* dropout masks come from Philox (``tl.rand4x``, four columns a call) keyed by a seed tensor drawn on the device in each
  forward, so they are fresh on every call and on every CUDA-graph replay; backward needs no mask:
  a kept FNN unit is exactly one whose stored output is > 0 (ReLU), and the context mask is regenerated
  from the saved seed.
* weight gradients stay one GEMM each over all B*T positions in PyTorch after the loop.

Mixed precision as in ``recurrence.py``: matmul operands in ``x_proj.dtype`` (bf16 / fp16 under autocast,
fp32 otherwise, then with IEEE fp32 dots so the fp32 path is not silently TF32), accumulation, gate
math, LayerNorm and the carried context in fp32.

Generation: ``FusedDecoder`` (``generate.GraphDecoder``'s interface) decodes inside a CUDA graph with
``FusedCell``: a greedy token is 2 + (L - 1) launches split over output columns (a batch-1 step is a GEMV,
bound by how fast the weights reach the SMs, so they must be spread over many), the embedding half of layer 1 read
from a precomputed vocab x hidden table (bias included), LayerNorm and the greedy argmax folded into the next
token's first launch.

Triton is an optional dependency: import this module only where ``import triton`` works.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..config import CONTEXT_CLAMP, LN_EPS
from .decoding import ChunkDecoder, capture_graph, sample_ids

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(device) -> tuple[bool, str]:
    """Whether the fused kernels run on ``device``; the string says why not (one line) when they don't."""
    device = torch.device(device)
    if _INTERPRET:
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return False, f"fused kernels need a CUDA GPU (device is {device.type})"
    if not torch.cuda.is_available():
        return False, "fused kernels need CUDA, which is not available"
    major, minor = torch.cuda.get_device_capability(device)
    # Triton's tl.dot lowers to mma.sync from sm_75 (fp16 / fp32) and sm_80 (bf16); wgmma only on sm_90,
    # where Triton picks it itself, so no Hopper-only path is required here.
    if (major, minor) < (7, 5):
        return False, f"fused kernels need compute capability >= 7.5; this GPU is sm_{major}{minor}"
    try:
        x = torch.ones(16, 16, device=device)
        y = torch.empty_like(x)
        _probe_kernel[(1,)](x, y, BLOCK=16)
        if not torch.equal(y, x @ x):
            return False, "Triton probe kernel returned wrong values on this GPU"
    except Exception as e:  # a broken toolchain (no compiler, driver mismatch): fall back, say why
        return False, f"Triton cannot compile for this GPU ({type(e).__name__}: {str(e)[:100]})"
    return True, f"Triton {triton.__version__} on sm_{major}{minor}"


def bf16_supported(device) -> bool:
    """bf16 tl.dot needs sm_80+ (T4 = sm_75 runs the fp16 and fp32 paths only)."""
    device = torch.device(device)
    return _INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0))


@triton.jit
def _probe_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(y_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, a, input_precision="ieee"))


@triton.jit
def _mm(a, w, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, w, acc, input_precision="ieee")
    else:
        return tl.dot(a, w, acc)


@triton.jit
def _uniforms(seed, rows, n0, W, BN: tl.constexpr):
    """The dropout uniforms of columns [n0, n0 + BN) of a W-wide draw, for the flat (t * B + b) rows ``rows``.
    One Philox call gives four neighbouring columns (n0 a multiple of 4), a quarter of ``tl.rand``'s work."""
    q = n0 // 4 + tl.arange(0, BN // 4)
    r0, r1, r2, r3 = tl.rand4x(seed, rows[:, None] * ((W + 3) // 4) + q[None, :])
    return tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4q + k is r_k[q]


@triton.jit
def _ln_stats(x_ptr, xrow, rm, mu_ptr, rs_ptr, srow, C, eps, BB: tl.constexpr, BC: tl.constexpr):
    """LayerNorm's mean and rstd of the rows ``x_ptr + xrow * C`` (fp32, C wide), with torch's two-pass
    variance; stored for backward at ``srow`` of mu / rs."""
    s1 = tl.zeros([BB], tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        m2 = rm[:, None] & (cols < C)[None, :]
        s1 += tl.sum(tl.load(x_ptr + xrow[:, None] * C + cols[None, :], mask=m2, other=0.0), 1)
    mean = s1 / C
    s2 = tl.zeros([BB], tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        m2 = rm[:, None] & (cols < C)[None, :]
        d = tl.where(m2, tl.load(x_ptr + xrow[:, None] * C + cols[None, :], mask=m2, other=0.0) - mean[:, None], 0.0)
        s2 += tl.sum(d * d, 1)
    rstd = 1.0 / tl.sqrt(s2 / C + eps)
    tl.store(mu_ptr + srow, mean, mask=rm)
    tl.store(rs_ptr + srow, rstd, mask=rm)
    return mean, rstd


# -- the forward step in phases --------------------------------------------------------------------------------
# Each phase computes, for the rows ``r64`` (mask ``rm``), one stage of step t: the state phase whole rows, the
# matmul phases the output columns [n_lo, n_hi). The persistent kernel runs every phase of every step in one
# program over all columns; the layered schedule launches each phase of each step, the state phase over row
# blocks, the others over row blocks x column blocks.
@triton.jit
def _fwd_state(t, rm, r64, seed, c_ptr, keep_ptr, lnw_ptr, lnb_ptr, xin_ptr, cin_ptr, mu_ptr, rs_ptr, xs_ptr,
               B, T, C, p_ctx, clamp, eps,
               L: tl.constexpr, HAS_KEEP: tl.constexpr, CTX_DROP: tl.constexpr, NORM_READ: tl.constexpr,
               NORM_OUT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    """c_{t-1} (with NORM_OUT and t > 0: clamp(LayerNorm(x_{t-1})) from xs, its mean / rstd stored at step t-1),
    after the reset, into cin; what layer 1 reads, after the read norm and context dropout, into xin."""
    dt = xin_ptr.dtype.element_ty
    tB = t * B
    srow = r64 * T + t  # this step's rows in the [B, T, ...] buffers
    scale_ctx = 1.0 / (1.0 - p_ctx)
    mean = tl.zeros([BB], tl.float32)
    rstd = tl.zeros([BB], tl.float32)
    if NORM_OUT:
        if t > 0:
            mean, rstd = _ln_stats(xs_ptr, r64, rm, mu_ptr, rs_ptr, srow - 1, C, eps, BB, BC)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < C
        m2 = rm[:, None] & cm[None, :]
        c = tl.load(c_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0)
        if NORM_OUT:
            if t > 0:
                x = tl.load(xs_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0)
                lw = tl.load(lnw_ptr + cols, mask=cm, other=0.0)
                lb = tl.load(lnb_ptr + cols, mask=cm, other=0.0)
                c = (x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
                c = tl.minimum(tl.maximum(c, -clamp), clamp)
        if HAS_KEEP:
            c = c * tl.load(keep_ptr + r64 * T + t, mask=rm, other=0.0)[:, None]
        tl.store(cin_ptr + srow[:, None] * C + cols[None, :], c, mask=m2)
        if not NORM_READ:
            if CTX_DROP:
                r = _uniforms(seed + L, tB + r64, c0, C, BC)
                c = tl.where(r >= p_ctx, c * scale_ctx, 0.0)
            tl.store(xin_ptr + srow[:, None] * C + cols[None, :], c.to(dt), mask=m2)
    if NORM_READ:  # xin = LayerNorm(c_{t-1})
        tl.debug_barrier()
        mean, rstd = _ln_stats(cin_ptr, srow, rm, mu_ptr, rs_ptr, srow, C, eps, BB, BC)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < C
            m2 = rm[:, None] & cm[None, :]
            c = tl.load(cin_ptr + srow[:, None] * C + cols[None, :], mask=m2, other=0.0)
            lw = tl.load(lnw_ptr + cols, mask=cm, other=0.0)
            lb = tl.load(lnb_ptr + cols, mask=cm, other=0.0)
            c = (c - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
            if CTX_DROP:
                r = _uniforms(seed + L, tB + r64, c0, C, BC)
                c = tl.where(r >= p_ctx, c * scale_ctx, 0.0)
            tl.store(xin_ptr + srow[:, None] * C + cols[None, :], c.to(dt), mask=m2)


@triton.jit
def _fwd_layer(j, t, n_lo, n_hi, rm, r64, seed, xp_ptr, wc_ptr, wl_ptr, bl_ptr, hs_ptr, xin_ptr, B, T, C, H, p,
               FIRST: tl.constexpr, DROP: tl.constexpr, IEEE: tl.constexpr,
               BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """FNN layer j + 1 (j = 0, FIRST: x_proj + W_c xin; else relu'd W_j h_j + b_j), then ReLU and dropout."""
    dt = xin_ptr.dtype.element_ty
    tB = t * B
    srow = r64 * T + t
    LS = T * B  # layer stride of hs
    scale = 1.0 / (1.0 - p)
    K = C if FIRST else H
    for n0 in range(n_lo, n_hi, BN):
        ncol = n0 + tl.arange(0, BN)
        nm = ncol < n_hi
        if FIRST:
            acc = tl.load(xp_ptr + srow[:, None] * H + ncol[None, :], mask=rm[:, None] & nm[None, :],
                          other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BB, BN], tl.float32) + tl.load(bl_ptr + (j - 1) * H + ncol, mask=nm,
                                                             other=0.0).to(tl.float32)[None, :]
        for k0 in range(0, K, BK):
            kc = k0 + tl.arange(0, BK)
            km = kc < K
            if FIRST:
                a = tl.load(xin_ptr + srow[:, None] * C + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                w = tl.load(wc_ptr + ncol[None, :] * C + kc[:, None], mask=km[:, None] & nm[None, :], other=0.0)
            else:
                a = tl.load(hs_ptr + ((j - 1) * LS + srow)[:, None] * H + kc[None, :],
                            mask=rm[:, None] & km[None, :], other=0.0)
                w = tl.load(wl_ptr + (j - 1) * H * H + ncol[None, :] * H + kc[:, None],
                            mask=km[:, None] & nm[None, :], other=0.0)
            acc = _mm(a, w, acc, IEEE)
        h = tl.maximum(acc, 0.0)
        if DROP:
            r = _uniforms(seed + j, tB + r64, n0, H, BN)
            h = tl.where(r >= p, h * scale, 0.0)
        tl.store(hs_ptr + (j * LS + srow)[:, None] * H + ncol[None, :], h.to(dt), mask=rm[:, None] & nm[None, :])


@triton.jit
def _fwd_rank(t, n_lo, n_hi, rm, r64, wv_ptr, hs_ptr, xin_ptr, vs_ptr, B, T, C, H, R, GIN,
              L: tl.constexpr, GATE_CTX: tl.constexpr, IEEE: tl.constexpr,
              BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Low-rank gates: vs = V [h_L ; xin], columns [n_lo, n_hi) of R."""
    dt = xin_ptr.dtype.element_ty
    srow = r64 * T + t
    LS = T * B
    for n0 in range(n_lo, n_hi, BN):
        ncol = n0 + tl.arange(0, BN)
        nm = ncol < n_hi
        acc = tl.zeros([BB, BN], tl.float32)
        for k0 in range(0, H, BK):
            kc = k0 + tl.arange(0, BK)
            km = kc < H
            a = tl.load(hs_ptr + ((L - 1) * LS + srow)[:, None] * H + kc[None, :], mask=rm[:, None] & km[None, :],
                        other=0.0)
            w = tl.load(wv_ptr + ncol[None, :] * GIN + kc[:, None], mask=km[:, None] & nm[None, :], other=0.0)
            acc = _mm(a, w, acc, IEEE)
        if GATE_CTX:
            for k0 in range(0, C, BK):
                kc = k0 + tl.arange(0, BK)
                km = kc < C
                a = tl.load(xin_ptr + srow[:, None] * C + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                w = tl.load(wv_ptr + ncol[None, :] * GIN + H + kc[:, None], mask=km[:, None] & nm[None, :],
                            other=0.0)
                acc = _mm(a, w, acc, IEEE)
        tl.store(vs_ptr + srow[:, None] * R + ncol[None, :], acc.to(dt), mask=rm[:, None] & nm[None, :])


@triton.jit
def _gate_bias(bg_ptr, cols, cm, C, BB: tl.constexpr, BC: tl.constexpr):
    """The gate accumulators f, i, u [BB, BC] of the context columns ``cols``, started at their biases."""
    f = tl.zeros([BB, BC], tl.float32) + tl.load(bg_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    i = tl.zeros([BB, BC], tl.float32) + tl.load(bg_ptr + C + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    u = tl.zeros([BB, BC], tl.float32) + tl.load(bg_ptr + 2 * C + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    return f, i, u


@triton.jit
def _gate_dots(f, i, u, a_ptr, arow, rm, K, w_ptr, WS, cols, cm, C, IEEE: tl.constexpr, BK: tl.constexpr):
    """f, i, u += a W^T for the K-wide operand rows ``a_ptr + arow * K`` and the weight rows of f, i and u
    (``w_ptr`` + row * WS, the row blocks [0, C), [C, 2C), [2C, 3C) at ``cols``; ``w_ptr`` points at the
    operand's first column in W_g)."""
    for k0 in range(0, K, BK):
        kc = k0 + tl.arange(0, BK)
        km = kc < K
        a = tl.load(a_ptr + arow[:, None] * K + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        wm = km[:, None] & cm[None, :]
        wp = w_ptr + kc[:, None]
        f = _mm(a, tl.load(wp + cols[None, :] * WS, mask=wm, other=0.0), f, IEEE)
        i = _mm(a, tl.load(wp + (C + cols)[None, :] * WS, mask=wm, other=0.0), i, IEEE)
        u = _mm(a, tl.load(wp + (2 * C + cols)[None, :] * WS, mask=wm, other=0.0), u, IEEE)
    return f, i, u


@triton.jit
def _fwd_gates(t, c_lo, c_hi, rm, r64, c_ptr, wg_ptr, bg_ptr, hs_ptr, xin_ptr, cin_ptr, vs_ptr, g_ptr, xs_ptr,
               B, T, C, H, R, GIN, clamp,
               L: tl.constexpr, NORM_OUT: tl.constexpr, GATE_CTX: tl.constexpr, RANK: tl.constexpr,
               IEEE: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """Gates for context columns [c_lo, c_hi): x = sigmoid(f) c + sigmoid(i) u (c after the reset, before the read
    norm and dropout) into xs (NORM_OUT), or c_t = clamp(x) into c."""
    srow = r64 * T + t
    LS = T * B
    WS = R if RANK else GIN  # row stride of the gate weight
    for c0 in range(c_lo, c_hi, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < c_hi
        m2 = rm[:, None] & cm[None, :]
        f, i, u = _gate_bias(bg_ptr, cols, cm, C, BB, BC)
        if RANK:
            f, i, u = _gate_dots(f, i, u, vs_ptr, srow, rm, R, wg_ptr, WS, cols, cm, C, IEEE, BK)
        else:
            f, i, u = _gate_dots(f, i, u, hs_ptr, (L - 1) * LS + srow, rm, H, wg_ptr, WS, cols, cm, C, IEEE, BK)
            if GATE_CTX:
                f, i, u = _gate_dots(f, i, u, xin_ptr, srow, rm, C, wg_ptr + H, WS, cols, cm, C, IEEE, BK)
        gp = g_ptr + srow[:, None] * (3 * C) + cols[None, :]
        tl.store(gp, f, mask=m2)
        tl.store(gp + C, i, mask=m2)
        tl.store(gp + 2 * C, u, mask=m2)
        c = tl.load(cin_ptr + srow[:, None] * C + cols[None, :], mask=m2, other=0.0)
        x = tl.sigmoid(f) * c + tl.sigmoid(i) * u
        if NORM_OUT:
            tl.store(xs_ptr + r64[:, None] * C + cols[None, :], x, mask=m2)
        else:  # no norm on the way out: c_t = clamp(x)
            tl.store(c_ptr + r64[:, None] * C + cols[None, :], tl.minimum(tl.maximum(x, -clamp), clamp), mask=m2)


@triton.jit
def _fwd_norm_out(rm, r64, c_ptr, lnw_ptr, lnb_ptr, mu_ptr, rs_ptr, xs_ptr, T, C, clamp, eps,
                  BB: tl.constexpr, BC: tl.constexpr):
    """After the last step: c_T = clamp(LayerNorm(x_T)), its mean / rstd stored at step T - 1."""
    mean, rstd = _ln_stats(xs_ptr, r64, rm, mu_ptr, rs_ptr, r64 * T + T - 1, C, eps, BB, BC)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < C
        m2 = rm[:, None] & cm[None, :]
        x = tl.load(xs_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0)
        lw = tl.load(lnw_ptr + cols, mask=cm, other=0.0)
        lb = tl.load(lnb_ptr + cols, mask=cm, other=0.0)
        y = (x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
        tl.store(c_ptr + r64[:, None] * C + cols[None, :], tl.minimum(tl.maximum(y, -clamp), clamp), mask=m2)


@triton.jit
def _fwd_kernel(xp_ptr, c_ptr, keep_ptr, wc_ptr, wl_ptr, bl_ptr, wv_ptr, wg_ptr, bg_ptr, lnw_ptr, lnb_ptr,
                seed_ptr, hs_ptr, xin_ptr, cin_ptr, vs_ptr, g_ptr, mu_ptr, rs_ptr, xs_ptr,
                B, T, C, H, R, GIN, p, p_ctx, clamp, eps,
                L: tl.constexpr, HAS_KEEP: tl.constexpr, DROP: tl.constexpr, CTX_DROP: tl.constexpr,
                NORM_READ: tl.constexpr, NORM_OUT: tl.constexpr, GATE_CTX: tl.constexpr, RANK: tl.constexpr,
                IEEE: tl.constexpr,
                BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """The persistent forward: every step, every phase, for rows [pid*BB, pid*BB + BB). ``c_ptr`` [B, C] fp32
    holds c_0 on entry and c_T on exit. Saved for backward: layer outputs hs [L, B, T, H], what layer 1 (and,
    GATE_CTX, the gates) read xin [B, T, C] (after reset, the read norm and context dropout, matmul dtype), cin
    [B, T, C] (after reset, fp32), the low-rank gate input vs [B, T, R] (RANK), raw gates g [B, T, 3C] fp32, and
    the LayerNorm's mean / rstd [B, T] (of c_{t-1} with NORM_READ, of x_t with NORM_OUT). xs [B, C] holds x_t for
    the next step's LayerNorm. The gate input is [h_L ; xin] of width GIN (H, or H + C with GATE_CTX); W_g's rows
    are GIN wide, or with RANK, V's are and W_g (U) reads the R-wide V [h_L ; xin]."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    rm = rows < B
    r64 = rows.to(tl.int64)
    seed = tl.load(seed_ptr)
    for t in range(T):
        _fwd_state(t, rm, r64, seed, c_ptr, keep_ptr, lnw_ptr, lnb_ptr, xin_ptr, cin_ptr, mu_ptr, rs_ptr, xs_ptr,
                   B, T, C, p_ctx, clamp, eps, L, HAS_KEEP, CTX_DROP, NORM_READ, NORM_OUT, BB, BC)
        tl.debug_barrier()
        for j in tl.static_range(L):
            _fwd_layer(j, t, 0, H, rm, r64, seed, xp_ptr, wc_ptr, wl_ptr, bl_ptr, hs_ptr, xin_ptr, B, T, C, H, p,
                       j == 0, DROP, IEEE, BB, BN, BK)
            tl.debug_barrier()
        if RANK:
            _fwd_rank(t, 0, R, rm, r64, wv_ptr, hs_ptr, xin_ptr, vs_ptr, B, T, C, H, R, GIN,
                      L, GATE_CTX, IEEE, BB, BN, BK)
            tl.debug_barrier()
        _fwd_gates(t, 0, C, rm, r64, c_ptr, wg_ptr, bg_ptr, hs_ptr, xin_ptr, cin_ptr, vs_ptr, g_ptr, xs_ptr,
                   B, T, C, H, R, GIN, clamp, L, NORM_OUT, GATE_CTX, RANK, IEEE, BB, BK, BC)
        tl.debug_barrier()
    if NORM_OUT:
        _fwd_norm_out(rm, r64, c_ptr, lnw_ptr, lnb_ptr, mu_ptr, rs_ptr, xs_ptr, T, C, clamp, eps, BB, BC)


# -- the layered schedule: one launch a phase a step, over row blocks x column blocks ---------------------------
@triton.jit(do_not_specialize=["t"], do_not_specialize_on_alignment=["t"])
def _fwd_state_launch(t, c_ptr, keep_ptr, lnw_ptr, lnb_ptr, seed_ptr, xin_ptr, cin_ptr, mu_ptr, rs_ptr, xs_ptr,
                      B, T, C, p_ctx, clamp, eps,
                      L: tl.constexpr, HAS_KEEP: tl.constexpr, CTX_DROP: tl.constexpr, NORM_READ: tl.constexpr,
                      NORM_OUT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    _fwd_state(t, rows < B, rows.to(tl.int64), tl.load(seed_ptr), c_ptr, keep_ptr, lnw_ptr, lnb_ptr, xin_ptr,
               cin_ptr, mu_ptr, rs_ptr, xs_ptr, B, T, C, p_ctx, clamp, eps, L, HAS_KEEP, CTX_DROP, NORM_READ,
               NORM_OUT, BB, BC)


@triton.jit(do_not_specialize=["j", "t"], do_not_specialize_on_alignment=["j", "t"])
def _fwd_layer_launch(j, t, xp_ptr, wc_ptr, wl_ptr, bl_ptr, seed_ptr, hs_ptr, xin_ptr, B, T, C, H, p,
                      FIRST: tl.constexpr, DROP: tl.constexpr, IEEE: tl.constexpr,
                      BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    n_lo = tl.program_id(1) * BN
    _fwd_layer(j, t, n_lo, tl.minimum(n_lo + BN, H), rows < B, rows.to(tl.int64), tl.load(seed_ptr), xp_ptr, wc_ptr,
               wl_ptr, bl_ptr, hs_ptr, xin_ptr, B, T, C, H, p, FIRST, DROP, IEEE, BB, BN, BK)


@triton.jit(do_not_specialize=["t"], do_not_specialize_on_alignment=["t"])
def _fwd_rank_launch(t, wv_ptr, hs_ptr, xin_ptr, vs_ptr, B, T, C, H, R, GIN,
                     L: tl.constexpr, GATE_CTX: tl.constexpr, IEEE: tl.constexpr,
                     BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    n_lo = tl.program_id(1) * BN
    _fwd_rank(t, n_lo, tl.minimum(n_lo + BN, R), rows < B, rows.to(tl.int64), wv_ptr, hs_ptr, xin_ptr, vs_ptr,
              B, T, C, H, R, GIN, L, GATE_CTX, IEEE, BB, BN, BK)


@triton.jit(do_not_specialize=["t"], do_not_specialize_on_alignment=["t"])
def _fwd_gates_launch(t, c_ptr, wg_ptr, bg_ptr, hs_ptr, xin_ptr, cin_ptr, vs_ptr, g_ptr, xs_ptr,
                      B, T, C, H, R, GIN, clamp,
                      L: tl.constexpr, NORM_OUT: tl.constexpr, GATE_CTX: tl.constexpr, RANK: tl.constexpr,
                      IEEE: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    c_lo = tl.program_id(1) * BC
    _fwd_gates(t, c_lo, tl.minimum(c_lo + BC, C), rows < B, rows.to(tl.int64), c_ptr, wg_ptr, bg_ptr, hs_ptr,
               xin_ptr, cin_ptr, vs_ptr, g_ptr, xs_ptr, B, T, C, H, R, GIN, clamp, L, NORM_OUT, GATE_CTX, RANK, IEEE,
               BB, BK, BC)


@triton.jit
def _fwd_norm_out_launch(c_ptr, lnw_ptr, lnb_ptr, mu_ptr, rs_ptr, xs_ptr, B, T, C, clamp, eps,
                         BB: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    _fwd_norm_out(rows < B, rows.to(tl.int64), c_ptr, lnw_ptr, lnb_ptr, mu_ptr, rs_ptr, xs_ptr, T, C, clamp, eps,
                  BB, BC)


# -- the backward step in phases, in the same two schedules ------------------------------------------------------
@triton.jit
def _ln_tile(g_ptr, cin_ptr, lnw_ptr, lnb_ptr, dc_ptr, c0, srow, r64, rm, mu, rs, C, clamp, BC: tl.constexpr):
    """One column tile of a backward step, recomputed from the saved gates (both passes over LayerNorm need
    it): sigmoid(f), sigmoid(i), u, c_{t-1}, the LayerNorm gain, x-hat, and dL/dy masked where the clamp cut
    y off. Also the tile's columns, masks and dc pointers."""
    cols = c0 + tl.arange(0, BC)
    cm = cols < C
    m2 = rm[:, None] & cm[None, :]
    gp = g_ptr + srow[:, None] * (3 * C) + cols[None, :]
    sf = tl.sigmoid(tl.load(gp, mask=m2, other=0.0))
    si = tl.sigmoid(tl.load(gp + C, mask=m2, other=0.0))
    u = tl.load(gp + 2 * C, mask=m2, other=0.0)
    c = tl.load(cin_ptr + srow[:, None] * C + cols[None, :], mask=m2, other=0.0)
    lw = tl.load(lnw_ptr + cols, mask=cm, other=0.0)
    lb = tl.load(lnb_ptr + cols, mask=cm, other=0.0)
    xh = (sf * c + si * u - mu[:, None]) * rs[:, None]
    y = xh * lw[None, :] + lb[None, :]
    dcp = dc_ptr + r64[:, None] * C + cols[None, :]
    dy = tl.load(dcp, mask=m2, other=0.0)
    dy = tl.where(m2 & (y >= -clamp) & (y <= clamp), dy, 0.0)
    return cols, cm, m2, sf, si, u, c, lw, xh, dcp, dy


@triton.jit
def _bwd_read_norm(t, pid, rm, r64, dc_ptr, keep_ptr, lnw_ptr, cin_ptr, mu_ptr, rs_ptr, dr_ptr, pw_ptr, pb_ptr,
                   T, C, HAS_KEEP: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    """Step t's read norm backward, r = LayerNorm(c_{t-1}): dr -> dc_{t-1}, then the reset; LayerNorm weight /
    bias gradients into this row block's partial sums (pw, pb row ``pid``)."""
    srow = r64 * T + t
    mu = tl.load(mu_ptr + srow, mask=rm, other=0.0)
    rs = tl.load(rs_ptr + srow, mask=rm, other=0.0)
    s1 = tl.zeros([BB], tl.float32)
    s2 = tl.zeros([BB], tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < C
        m2 = rm[:, None] & cm[None, :]
        dr = tl.load(dr_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0)
        xh = tl.where(m2, (tl.load(cin_ptr + srow[:, None] * C + cols[None, :], mask=m2, other=0.0)
                           - mu[:, None]) * rs[:, None], 0.0)
        pwp = pw_ptr + pid * C + cols
        tl.store(pwp, tl.load(pwp, mask=cm, other=0.0) + tl.sum(dr * xh, 0), mask=cm)
        pbp = pb_ptr + pid * C + cols
        tl.store(pbp, tl.load(pbp, mask=cm, other=0.0) + tl.sum(dr, 0), mask=cm)
        dxh = dr * tl.load(lnw_ptr + cols, mask=cm, other=0.0)[None, :]
        s1 += tl.sum(dxh, 1)
        s2 += tl.sum(dxh * xh, 1)
    m1 = s1 / C
    m2s = s2 / C
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < C
        m2 = rm[:, None] & cm[None, :]
        dr = tl.load(dr_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0)
        c = tl.load(cin_ptr + srow[:, None] * C + cols[None, :], mask=m2, other=0.0)
        xh = (c - mu[:, None]) * rs[:, None]
        dxh = dr * tl.load(lnw_ptr + cols, mask=cm, other=0.0)[None, :]
        dcp = dc_ptr + r64[:, None] * C + cols[None, :]
        dc = tl.load(dcp, mask=m2, other=0.0) + rs[:, None] * (dxh - m1[:, None] - xh * m2s[:, None])
        if HAS_KEEP:
            dc = dc * tl.load(keep_ptr + r64 * T + t, mask=rm, other=0.0)[:, None]
        tl.store(dcp, dc, mask=m2)


@triton.jit
def _bwd_gates(t, pid, rm, r64, dc_ptr, lnw_ptr, lnb_ptr, cin_ptr, g_ptr, mu_ptr, rs_ptr, dg_ptr, pw_ptr, pb_ptr,
               T, C, clamp, NORM_OUT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    """Through clamp (and LayerNorm, NORM_OUT): the gate gradients dG [B, T, 3C], and the direct path
    dc = dx * sigmoid(f)."""
    dt = dg_ptr.dtype.element_ty
    srow = r64 * T + t
    mu = tl.load(mu_ptr + srow, mask=rm, other=0.0)
    rs = tl.load(rs_ptr + srow, mask=rm, other=0.0)
    m1 = tl.zeros([BB], tl.float32)
    m2s = tl.zeros([BB], tl.float32)
    if NORM_OUT:  # row sums of dxhat and dxhat * xhat
        s1 = tl.zeros([BB], tl.float32)
        s2 = tl.zeros([BB], tl.float32)
        for c0 in range(0, C, BC):
            cols, cm, m2, sf, si, u, c, lw, xh, dcp, dy = _ln_tile(g_ptr, cin_ptr, lnw_ptr, lnb_ptr, dc_ptr, c0,
                                                                  srow, r64, rm, mu, rs, C, clamp, BC)
            pwp = pw_ptr + pid * C + cols
            tl.store(pwp, tl.load(pwp, mask=cm, other=0.0) + tl.sum(dy * xh, 0), mask=cm)
            pbp = pb_ptr + pid * C + cols
            tl.store(pbp, tl.load(pbp, mask=cm, other=0.0) + tl.sum(dy, 0), mask=cm)
            dxh = dy * lw[None, :]
            s1 += tl.sum(dxh, 1)
            s2 += tl.sum(dxh * xh, 1)
        m1 = s1 / C
        m2s = s2 / C
    for c0 in range(0, C, BC):
        if NORM_OUT:
            cols, cm, m2, sf, si, u, c, lw, xh, dcp, dy = _ln_tile(g_ptr, cin_ptr, lnw_ptr, lnb_ptr, dc_ptr, c0,
                                                                  srow, r64, rm, mu, rs, C, clamp, BC)
            dx = rs[:, None] * (dy * lw[None, :] - m1[:, None] - xh * m2s[:, None])
        else:
            cols = c0 + tl.arange(0, BC)
            m2 = rm[:, None] & (cols < C)[None, :]
            gp = g_ptr + srow[:, None] * (3 * C) + cols[None, :]
            sf = tl.sigmoid(tl.load(gp, mask=m2, other=0.0))
            si = tl.sigmoid(tl.load(gp + C, mask=m2, other=0.0))
            u = tl.load(gp + 2 * C, mask=m2, other=0.0)
            c = tl.load(cin_ptr + srow[:, None] * C + cols[None, :], mask=m2, other=0.0)
            x = sf * c + si * u
            dcp = dc_ptr + r64[:, None] * C + cols[None, :]
            dx = tl.where(m2 & (x >= -clamp) & (x <= clamp), tl.load(dcp, mask=m2, other=0.0), 0.0)
        dgp = dg_ptr + srow[:, None] * (3 * C) + cols[None, :]
        tl.store(dgp, (dx * c * sf * (1.0 - sf)).to(dt), mask=m2)
        tl.store(dgp + C, (dx * u * si * (1.0 - si)).to(dt), mask=m2)
        tl.store(dgp + 2 * C, (dx * si).to(dt), mask=m2)
        tl.store(dcp, dx * sf, mask=m2)


@triton.jit
def _bwd_rank(t, n_lo, n_hi, rm, r64, wg_ptr, dg_ptr, dv_ptr, T, C, R, IEEE: tl.constexpr,
              BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Low-rank gates: dV = dG U, columns [n_lo, n_hi) of R."""
    dt = dg_ptr.dtype.element_ty
    srow = r64 * T + t
    for n0 in range(n_lo, n_hi, BN):
        ncol = n0 + tl.arange(0, BN)
        nm = ncol < n_hi
        acc = tl.zeros([BB, BN], tl.float32)
        for k0 in range(0, 3 * C, BK):
            kc = k0 + tl.arange(0, BK)
            km = kc < 3 * C
            a = tl.load(dg_ptr + srow[:, None] * (3 * C) + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(wg_ptr + kc[:, None] * R + ncol[None, :], mask=km[:, None] & nm[None, :], other=0.0)
            acc = _mm(a, w, acc, IEEE)
        tl.store(dv_ptr + srow[:, None] * R + ncol[None, :], acc.to(dt), mask=rm[:, None] & nm[None, :])


@triton.jit
def _bwd_layer(j, t, n_lo, n_hi, rm, r64, dhs_ptr, wl_ptr, wv_ptr, wg_ptr, hs_ptr, dg_ptr, dv_ptr, da_ptr,
               B, T, C, H, R, GIN, p, LAST: tl.constexpr, HAS_DH: tl.constexpr, DROP: tl.constexpr,
               RANK: tl.constexpr, IEEE: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """da_j = dh_j * relu' * mask for columns [n_lo, n_hi) of H: dh_L = dhs_t + (gate input gradient)[:H] (LAST),
    else dh_j = da_{j+1} W_{j+1}."""
    dt = dg_ptr.dtype.element_ty
    srow = r64 * T + t
    scale = 1.0 / (1.0 - p)
    K = (R if RANK else 3 * C) if LAST else H
    for n0 in range(n_lo, n_hi, BN):
        ncol = n0 + tl.arange(0, BN)
        nm = ncol < n_hi
        o2 = rm[:, None] & nm[None, :]
        if LAST and HAS_DH:
            acc = tl.load(dhs_ptr + srow[:, None] * H + ncol[None, :], mask=o2, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BB, BN], tl.float32)
        for k0 in range(0, K, BK):
            kc = k0 + tl.arange(0, BK)
            km = kc < K
            if LAST:
                if RANK:
                    a = tl.load(dv_ptr + srow[:, None] * R + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                    w = tl.load(wv_ptr + kc[:, None] * GIN + ncol[None, :], mask=km[:, None] & nm[None, :],
                                other=0.0)
                else:
                    a = tl.load(dg_ptr + srow[:, None] * (3 * C) + kc[None, :], mask=rm[:, None] & km[None, :],
                                other=0.0)
                    w = tl.load(wg_ptr + kc[:, None] * GIN + ncol[None, :], mask=km[:, None] & nm[None, :],
                                other=0.0)
            else:
                a = tl.load(da_ptr + ((j + 1) * T * B + srow)[:, None] * H + kc[None, :],
                            mask=rm[:, None] & km[None, :], other=0.0)
                w = tl.load(wl_ptr + j * H * H + kc[:, None] * H + ncol[None, :], mask=km[:, None] & nm[None, :],
                            other=0.0)
            acc = _mm(a, w, acc, IEEE)
        h = tl.load(hs_ptr + (j * T * B + srow)[:, None] * H + ncol[None, :], mask=o2, other=0.0)
        if DROP:
            acc = acc * scale
        da = tl.where(h > 0, acc, 0.0)
        tl.store(da_ptr + (j * T * B + srow)[:, None] * H + ncol[None, :], da.to(dt), mask=o2)


@triton.jit
def _bwd_read(t, c_lo, c_hi, rm, r64, seed, dc_ptr, keep_ptr, wc_ptr, wv_ptr, wg_ptr, dg_ptr, dv_ptr, da_ptr,
              dr_ptr, B, T, C, H, R, GIN, p_ctx,
              L: tl.constexpr, HAS_KEEP: tl.constexpr, CTX_DROP: tl.constexpr, NORM_READ: tl.constexpr,
              GATE_CTX: tl.constexpr, RANK: tl.constexpr, IEEE: tl.constexpr,
              BB: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """d(what layer 1 and the gates read) = da_1 W_c (+ the gate input gradient's context half) for context
    columns [c_lo, c_hi), through context dropout; into dr for the read norm's backward, or straight into
    dc_{t-1}, then the reset."""
    tB = t * B
    srow = r64 * T + t
    scale_ctx = 1.0 / (1.0 - p_ctx)
    for c0 in range(c_lo, c_hi, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < c_hi
        m2 = rm[:, None] & cm[None, :]
        acc = tl.zeros([BB, BC], tl.float32)
        for k0 in range(0, H, BK):
            kc = k0 + tl.arange(0, BK)
            km = kc < H
            a = tl.load(da_ptr + srow[:, None] * H + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(wc_ptr + kc[:, None] * C + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
            acc = _mm(a, w, acc, IEEE)
        if GATE_CTX:
            KG = R if RANK else 3 * C
            for k0 in range(0, KG, BK):
                kc = k0 + tl.arange(0, BK)
                km = kc < KG
                if RANK:
                    a = tl.load(dv_ptr + srow[:, None] * R + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                    w = tl.load(wv_ptr + kc[:, None] * GIN + H + cols[None, :], mask=km[:, None] & cm[None, :],
                                other=0.0)
                else:
                    a = tl.load(dg_ptr + srow[:, None] * (3 * C) + kc[None, :], mask=rm[:, None] & km[None, :],
                                other=0.0)
                    w = tl.load(wg_ptr + kc[:, None] * GIN + H + cols[None, :], mask=km[:, None] & cm[None, :],
                                other=0.0)
                acc = _mm(a, w, acc, IEEE)
        if CTX_DROP:
            r = _uniforms(seed + L, tB + r64, c0, C, BC)
            acc = tl.where(r >= p_ctx, acc * scale_ctx, 0.0)
        if NORM_READ:
            tl.store(dr_ptr + r64[:, None] * C + cols[None, :], acc, mask=m2)
        else:
            dcp = dc_ptr + r64[:, None] * C + cols[None, :]
            dc = tl.load(dcp, mask=m2, other=0.0) + acc
            if HAS_KEEP:
                dc = dc * tl.load(keep_ptr + r64 * T + t, mask=rm, other=0.0)[:, None]
            tl.store(dcp, dc, mask=m2)


@triton.jit
def _bwd_kernel(dhs_ptr, dc_ptr, keep_ptr, wc_ptr, wl_ptr, wv_ptr, wg_ptr, lnw_ptr, lnb_ptr, seed_ptr,
                hs_ptr, cin_ptr, g_ptr, mu_ptr, rs_ptr, dg_ptr, dv_ptr, da_ptr, dr_ptr, pw_ptr, pb_ptr,
                B, T, C, H, R, GIN, p, p_ctx, clamp,
                L: tl.constexpr, HAS_DH: tl.constexpr, HAS_KEEP: tl.constexpr, DROP: tl.constexpr,
                CTX_DROP: tl.constexpr, NORM_READ: tl.constexpr, NORM_OUT: tl.constexpr, GATE_CTX: tl.constexpr,
                RANK: tl.constexpr, IEEE: tl.constexpr,
                BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """The persistent reverse loop for rows [pid*BB, pid*BB + BB). ``dc_ptr`` [B, C] fp32: dL/dc_T on entry,
    dL/dc_0 on exit. Writes the per-step pre-activation gradients dG [B, T, 3C], dV [B, T, R] (RANK) and dA
    [L, B, T, H] (matmul dtype) for the weight-gradient GEMMs, and this program's partial LayerNorm weight / bias
    gradients (pw, pb [programs, C]). dr [B, C] holds the read norm's input gradient for the step before."""
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    rm = rows < B
    r64 = rows.to(tl.int64)
    seed = tl.load(seed_ptr)
    for tt in range(T):
        t = T - 1 - tt
        if NORM_READ:
            if tt > 0:
                _bwd_read_norm(t + 1, pid, rm, r64, dc_ptr, keep_ptr, lnw_ptr, cin_ptr, mu_ptr, rs_ptr, dr_ptr,
                               pw_ptr, pb_ptr, T, C, HAS_KEEP, BB, BC)
                tl.debug_barrier()
        _bwd_gates(t, pid, rm, r64, dc_ptr, lnw_ptr, lnb_ptr, cin_ptr, g_ptr, mu_ptr, rs_ptr, dg_ptr, pw_ptr, pb_ptr,
                   T, C, clamp, NORM_OUT, BB, BC)
        tl.debug_barrier()
        if RANK:
            _bwd_rank(t, 0, R, rm, r64, wg_ptr, dg_ptr, dv_ptr, T, C, R, IEEE, BB, BN, BK)
            tl.debug_barrier()
        _bwd_layer(L - 1, t, 0, H, rm, r64, dhs_ptr, wl_ptr, wv_ptr, wg_ptr, hs_ptr, dg_ptr, dv_ptr, da_ptr,
                   B, T, C, H, R, GIN, p, True, HAS_DH, DROP, RANK, IEEE, BB, BN, BK)
        tl.debug_barrier()
        for jj in tl.static_range(1, L):
            _bwd_layer(L - 1 - jj, t, 0, H, rm, r64, dhs_ptr, wl_ptr, wv_ptr, wg_ptr, hs_ptr, dg_ptr, dv_ptr, da_ptr,
                       B, T, C, H, R, GIN, p, False, HAS_DH, DROP, RANK, IEEE, BB, BN, BK)
            tl.debug_barrier()
        _bwd_read(t, 0, C, rm, r64, seed, dc_ptr, keep_ptr, wc_ptr, wv_ptr, wg_ptr, dg_ptr, dv_ptr, da_ptr, dr_ptr,
                  B, T, C, H, R, GIN, p_ctx, L, HAS_KEEP, CTX_DROP, NORM_READ, GATE_CTX, RANK, IEEE, BB, BK, BC)
        tl.debug_barrier()
    if NORM_READ:
        _bwd_read_norm(0, pid, rm, r64, dc_ptr, keep_ptr, lnw_ptr, cin_ptr, mu_ptr, rs_ptr, dr_ptr, pw_ptr, pb_ptr,
                       T, C, HAS_KEEP, BB, BC)


@triton.jit(do_not_specialize=["t"], do_not_specialize_on_alignment=["t"])
def _bwd_gates_launch(t, dc_ptr, keep_ptr, lnw_ptr, lnb_ptr, cin_ptr, g_ptr, mu_ptr, rs_ptr, dg_ptr, dr_ptr,
                      pw_ptr, pb_ptr, B, T, C, clamp, HAS_KEEP: tl.constexpr, NORM_READ: tl.constexpr,
                      NORM_OUT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    """Step t + 1's read norm backward (NORM_READ, t < T - 1), then step t's gate gradients: whole rows."""
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    rm = rows < B
    r64 = rows.to(tl.int64)
    if NORM_READ:
        if t < T - 1:
            _bwd_read_norm(t + 1, pid, rm, r64, dc_ptr, keep_ptr, lnw_ptr, cin_ptr, mu_ptr, rs_ptr, dr_ptr, pw_ptr,
                           pb_ptr, T, C, HAS_KEEP, BB, BC)
            tl.debug_barrier()
    _bwd_gates(t, pid, rm, r64, dc_ptr, lnw_ptr, lnb_ptr, cin_ptr, g_ptr, mu_ptr, rs_ptr, dg_ptr, pw_ptr, pb_ptr,
               T, C, clamp, NORM_OUT, BB, BC)


@triton.jit
def _bwd_read_norm_launch(dc_ptr, keep_ptr, lnw_ptr, cin_ptr, mu_ptr, rs_ptr, dr_ptr, pw_ptr, pb_ptr, B, T, C,
                          HAS_KEEP: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    """After the last (first in time) step: step 0's read norm backward -> dL/dc_0."""
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    _bwd_read_norm(0, pid, rows < B, rows.to(tl.int64), dc_ptr, keep_ptr, lnw_ptr, cin_ptr, mu_ptr, rs_ptr, dr_ptr,
                   pw_ptr, pb_ptr, T, C, HAS_KEEP, BB, BC)


@triton.jit(do_not_specialize=["t"], do_not_specialize_on_alignment=["t"])
def _bwd_rank_launch(t, wg_ptr, dg_ptr, dv_ptr, B, T, C, R, IEEE: tl.constexpr,
                     BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    n_lo = tl.program_id(1) * BN
    _bwd_rank(t, n_lo, tl.minimum(n_lo + BN, R), rows < B, rows.to(tl.int64), wg_ptr, dg_ptr, dv_ptr, T, C, R, IEEE,
              BB, BN, BK)


@triton.jit(do_not_specialize=["j", "t"], do_not_specialize_on_alignment=["j", "t"])
def _bwd_layer_launch(j, t, dhs_ptr, wl_ptr, wv_ptr, wg_ptr, hs_ptr, dg_ptr, dv_ptr, da_ptr, B, T, C, H, R, GIN, p,
                      LAST: tl.constexpr, HAS_DH: tl.constexpr, DROP: tl.constexpr, RANK: tl.constexpr,
                      IEEE: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    n_lo = tl.program_id(1) * BN
    _bwd_layer(j, t, n_lo, tl.minimum(n_lo + BN, H), rows < B, rows.to(tl.int64), dhs_ptr, wl_ptr, wv_ptr, wg_ptr,
               hs_ptr, dg_ptr, dv_ptr, da_ptr, B, T, C, H, R, GIN, p, LAST, HAS_DH, DROP, RANK, IEEE, BB, BN, BK)


@triton.jit(do_not_specialize=["t"], do_not_specialize_on_alignment=["t"])
def _bwd_read_launch(t, seed_ptr, dc_ptr, keep_ptr, wc_ptr, wv_ptr, wg_ptr, dg_ptr, dv_ptr, da_ptr, dr_ptr,
                     B, T, C, H, R, GIN, p_ctx,
                     L: tl.constexpr, HAS_KEEP: tl.constexpr, CTX_DROP: tl.constexpr, NORM_READ: tl.constexpr,
                     GATE_CTX: tl.constexpr, RANK: tl.constexpr, IEEE: tl.constexpr,
                     BB: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    c_lo = tl.program_id(1) * BC
    _bwd_read(t, c_lo, tl.minimum(c_lo + BC, C), rows < B, rows.to(tl.int64), tl.load(seed_ptr), dc_ptr, keep_ptr,
              wc_ptr, wv_ptr, wg_ptr, dg_ptr, dv_ptr, da_ptr, dr_ptr, B, T, C, H, R, GIN, p_ctx,
              L, HAS_KEEP, CTX_DROP, NORM_READ, GATE_CTX, RANK, IEEE, BB, BK, BC)


def _blocks(B: int, C: int, H: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Tile sizes. BLOCK_B rows per program: small enough to spread the batch over all SMs (16 is tl.dot's
    minimum and measured fastest on an H100 at B=2048: 128 programs); NEWLLM_FUSED_{BLOCK_B,BN,BK,BC,WARPS,
    STAGES} override them for tuning on another GPU."""
    def p2(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(n)))

    def env(name: str, default: int) -> int:
        return int(os.environ.get("NEWLLM_FUSED_" + name, 0)) or default

    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        bb = 16 if B <= 16 * sms else 32 if B <= 32 * sms else 64
        # 16-bit operands: 256-wide output tiles, 64-deep K steps, 8 warps, the fastest of a grid on an H200 for
        # the presets' cells (benchmarks/RESULTS.md, "Fused kernel tiles"). fp32 operands take twice the shared
        # memory a stage: 128-wide tiles and 4 warps.
        wide = dtype.itemsize == 2
        return dict(BB=env("BLOCK_B", bb), BN=env("BN", p2(H, 256 if wide else 128)), BK=env("BK", p2(max(C, H), 64)),
                    BC=env("BC", p2(C, 128)), num_warps=env("WARPS", 8 if wide else 4), num_stages=env("STAGES", 3))
    return dict(BB=16, BN=p2(H, 32), BK=p2(max(C, H), 32), BC=p2(C, 32))


def _kernel_kwargs(blocks: dict) -> dict:
    return {k: v for k, v in blocks.items() if k not in ("num_warps", "num_stages") or not _INTERPRET}




def fused_schedule(device: torch.device) -> str:
    """How the fused kernels walk the time loop on ``device``. "persistent": one launch each way, each program
    owning a block of rows for all T steps and reading every weight of the cell at every step. "layered": one
    launch a phase a step (the state phase: c_{t-1} and what layer 1 reads; each FNN layer; the low-rank factor;
    the gates; backward the same in reverse), each over row blocks (x column blocks for the products), so that each
    program reads a slice of a layer's weights and the weights cross the L2 far fewer times (T * (L + 2) launches
    a pass, captured in the step's CUDA graph). A GPU takes the layered schedule at every batch (on an H200 it is
    the faster one from batch 8 to 2048, benchmarks/RESULTS.md); the interpreter the persistent kernel.
    NEWLLM_FUSED_SCHEDULE sets it."""
    forced = os.environ.get("NEWLLM_FUSED_SCHEDULE", "")
    if forced:
        if forced not in ("persistent", "layered"):
            raise ValueError(f"NEWLLM_FUSED_SCHEDULE={forced!r}: use 'persistent' or 'layered'")
        return forced
    return "layered" if device.type == "cuda" else "persistent"


def _layered_blocks(B: int, C: int, H: int, device: torch.device) -> dict:
    """The layered schedule's tiles: BB rows x BN columns (layers, the low-rank factor) or x BC context columns
    (gates, the read's backward) a matmul program; BR rows and BCR-wide steps for the whole-row phases. Up to 32
    rows the batch is one row block of its own height, and 32-column tiles spread each layer's weights over more
    programs (H200, benchmarks/RESULTS.md). NEWLLM_FUSED_LAYERED_{BB,BN,BC,BK,WARPS,STAGES} override them."""
    def env(name: str, default: int) -> int:
        return int(os.environ.get("NEWLLM_FUSED_LAYERED_" + name, 0)) or default

    def p2(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(n)))

    if device.type == "cuda":
        cols = 32 if B <= 32 else 64
        return dict(BB=env("BB", p2(B, 64)), BN=env("BN", p2(H, cols)), BC=env("BC", p2(C, cols)), BK=env("BK", 64),
                    BR=16, BCR=p2(C, 128), num_warps=env("WARPS", 4), num_stages=env("STAGES", 3))
    return dict(BB=env("BB", 16), BN=env("BN", 16), BC=env("BC", 16), BK=env("BK", 16), BR=16, BCR=p2(C, 32))


def _warp_kwargs(lay: dict) -> dict:
    return {} if _INTERPRET else {k: lay[k] for k in ("num_warps", "num_stages") if k in lay}


_FITTED_STAGES: dict = {}  # (kernel, its constexprs) -> the pipeline depth this GPU's shared memory holds


def _launch(kernel, grid, *args, **kw) -> None:
    """``kernel[grid](*args, **kw)``; where the tiles' pipeline does not fit this GPU's shared memory (an L4 has
    99 KB a block, an H200 227 KB), again with one stage fewer, down to one, and remembered for the next launch."""
    if "num_stages" not in kw:
        kernel[grid](*args, **kw)
        return
    key = (kernel, tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, (bool, int)))))
    kw["num_stages"] = _FITTED_STAGES.get(key, kw["num_stages"])
    while True:
        try:
            kernel[grid](*args, **kw)
            return
        except OutOfResources:
            if kw["num_stages"] <= 1:
                raise
            kw["num_stages"] -= 1
            _FITTED_STAGES[key] = kw["num_stages"]


def _forward_layered(lay, xp, c, kp, Wc, Wl, bl, Wv, Wg, bg, lnw, lnb, seed, Hs, Xin, Cin, VS, G, MU, RS, XS,
                     B, T, C, H, R, GIN, p, p_ctx, L, has_keep, drop, ctx_drop, norm_read, norm_out, gate_ctx):
    """The forward pass as T * (L + 2 + rank) launches (the buffers as the persistent kernel fills them)."""
    BB, BN, BK, BC, BR, BCR = (lay[k] for k in ("BB", "BN", "BK", "BC", "BR", "BCR"))
    ieee, w = Xin.dtype == torch.float32, _warp_kwargs(lay)
    nrb = triton.cdiv(B, BB)
    g_h, g_r, g_c = (nrb, triton.cdiv(H, BN)), (nrb, triton.cdiv(max(R, 1), BN)), (nrb, triton.cdiv(C, BC))
    for t in range(T):
        _launch(_fwd_state_launch, (triton.cdiv(B, BR),), t, c, kp, lnw, lnb, seed, Xin, Cin, MU, RS, XS, B, T, C,
                p_ctx, CONTEXT_CLAMP, LN_EPS, L=L, HAS_KEEP=has_keep, CTX_DROP=ctx_drop, NORM_READ=norm_read,
                NORM_OUT=norm_out, BB=BR, BC=BCR)
        for j in range(L):
            _launch(_fwd_layer_launch, g_h, j, t, xp, Wc, Wl, bl, seed, Hs, Xin, B, T, C, H, p, FIRST=j == 0,
                    DROP=drop, IEEE=ieee, BB=BB, BN=BN, BK=BK, **w)
        if R:
            _launch(_fwd_rank_launch, g_r, t, Wv, Hs, Xin, VS, B, T, C, H, R, GIN, L=L, GATE_CTX=gate_ctx,
                    IEEE=ieee, BB=BB, BN=BN, BK=BK, **w)
        _launch(_fwd_gates_launch, g_c, t, c, Wg, bg, Hs, Xin, Cin, VS, G, XS, B, T, C, H, R, GIN, CONTEXT_CLAMP, L=L,
                NORM_OUT=norm_out, GATE_CTX=gate_ctx, RANK=R > 0, IEEE=ieee, BB=BB, BK=BK, BC=BC, **w)
    if norm_out:
        _launch(_fwd_norm_out_launch, (triton.cdiv(B, BR),), c, lnw, lnb, MU, RS, XS, B, T, C, CONTEXT_CLAMP,
                LN_EPS, BB=BR, BC=BCR)


def _backward_layered(lay, dhs, dc, kp, Wc, Wl, Wv, Wg, lnw, lnb, seed, Hs, Cin, G, MU, RS, dG, dV, dA, DR, PW, PB,
                      B, T, C, H, R, GIN, p, p_ctx, L, has_dh, has_keep, drop, ctx_drop, norm_read, norm_out,
                      gate_ctx):
    """The backward pass as T * (L + 2 + rank) launches; PW / PB have one row per BR-row block."""
    BB, BN, BK, BC, BR, BCR = (lay[k] for k in ("BB", "BN", "BK", "BC", "BR", "BCR"))
    ieee, w = Hs.dtype == torch.float32, _warp_kwargs(lay)
    nrb = triton.cdiv(B, BB)
    g_rows = (triton.cdiv(B, BR),)
    g_h, g_r, g_c = (nrb, triton.cdiv(H, BN)), (nrb, triton.cdiv(max(R, 1), BN)), (nrb, triton.cdiv(C, BC))
    for t in reversed(range(T)):
        _launch(_bwd_gates_launch, g_rows, t, dc, kp, lnw, lnb, Cin, G, MU, RS, dG, DR, PW, PB, B, T, C, CONTEXT_CLAMP,
                HAS_KEEP=has_keep, NORM_READ=norm_read, NORM_OUT=norm_out, BB=BR, BC=BCR)
        if R:
            _launch(_bwd_rank_launch, g_r, t, Wg, dG, dV, B, T, C, R, IEEE=ieee, BB=BB, BN=BN, BK=BK, **w)
        for j in reversed(range(L)):
            _launch(_bwd_layer_launch, g_h, j, t, dhs, Wl, Wv, Wg, Hs, dG, dV, dA, B, T, C, H, R, GIN, p,
                    LAST=j == L - 1, HAS_DH=has_dh, DROP=drop, RANK=R > 0, IEEE=ieee, BB=BB, BN=BN, BK=BK, **w)
        _launch(_bwd_read_launch, g_c, t, seed, dc, kp, Wc, Wv, Wg, dG, dV, dA, DR, B, T, C, H, R, GIN, p_ctx, L=L,
                HAS_KEEP=has_keep, CTX_DROP=ctx_drop, NORM_READ=norm_read, GATE_CTX=gate_ctx,
                RANK=R > 0, IEEE=ieee, BB=BB, BK=BK, BC=BC, **w)
    if norm_read:
        _launch(_bwd_read_norm_launch, g_rows, dc, kp, lnw, Cin, MU, RS, DR, PW, PB, B, T, C, HAS_KEEP=has_keep, BB=BR,
                BC=BCR)


def fused_cell_supported(cfg) -> tuple[bool, str]:
    """Whether the training kernels implement ``cfg``'s cell (a ``ModelConfig``); the string names what they lack.
    They cover every state_norm, gate_context, gate_rank and the init-only chrono_init; not fnn_residual,
    slow_forget_bias (a LayerNorm per half) or context_tanh."""
    lacking = [name for name, on in (("fnn_residual", cfg.fnn_residual != "none"),
                                     ("slow_forget_bias", bool(cfg.slow_forget_bias)),
                                     ("context_tanh", cfg.context_tanh)) if on]
    return (not lacking), ("the fused kernels have no " + ", ".join(lacking)) if lacking else "ok"


class CellOptions(NamedTuple):
    """The cell options as the kernels take them, training and decoding alike."""
    norm_read: bool  # LayerNorm on what the cell reads of c_{t-1} (state_norm "read")
    norm_out: bool  # LayerNorm on the way out (state_norm "layernorm" / "noaffine")
    gate_ctx: bool  # the gates also read c_{t-1}
    R: int  # rank of the low-rank gates (0: full rank)
    GIN: int  # width of the gate input [h_L ; c]: H, or H + C when the gates read the context
    lnw: torch.Tensor  # the norm's gain [C] fp32 (ones without an affine)
    lnb: torch.Tensor  # its shift [C] fp32 (zeros without an affine)


def cell_options(state_norm: str, gate_context: bool, W_v: Optional[torch.Tensor], ln_w: Optional[torch.Tensor],
                 ln_b: Optional[torch.Tensor], H: int, C: int, device: torch.device) -> CellOptions:
    # No affine ("noaffine", "none"): the kernels apply an identity gain and zero shift.
    lnw = ln_w.detach().float().contiguous() if ln_w is not None else torch.ones(C, device=device)
    lnb = ln_b.detach().float().contiguous() if ln_b is not None else torch.zeros(C, device=device)
    return CellOptions(state_norm == "read", state_norm in ("layernorm", "noaffine"), bool(gate_context),
                       W_v.shape[0] if W_v is not None else 0, H + C if gate_context else H, lnw, lnb)


def _run_forward(ctx, x_proj, c0, keep, W_c, W_v, W_g, b_g, ln_w, ln_b, p, p_ctx, training, state_norm, gate_context,
                 layers):
    B, T, H = x_proj.shape
    C = c0.shape[1]
    dt, dev = x_proj.dtype, x_proj.device
    if dt == torch.bfloat16 and not bf16_supported(dev):
        raise RuntimeError("the fused kernels need sm_80+ for bf16 matmuls: train this GPU in fp16 or fp32")
    L = 1 + len(layers) // 2
    norm_read, norm_out, gate_ctx, R, GIN, lnw, lnb = cell_options(state_norm, gate_context, W_v, ln_w, ln_b, H, C,
                                                                   dev)
    xp = x_proj.contiguous()
    Wc = W_c.to(dt).contiguous()
    Wg, bg = W_g.to(dt).contiguous(), b_g.to(dt).contiguous()
    Wv = W_v.to(dt).contiguous() if W_v is not None else torch.zeros(1, dtype=dt, device=dev)
    if L > 1:
        Wl = torch.stack([layers[k].to(dt) for k in range(0, len(layers), 2)]).contiguous()
        bl = torch.stack([layers[k + 1].to(dt) for k in range(0, len(layers), 2)]).contiguous()
    else:
        Wl = bl = torch.zeros(1, dtype=dt, device=dev)
    drop, ctx_drop = bool(training and p > 0), bool(training and p_ctx > 0)
    # A fresh seed per call, drawn on the device: graph-safe, so every replay gets new masks too.
    seed = torch.randint(0, 2**31 - 1 - 2 * L, (1,), device=dev, dtype=torch.int64) if drop or ctx_drop \
        else torch.zeros(1, dtype=torch.int64, device=dev)
    kp = keep.reshape(B, T).float().contiguous() if keep is not None else torch.zeros(1, device=dev)
    c = c0.float().clone().contiguous()
    # Per-position buffers batch-major, as x_proj: the layer outputs are the head's input and their gradients
    # x_proj's, with no transposing copy either way.
    Hs = torch.empty(L, B, T, H, dtype=dt, device=dev)
    Xin = torch.empty(B, T, C, dtype=dt, device=dev)
    Cin = torch.empty(B, T, C, dtype=torch.float32, device=dev)
    VS = torch.empty(B, T, R, dtype=dt, device=dev) if R else torch.zeros(1, dtype=dt, device=dev)
    G = torch.empty(B, T, 3 * C, dtype=torch.float32, device=dev)
    MU = torch.zeros(B, T, dtype=torch.float32, device=dev)
    RS = torch.zeros(B, T, dtype=torch.float32, device=dev)
    XS = torch.zeros(B, C, dtype=torch.float32, device=dev)
    schedule = fused_schedule(dev)
    if schedule == "layered":
        _forward_layered(_layered_blocks(B, C, H, dev), xp, c, kp, Wc, Wl, bl, Wv, Wg, bg, lnw, lnb, seed, Hs, Xin, Cin,
                         VS, G, MU, RS, XS, B, T, C, H, R, GIN, float(p), float(p_ctx), L, keep is not None, drop,
                         ctx_drop, norm_read, norm_out, gate_ctx)
    else:
        blk = _blocks(B, C, H, dev, dt)
        _launch(_fwd_kernel, (triton.cdiv(B, blk["BB"]),),
            xp, c, kp, Wc, Wl, bl, Wv, Wg, bg, lnw, lnb, seed, Hs, Xin, Cin, VS, G, MU, RS, XS,
            B, T, C, H, R, GIN, float(p), float(p_ctx), CONTEXT_CLAMP, LN_EPS,
            L=L, HAS_KEEP=keep is not None, DROP=drop, CTX_DROP=ctx_drop, NORM_READ=norm_read,
            NORM_OUT=norm_out, GATE_CTX=gate_ctx, RANK=R > 0, IEEE=dt == torch.float32, **_kernel_kwargs(blk))
    ctx.schedule = schedule
    ctx.save_for_backward(kp, Wc, Wl, Wv, Wg, lnw, lnb, seed, Hs, Xin, Cin, VS, G, MU, RS)
    ctx.cfg = (L, R, GIN, float(p), float(p_ctx), drop, ctx_drop, keep is not None, c0.dtype, norm_read, norm_out,
               gate_ctx, ln_w is not None)
    return Hs[L - 1], c


def _run_backward(ctx, d_hs, d_c):
    """Gradients in the order (x_proj, c0, W_c, W_v, W_g, b_g, ln_w, ln_b, *layers); W_v's is None without a rank,
    ln_w / ln_b's None without an affine."""
    kp, Wc, Wl, Wv, Wg, lnw, lnb, seed, Hs, Xin, Cin, VS, G, MU, RS = ctx.saved_tensors
    L, R, GIN, p, p_ctx, drop, ctx_drop, has_keep, c_dtype, norm_read, norm_out, gate_ctx, affine = ctx.cfg
    _, B, T, H = Hs.shape
    C = Cin.shape[-1]
    dt, dev = Hs.dtype, Hs.device
    dhs = d_hs.to(dt).contiguous() if d_hs is not None else torch.zeros(1, dtype=dt, device=dev)
    dc = d_c.float().clone().contiguous() if d_c is not None else torch.zeros(B, C, device=dev)
    dG = torch.empty(B, T, 3 * C, dtype=dt, device=dev)
    dV = torch.empty(B, T, R, dtype=dt, device=dev) if R else torch.zeros(1, dtype=dt, device=dev)
    dA = torch.empty(L, B, T, H, dtype=dt, device=dev)
    DR = torch.empty(B, C, dtype=torch.float32, device=dev) if norm_read else torch.zeros(1, device=dev)
    if ctx.schedule == "layered":
        lay = _layered_blocks(B, C, H, dev)
        PW = torch.zeros(triton.cdiv(B, lay["BR"]), C, dtype=torch.float32, device=dev)
        PB = torch.zeros_like(PW)
        _backward_layered(lay, dhs, dc, kp, Wc, Wl, Wv, Wg, lnw, lnb, seed, Hs, Cin, G, MU, RS, dG, dV, dA, DR, PW, PB,
                          B, T, C, H, R, GIN, p, p_ctx, L, d_hs is not None, has_keep, drop, ctx_drop, norm_read,
                          norm_out, gate_ctx)
    else:
        blk = _blocks(B, C, H, dev, dt)
        nprog = triton.cdiv(B, blk["BB"])
        PW = torch.zeros(nprog, C, dtype=torch.float32, device=dev)
        PB = torch.zeros_like(PW)
        _launch(_bwd_kernel, (nprog,), dhs, dc, kp, Wc, Wl, Wv, Wg, lnw, lnb, seed, Hs, Cin, G, MU, RS, dG, dV, dA,
                DR, PW, PB, B, T, C, H, R, GIN, p, p_ctx, CONTEXT_CLAMP,
                L=L, HAS_DH=d_hs is not None, HAS_KEEP=has_keep, DROP=drop, CTX_DROP=ctx_drop,
                NORM_READ=norm_read, NORM_OUT=norm_out, GATE_CTX=gate_ctx, RANK=R > 0,
                IEEE=dt == torch.float32, **_kernel_kwargs(blk))
    # Weight gradients: one matmul each over all T*B positions (as recurrence.py).
    flatG, flatA = dG.reshape(-1, 3 * C), dA.reshape(L, -1, H)
    h_last, x_in = Hs[L - 1].reshape(-1, H), Xin.reshape(-1, C)  # the gate input [h_L ; xin]

    def d_gate_input(d_out):  # d_out^T [h_L ; xin]: the gradient of a weight that reads the gate input
        d = d_out.t() @ h_last
        return torch.cat([d, d_out.t() @ x_in], 1) if gate_ctx else d

    d_bg = flatG.sum(0, dtype=torch.float32)  # summed in fp32 as read: no fp32 copy of the [T*B, 3C] gradients
    if R:
        d_Wg = (flatG.t() @ VS.reshape(-1, R)).float()
        d_Wv = d_gate_input(dV.reshape(-1, R)).float()
    else:
        d_Wg, d_Wv = d_gate_input(flatG).float(), None
    d_Wc = (flatA[0].t() @ x_in).float()  # Xin: exactly what layer 1 read
    layer_grads = []
    for j in range(1, L):
        layer_grads += [(flatA[j].t() @ Hs[j - 1].reshape(-1, H)).float(), flatA[j].sum(0, dtype=torch.float32)]
    d_x = dA[0]
    d_lnw, d_lnb = (PW.sum(0), PB.sum(0)) if affine else (None, None)
    return d_x, dc.to(c_dtype), d_Wc, d_Wv, d_Wg, d_bg, d_lnw, d_lnb, layer_grads


class FusedRecurrence(torch.autograd.Function):
    """Drop-in for ``NewLLMRecurrence.apply(x_proj, c0, keep, W_c, W_g, b_g, ln_w, ln_b, p, p_ctx, training,
    *layers)`` -> ``(hs [B, T, H], c_T [B, C])`` for the original cell: one persistent Triton kernel each way."""

    @staticmethod
    def forward(ctx, x_proj: torch.Tensor, c0: torch.Tensor, keep: Optional[torch.Tensor], W_c: torch.Tensor,
                W_g: torch.Tensor, b_g: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, p: float,
                p_ctx: float, training: bool, *layers: torch.Tensor):
        return _run_forward(ctx, x_proj, c0, keep, W_c, None, W_g, b_g, ln_w, ln_b, p, p_ctx, training, "layernorm",
                            False, layers)

    @staticmethod
    def backward(ctx, d_hs: Optional[torch.Tensor], d_c: Optional[torch.Tensor]):
        d_x, d_c0, d_Wc, _, d_Wg, d_bg, d_lnw, d_lnb, layer_grads = _run_backward(ctx, d_hs, d_c)
        return (d_x, d_c0, None, d_Wc, d_Wg, d_bg, d_lnw, d_lnb, None, None, None, *layer_grads)


class FusedOptionRecurrence(torch.autograd.Function):
    """The cell with its options (``state_norm``, ``gate_context``, low-rank gates ``W_v``):
    ``apply(x_proj, c0, keep, W_c, W_v, W_g, b_g, ln_w, ln_b, p, p_ctx, training, state_norm, gate_context,
    *layers)``. ``W_v`` None: full-rank gates; ``ln_w`` / ``ln_b`` None: a norm without affine (or none)."""

    @staticmethod
    def forward(ctx, x_proj, c0, keep, W_c, W_v, W_g, b_g, ln_w, ln_b, p, p_ctx, training, state_norm, gate_context,
                *layers):
        return _run_forward(ctx, x_proj, c0, keep, W_c, W_v, W_g, b_g, ln_w, ln_b, p, p_ctx, training, state_norm,
                            gate_context, layers)

    @staticmethod
    def backward(ctx, d_hs, d_c):
        d_x, d_c0, d_Wc, d_Wv, d_Wg, d_bg, d_lnw, d_lnb, layer_grads = _run_backward(ctx, d_hs, d_c)
        return (d_x, d_c0, None, d_Wc, d_Wv, d_Wg, d_bg, d_lnw, d_lnb, None, None, None, None, None, *layer_grads)


def fused_recurrence(x_proj, c0, keep, W_c, W_g, b_g, ln_w, ln_b, p, p_ctx, training, *layers, W_v=None,
                     state_norm="layernorm", gate_context=False):
    """``NewLLMRecurrence.apply``'s signature with the cell options as keywords (what ``NewLLM.forward``
    passes to a recurrence that has ``implements``)."""
    if W_v is None and state_norm == "layernorm" and not gate_context:
        return FusedRecurrence.apply(x_proj, c0, keep, W_c, W_g, b_g, ln_w, ln_b, p, p_ctx, training, *layers)
    return FusedOptionRecurrence.apply(x_proj, c0, keep, W_c, W_v, W_g, b_g, ln_w, ln_b, p, p_ctx, training,
                                       state_norm, gate_context, *layers)


fused_recurrence.implements = lambda cfg: fused_cell_supported(cfg)[0]


# -- dropout masks, as the kernels draw them (tests rebuild the reference with these) ---------------------------
@triton.jit
def _rand_kernel(seed_ptr, out_ptr, N, W, stream, BR: tl.constexpr, BW: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    n0 = tl.program_id(1) * BW
    cols = n0 + tl.arange(0, BW)
    r = _uniforms(tl.load(seed_ptr) + stream, rows.to(tl.int64), n0, W, BW)
    tl.store(out_ptr + rows[:, None] * W + cols[None, :], r, mask=(rows < N)[:, None] & (cols < W)[None, :])


def kernel_uniforms(seed: torch.Tensor, stream: int, shape: tuple) -> torch.Tensor:
    """The uniforms the kernels compare with p: stream j < L is FNN layer j+1's dropout over [T, B, H],
    stream L the context dropout over [T, B, C]; a unit is kept where the uniform is >= p. The last dimension
    is the draw's width; the ones before it are flattened into its rows."""
    W = shape[-1]
    N = math.prod(shape[:-1])
    out = torch.empty(N * W, dtype=torch.float32, device=seed.device)
    _rand_kernel[(triton.cdiv(N, 16), triton.cdiv(W, 64))](seed, out, N, W, stream, BR=16, BW=64)
    return out.view(shape)


# -- generation: a greedy token is 2 + (L - 1) launches, each split over output columns so that the weights
# stream into many SMs
@triton.jit
def _dec_in_kernel(table_ptr, tok_ptr, pmax_ptr, pidx_ptr, flag_ptr, xs_ptr, ctx_ptr, rd_ptr, lnw_ptr, lnb_ptr,
                   wc_ptr, out_ptr, h_ptr, B, C, H, NV, out_stride, clamp, eps,
                   FROM_HEAD: tl.constexpr, WRITE_OUT: tl.constexpr, NORM_OUT: tl.constexpr, NORM_READ: tl.constexpr,
                   STORE_READ: tl.constexpr, IEEE: tl.constexpr, BB: tl.constexpr,
                   BN: tl.constexpr, BCF: tl.constexpr, BNV: tl.constexpr):
    """Start of a token: its id (FROM_HEAD: the argmax over the previous head launch's per-tile maxima), the
    context c_{t-1} = clamp(LayerNorm(x_{t-1})) (NORM_OUT; else clamp(x_{t-1})), or the given context while
    ``flag`` says it is fresh, what the cell reads r = LayerNorm(c_{t-1}) (NORM_READ; else c_{t-1}), then layer
    1's column tile: relu(table[tok] + W_c r). Every program recomputes the (cheap) norms of its rows, so no
    program waits for another; the first column tile also stores c_{t-1}, r (STORE_READ: the gates read it) and
    the token."""
    pid_n = tl.program_id(0)
    ncol = pid_n * BN + tl.arange(0, BN)
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    rm, nm = rows < B, ncol < H
    fresh = tl.load(flag_ptr) != 0
    tok = tl.load(tok_ptr + rows, mask=rm, other=0)
    if FROM_HEAD:
        vt = tl.arange(0, BNV)
        pm = tl.load(pmax_ptr + vt[:, None] * B + rows[None, :], mask=(vt < NV)[:, None] & rm[None, :],
                     other=float("-inf"))
        best = tl.argmax(pm, 0)  # the first tile holding the row's maximum: torch.argmax's tie rule
        tok = tl.where(fresh, tok, tl.load(pidx_ptr + best * B + rows, mask=rm, other=0))
    tok = tok.to(tl.int64)
    cols = tl.arange(0, BCF)
    cm = cols < C
    m2 = rm[:, None] & cm[None, :]
    x = tl.load(xs_ptr + rows[:, None] * C + cols[None, :], mask=m2, other=0.0)
    lw = tl.load(lnw_ptr + cols, mask=cm, other=0.0)
    lb = tl.load(lnb_ptr + cols, mask=cm, other=0.0)
    if NORM_OUT:
        mean = tl.sum(x, 1) / C
        d = tl.where(m2, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        x = d * rstd[:, None] * lw[None, :] + lb[None, :]
    y = tl.minimum(tl.maximum(x, -clamp), clamp)
    c = tl.where(fresh, tl.load(ctx_ptr + rows[:, None] * C + cols[None, :], mask=m2, other=0.0), y)
    r = c
    if NORM_READ:
        mean = tl.sum(tl.where(m2, c, 0.0), 1) / C
        d = tl.where(m2, c - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        r = d * rstd[:, None] * lw[None, :] + lb[None, :]
    if pid_n == 0:
        tl.store(ctx_ptr + rows[:, None] * C + cols[None, :], c, mask=m2)
        tl.store(tok_ptr + rows, tok, mask=rm)
        if STORE_READ:
            tl.store(rd_ptr + rows[:, None] * C + cols[None, :], r.to(rd_ptr.dtype.element_ty), mask=m2)
        if WRITE_OUT:
            tl.store(out_ptr + rows * out_stride, tok, mask=rm)
    o2 = rm[:, None] & nm[None, :]
    acc = tl.load(table_ptr + tok[:, None] * H + ncol[None, :], mask=o2, other=0.0).to(tl.float32)
    w = tl.load(wc_ptr + ncol[None, :] * C + cols[:, None], mask=cm[:, None] & nm[None, :], other=0.0)
    acc = _mm(r.to(w.dtype), w, acc, IEEE)
    tl.store(h_ptr + rows[:, None] * H + ncol[None, :], tl.maximum(acc, 0.0).to(h_ptr.dtype.element_ty), mask=o2)


@triton.jit
def _dec_proj_kernel(h_ptr, rd_ptr, wv_ptr, out_ptr, B, H, C, R, GIN, GATE_CTX: tl.constexpr, IEEE: tl.constexpr,
                     BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Low-rank gates: out[:, n-tile] = V [h_L ; r] (GATE_CTX; else V h_L), no bias."""
    ncol = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    rm, nm = rows < B, ncol < R
    acc = tl.zeros([BB, BN], tl.float32)
    for k0 in range(0, H, BK):
        kc = k0 + tl.arange(0, BK)
        km = kc < H
        a = tl.load(h_ptr + rows[:, None] * H + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(wv_ptr + ncol[None, :] * GIN + kc[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        acc = _mm(a, w, acc, IEEE)
    if GATE_CTX:
        for k0 in range(0, C, BK):
            kc = k0 + tl.arange(0, BK)
            km = kc < C
            a = tl.load(rd_ptr + rows[:, None] * C + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(wv_ptr + ncol[None, :] * GIN + H + kc[:, None], mask=km[:, None] & nm[None, :], other=0.0)
            acc = _mm(a, w, acc, IEEE)
    tl.store(out_ptr + rows[:, None] * R + ncol[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & nm[None, :])


@triton.jit
def _dec_layer_kernel(a_ptr, w_ptr, b_ptr, out_ptr, B, K, H, IEEE: tl.constexpr,
                      BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[:, n-tile] = relu(b + a @ w^T): FNN layers 2..L of one token."""
    ncol = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    rm, nm = rows < B, ncol < H
    acc = tl.zeros([BB, BN], tl.float32) + tl.load(b_ptr + ncol, mask=nm, other=0.0).to(tl.float32)[None, :]
    for k0 in range(0, K, BK):
        kc = k0 + tl.arange(0, BK)
        km = kc < K
        a = tl.load(a_ptr + rows[:, None] * K + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + ncol[None, :] * K + kc[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        acc = _mm(a, w, acc, IEEE)
    tl.store(out_ptr + rows[:, None] * H + ncol[None, :], tl.maximum(acc, 0.0).to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & nm[None, :])


@triton.jit
def _gate_tile(pid_c, pid_b, a_ptr, rd_ptr, wg_ptr, bg_ptr, ctx_ptr, xs_ptr, flag_ptr, B, C, K, WS,
               READ_CTX: tl.constexpr, IEEE: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """x[:, c-tile] = sigmoid(f) c_{t-1} + sigmoid(i) u from the gate input a [B, K] (h_L, or V [h_L ; r] with
    low-rank gates) and, READ_CTX, r [B, C] (full-rank gates reading the context); W_g's rows are WS wide. The
    LayerNorm (if any) and the clamp run at the start of the next token."""
    cols = pid_c * BC + tl.arange(0, BC)
    rows = pid_b * BB + tl.arange(0, BB)
    rm, cm = rows < B, cols < C
    m2 = rm[:, None] & cm[None, :]
    f, i, u = _gate_bias(bg_ptr, cols, cm, C, BB, BC)
    f, i, u = _gate_dots(f, i, u, a_ptr, rows, rm, K, wg_ptr, WS, cols, cm, C, IEEE, BK)
    if READ_CTX:
        f, i, u = _gate_dots(f, i, u, rd_ptr, rows, rm, C, wg_ptr + K, WS, cols, cm, C, IEEE, BK)
    c = tl.load(ctx_ptr + rows[:, None] * C + cols[None, :], mask=m2, other=0.0)
    tl.store(xs_ptr + rows[:, None] * C + cols[None, :], tl.sigmoid(f) * c + tl.sigmoid(i) * u, mask=m2)
    if pid_c + pid_b == 0:
        tl.store(flag_ptr, 0)  # from now on the context is derived from x


@triton.jit
def _head_tile(pid_v, pid_b, h_ptr, w_ptr, b_ptr, pmax_ptr, pidx_ptr, B, H, V, IEEE: tl.constexpr,
               BB: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """Greedy head: this vocab tile's logits (rounded to the model dtype, as the torch head returns them) and
    each row's maximum and its first index, for the next token's _dec_in_kernel to reduce."""
    vcol = pid_v * BV + tl.arange(0, BV)
    rows = pid_b * BB + tl.arange(0, BB)
    rm, vm = rows < B, vcol < V
    acc = tl.zeros([BB, BV], tl.float32) + tl.load(b_ptr + vcol, mask=vm, other=0.0).to(tl.float32)[None, :]
    for k0 in range(0, H, BK):
        kc = k0 + tl.arange(0, BK)
        km = kc < H
        a = tl.load(h_ptr + rows[:, None] * H + kc[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + vcol[None, :] * H + kc[:, None], mask=km[:, None] & vm[None, :], other=0.0)
        acc = _mm(a, w, acc, IEEE)
    lg = tl.where(vm[None, :], acc.to(h_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
    tl.store(pmax_ptr + pid_v * B + rows, tl.max(lg, 1), mask=rm)
    tl.store(pidx_ptr + pid_v * B + rows, (pid_v * BV + tl.argmax(lg, 1)).to(tl.int64), mask=rm)


@triton.jit
def _dec_gate_kernel(a_ptr, rd_ptr, wg_ptr, bg_ptr, ctx_ptr, xs_ptr, flag_ptr, B, C, K, WS, READ_CTX: tl.constexpr,
                     IEEE: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The gates alone (sampling, or a head that is not one linear map: the head runs in torch)."""
    _gate_tile(tl.program_id(0), tl.program_id(1), a_ptr, rd_ptr, wg_ptr, bg_ptr, ctx_ptr, xs_ptr, flag_ptr, B, C, K,
               WS, READ_CTX, IEEE, BB, BC, BK)


@triton.jit
def _dec_gate_head_kernel(a_ptr, rd_ptr, wg_ptr, bg_ptr, ctx_ptr, xs_ptr, flag_ptr, h_ptr, w_ptr, b_ptr, pmax_ptr,
                          pidx_ptr, B, C, K, WS, H, V, NGATE, READ_CTX: tl.constexpr, IEEE: tl.constexpr,
                          BB: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """Greedy decoding: the gates and the head both read only this token's layer outputs, so one launch runs both,
    the first NGATE programs a gate tile each and the rest a vocab tile each (a launch fewer per token)."""
    pid = tl.program_id(0)
    if pid < NGATE:
        _gate_tile(pid, tl.program_id(1), a_ptr, rd_ptr, wg_ptr, bg_ptr, ctx_ptr, xs_ptr, flag_ptr, B, C, K, WS,
                   READ_CTX, IEEE, BB, BC, BK)
    else:
        _head_tile(pid - NGATE, tl.program_id(1), h_ptr, w_ptr, b_ptr, pmax_ptr, pidx_ptr, B, H, V, IEEE, BB, BV,
                   BK)


def _head_weights(model) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(W [V, H], b) where the head is one linear map of h (an nn.Linear, or a tied head without projection)."""
    head = model.head
    if isinstance(head, torch.nn.Linear) and head.bias is not None:
        return head.weight.detach(), head.bias.detach()
    if getattr(head, "proj", "absent") is None and hasattr(head, "_embed"):
        return head._embed[0].weight.detach(), head.bias.detach()
    return None


def _dec_env(name: str, default: int) -> int:
    """NEWLLM_DEC_<name> if set: tiles a power of two >= 16, warps a power of two <= 16, chunk >= 1."""
    raw = os.environ.get("NEWLLM_DEC_" + name, "")
    if not raw:
        return default
    v = int(raw) if raw.strip().isdigit() else 0
    pow2 = v > 0 and v & (v - 1) == 0
    ok = {"CHUNK": v >= 1, "WARPS": pow2 and v <= 16}.get(name, pow2 and v >= 16)
    if not ok:
        want = {"CHUNK": "an integer >= 1", "WARPS": "a power of two up to 16"}.get(name, "a power of two >= 16")
        raise ValueError(f"NEWLLM_DEC_{name}={raw!r}: must be {want}")
    return v


class FusedCell:
    """The model's single-token update as Triton launches over a batch of ``batch_size`` rows, state on the device.

    ``set_context(c)`` starts from a context; ``cell(tok)`` advances by the tokens ``tok`` [B] and returns the
    last layer's output [B, H] (for the model's head); ``greedy()`` advances by the argmax of the previous head
    launch and runs the head itself (no logits tensor, no argmax kernel); ``context()`` is c_t. The state is
    kept as x_t (LayerNorm's input): the next token's first launch normalizes it, which saves a launch a token.
    Layer 1's embedding half (bias included) is a precomputed vocab x hidden table. Weights are taken at
    construction, in the model's own dtype (generation runs without autocast): rebuild after training."""

    def __init__(self, model, batch_size: int) -> None:
        cfg = model.config
        ok, why = fused_cell_supported(cfg)
        if not ok:
            raise ValueError(why)
        E, C, H = cfg.embed_dim, cfg.context_dim, cfg.hidden_dim
        W1 = model.fnn[0].weight.detach()
        dt, dev = W1.dtype, W1.device
        with torch.no_grad():
            self.table = torch.nn.functional.linear(model.embed.weight.detach(), W1[:, :E],
                                                    model.fnn[0].bias.detach()).contiguous()
        self.Wc = W1[:, E:].contiguous()
        self.layers = [(m.weight.detach().contiguous(), m.bias.detach().contiguous()) for m in model.fnn[1:]]
        self.Wg, self.bg = model.gates.weight.detach().contiguous(), model.gates.bias.detach().contiguous()
        # The cell options: where the norm sits, whether the gates read the context, low-rank gates (V).
        self.Wv = model.gate_down.weight.detach().contiguous() if model.gate_down is not None else None
        self.norm_read, self.norm_out, self.gate_ctx, self.R, self.gin, self.lnw, self.lnb = cell_options(
            cfg.state_norm, cfg.gate_context, self.Wv, model.norm.weight, model.norm.bias, H, C, dev)
        self.rd = torch.zeros(batch_size, C, dtype=dt, device=dev)  # r: what the cell read this token
        self.vs = torch.zeros(batch_size, max(self.R, 1), dtype=dt, device=dev)  # V [h_L ; r]
        hw = _head_weights(model)
        self.head_w, self.head_b = (hw[0].contiguous(), hw[1].contiguous()) if hw is not None else (None, None)
        self.B, self.C, self.H, self.dt = batch_size, C, H, dt
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.ctx = torch.zeros(batch_size, C, dtype=torch.float32, device=dev)
        self.xs = torch.zeros(batch_size, C, dtype=torch.float32, device=dev)
        self.flag = torch.ones(1, dtype=torch.int32, device=dev)
        self.hs = [torch.empty(batch_size, H, dtype=dt, device=dev) for _ in range(1 + len(self.layers))]
        # Small batches: narrow column tiles so that many SMs read the weights at once (a GEMV is bound by how
        # fast the weights stream in, not by FLOPs). NEWLLM_DEC_{BN,BK,BV,WARPS,CHUNK} override the tiles for tuning
        # (benchmarks/decode_tiles.py).
        self.BB = 16 if batch_size <= 16 else 32 if batch_size <= 64 else 64
        self.BN, self.BK, self.BV = _dec_env("BN", 32), _dec_env("BK", 64), _dec_env("BV", 64)
        warps = _dec_env("WARPS", 4)  # checked under the interpreter too, which takes no warps
        self.launch = {} if _INTERPRET else {"num_warps": warps}
        self.V = self.head_w.shape[0] if self.head_w is not None else 0
        self.NV = triton.cdiv(self.V, self.BV)
        self.pmax = torch.zeros(max(self.NV, 1), batch_size, dtype=torch.float32, device=dev)
        self.pidx = torch.zeros(max(self.NV, 1), batch_size, dtype=torch.long, device=dev)
        self.ieee = dt == torch.float32

    def set_context(self, context: torch.Tensor, tok: Optional[torch.Tensor] = None) -> None:
        """Start from ``context`` [B, C] (and, for ``greedy``, the first token ``tok`` [B])."""
        self.ctx.copy_(context)
        if tok is not None:
            self.tok.copy_(tok)
        self.flag.fill_(1)

    def context(self) -> torch.Tensor:
        """c_t after the last token: clamp(LayerNorm(x_t)) (clamp(x_t) without a norm on the way out), or the
        context given to ``set_context``."""
        if int(self.flag) != 0:
            return self.ctx.clone()
        y = torch.nn.functional.layer_norm(self.xs, (self.C,), self.lnw, self.lnb, LN_EPS) if self.norm_out \
            else self.xs
        return y.clamp(-CONTEXT_CLAMP, CONTEXT_CLAMP)

    def _gate_args(self) -> tuple:
        """The gate launch's input, its width and W_g's row stride (low-rank: V [h_L ; r] first, one launch)."""
        if not self.R:
            return self.hs[-1], self.H, self.gin
        grid = (triton.cdiv(self.R, self.BN), triton.cdiv(self.B, self.BB))
        _dec_proj_kernel[grid](self.hs[-1], self.rd, self.Wv, self.vs, self.B, self.H, self.C, self.R, self.gin,
                               GATE_CTX=self.gate_ctx, IEEE=self.ieee, BB=self.BB, BN=self.BN, BK=self.BK,
                               **self.launch)
        return self.vs, self.R, self.R

    def _advance(self, tok: torch.Tensor, out_col: Optional[torch.Tensor], from_head: bool) -> torch.Tensor:
        """Layer 1..L of one token; with ``from_head`` the gates are left to ``greedy``'s combined launch."""
        B, C, H = self.B, self.C, self.H
        nb = triton.cdiv(B, self.BB)
        grid_h = (triton.cdiv(H, self.BN), nb)
        out = out_col if out_col is not None else self.tok
        _dec_in_kernel[grid_h](self.table, tok, self.pmax, self.pidx, self.flag, self.xs, self.ctx, self.rd, self.lnw,
                               self.lnb, self.Wc, out, self.hs[0], B, C, H, self.NV,
                               out.stride(0) if out.dim() else 1, CONTEXT_CLAMP, LN_EPS,
                               FROM_HEAD=from_head, WRITE_OUT=out_col is not None, NORM_OUT=self.norm_out,
                               NORM_READ=self.norm_read, STORE_READ=self.gate_ctx, IEEE=self.ieee, BB=self.BB,
                               BN=self.BN, BCF=max(16, triton.next_power_of_2(C)),
                               BNV=max(2, triton.next_power_of_2(self.NV)), **self.launch)
        for j, (w, b) in enumerate(self.layers):
            _dec_layer_kernel[grid_h](self.hs[j], w, b, self.hs[j + 1], B, H, H, IEEE=self.ieee, BB=self.BB,
                                      BN=self.BN, BK=self.BK, **self.launch)
        if not from_head:
            a, K, WS = self._gate_args()
            _dec_gate_kernel[(triton.cdiv(C, self.BN), nb)](a, self.rd, self.Wg, self.bg, self.ctx, self.xs,
                                                            self.flag, B, C, K, WS,
                                                            READ_CTX=self.gate_ctx and not self.R, IEEE=self.ieee,
                                                            BB=self.BB, BC=self.BN, BK=self.BK, **self.launch)
        return self.hs[-1]

    def __call__(self, tok: torch.Tensor, out_col: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advance by the tokens ``tok`` [B] (int64; written to ``out_col`` too); returns h_N [B, H]."""
        return self._advance(tok, out_col, from_head=False)

    def greedy(self, out_col: Optional[torch.Tensor] = None) -> None:
        """Advance by the current token (``set_context``'s, else the argmax of the last head), written to
        ``out_col``, and run the head for the next one (in the gates' launch). Needs a linear head (see
        ``_head_weights``)."""
        if self.head_w is None:
            raise ValueError("greedy() needs a head that is one linear map (no tied projection)")
        h = self._advance(self.tok, out_col, from_head=True)
        a, K, WS = self._gate_args()
        ngate = triton.cdiv(self.C, self.BN)
        _dec_gate_head_kernel[(ngate + self.NV, triton.cdiv(self.B, self.BB))](
            a, self.rd, self.Wg, self.bg, self.ctx, self.xs, self.flag, h, self.head_w, self.head_b, self.pmax,
            self.pidx, self.B, self.C, K, WS, self.H, self.V, ngate, READ_CTX=self.gate_ctx and not self.R,
            IEEE=self.ieee, BB=self.BB, BC=self.BN, BV=self.BV, BK=self.BK, **self.launch)

    def next_tokens(self) -> torch.Tensor:
        """The argmax of the last ``greedy`` head (what the next ``greedy`` reads), for checks."""
        best = self.pmax.argmax(0)
        return self.pidx.gather(0, best[None]).squeeze(0)


class FusedDecoder(ChunkDecoder):
    """``generate.GraphDecoder`` with the fused cell: ``chunk`` single-token steps captured in one CUDA graph and
    replayed for any number of tokens; device memory is constant (ids leave chunk by chunk into host memory).
    Greedy decoding (temperature 0, linear head) is all Triton: 2 + (L - 1) launches a token (the gates and
    the head share one), the head's argmax reduced inside the next token's first launch. Sampling runs the
    model's head and Gumbel-max in torch.
    ``use_graph=False`` runs the same launches without capture (CPU under Triton's interpreter)."""

    def __init__(self, model, batch_size: int = 1, chunk: Optional[int] = None, temperature: float = 0.0,
                 use_graph: bool = True) -> None:
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"invalid chunk={chunk!r}: must be an integer >= 1 (tokens per graph replay)")
        chunk = chunk or _dec_env("CHUNK", 128)  # tokens per graph replay (128: fastest on an H200)
        self.model, self.B, self.chunk, self.temperature = model.eval(), batch_size, chunk, temperature
        self.cell = FusedCell(model, batch_size)
        self.use_graph = use_graph
        self.fused_head = temperature == 0 and self.cell.head_w is not None
        dev = self.cell.ctx.device
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.out = torch.empty(batch_size, chunk, dtype=torch.long, device=dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    @torch.no_grad()
    def _body(self) -> None:
        if self.fused_head:
            for j in range(self.chunk):
                self.cell.greedy(self.out[:, j])
            return
        t = self.tok
        for j in range(self.chunk):
            lg = self.model.head(self.cell(t, self.out[:, j]))
            t = sample_ids(lg, self.temperature)
        self.tok.copy_(t)

    def _capture(self) -> None:
        saved = self.tok.clone(), self.cell.tok.clone(), self.cell.ctx.clone()
        self.graph = capture_graph(self._body)
        self.tok.copy_(saved[0])
        self.cell.set_context(saved[2], saved[1])

    def _start(self, context: torch.Tensor) -> None:
        self.cell.set_context(context, self.tok)

"""Weight-stationary greedy decoding: ONE cooperative Triton launch decodes a whole chunk of tokens.

``fused.FusedDecoder`` runs 2 + (L - 1) launches a token and every launch streams its weights from L2 again. Here
the grid is one program per SM, launched cooperatively (``launch_cooperative_grid=True``: the driver refuses a grid
that cannot be co-resident instead of letting a barrier hang). Each program loads its slice of every weight once,
keeps it in registers for all the chunk's tokens, and the programs meet at a grid-wide barrier between the phases
of a token that need all of the previous phase's output (the layout of Diamos et al.'s persistent RNNs, with the
matrices split by output rows):

    A    the token: argmax over the head programs' partial maxima; c_{t-1} = clamp(LN(x_{t-1})) (or the context
         given to ``set_context``), r = LN(c_{t-1}) with state_norm "read"; layer 1's rows: relu(table[tok] + W_c r)
    L_j  layer j = 2..L: relu(W_j h_{j-1} + b_j)
    G    the gate rows x = sigmoid(f) c_{t-1} + sigmoid(i) u (low-rank gates: V [h_L ; r] instead), and the head
         rows' logits with their maximum (a tied head with a projection: P h_L instead)
    H    (low-rank gates or a projected tied head only) the gates from V [h_L ; r]; the head from P h_L

so a token is L + 1 barriers (L + 2 with low-rank gates or a projected tied head). Every cell option is covered
(the norm's placement, gates reading the context, low-rank gates, residual and prenorm FNN layers, the tanh
candidate, a LayerNorm per half), and a linear or tied head. Every program recomputes the
cheap per-row work (the LayerNorm of the context, the argmax over the partial maxima) itself, so no phase needs
a barrier of its own for it. Activations between phases go through small global buffers read with ``.cg``
(L2, never a stale L1 line).

The barrier is a counter that every program raises by one (release) and then reads (acquire) until it reaches
``P`` times the barrier's number. Under ``TRITON_INTERPRET=1`` programs run one after another, so a spin barrier
with more than one program would never return: there the same phase functions run one phase per launch
(``persistent=False``: the kernel boundary is the barrier), and the persistent kernel itself runs with one
program (its barrier then counts only itself). Both modes are checked against the reference cell in
tests/test_persistent.py; the cooperative launch itself on a GPU (tests skip without CUDA).

Triton is an optional dependency: import this module only where ``import triton`` works.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..config import CONTEXT_CLAMP, LN_EPS
from .decoding import prime

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Stationary elements per program above which the weights would spill out of registers: the decoder then says so
# and the caller falls back to fused.FusedDecoder.
_MAX_RESIDENT = int(os.environ.get("NEWLLM_PDEC_MAX_RESIDENT", 48 * 1024))
# Defaults of the NEWLLM_PDEC_* knobs, measured on an H200 (benchmarks/RESULTS.md): programs (0: one per SM, at most
# MAX_PROGRAMS), warps a program, the grid barrier (1: all poll the count; 2: the last arrival's flag; 3: counters
# per 16 programs, then the flag).
DEFAULT_PROGRAMS, MAX_PROGRAMS, DEFAULT_WARPS, DEFAULT_BARRIER = 0, 1024, 4, 1


def _p2(n: int) -> int:
    return max(1, triton.next_power_of_2(max(1, n)))


def persistent_supported(cfg) -> tuple[bool, str]:
    """Whether the persistent decode kernel implements ``cfg``'s cell (a New-LLM ``ModelConfig``): every cell
    option (state_norm, gate_context, gate_rank, fnn_residual, context_tanh, slow_forget_bias; chrono_init is
    initialisation only); the string says why not otherwise."""
    if getattr(cfg, "arch", "newllm") != "newllm":
        return False, f"the persistent decode kernel decodes New-LLM, not {cfg.arch}"
    return True, "ok"


def cooperative_launch_available() -> tuple[bool, str]:
    """Whether this Triton can launch a cooperative grid (its CUDA launcher takes ``launch_cooperative_grid``)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception as e:  # no CUDA backend in this Triton
        return False, f"this Triton has no CUDA backend ({type(e).__name__})"
    if "launch_cooperative_grid" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False, f"Triton {triton.__version__} has no cooperative grid launch"
    return True, f"Triton {triton.__version__}"


# -- small pieces ------------------------------------------------------------------------------------------------
@triton.jit
def _tile(ptr, rows, rmask, stride, cols, cmask):
    """ptr[rows, cols] of a row-major matrix with row stride ``stride`` (zeros where masked)."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _gemv(w, a):
    """w [N, K] (weights, any float dtype) times a [K] (fp32) -> [N] fp32."""
    return tl.sum(w.to(tl.float32) * a[None, :], 1)


@triton.jit
def _layer_norm(x, m, w, b, C, eps):
    """LayerNorm of one row x [BC] over its C valid entries (two-pass variance, as torch)."""
    mean = tl.sum(tl.where(m, x, 0.0), 0) / C
    d = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / C + eps)
    return d * rstd * w + b


@triton.jit
def _state_norm(x, cc, m, w, b, C, eps, SLOW: tl.constexpr):
    """The context's LayerNorm of one row: over all C channels, or (SLOW: slow_forget_bias) over each half."""
    if SLOW:
        lo = cc < C // 2
        y_lo = _layer_norm(x, m & lo, w, b, C // 2, eps)
        y_hi = _layer_norm(x, m & (cc >= C // 2), w, b, C - C // 2, eps)
        return tl.where(lo, y_lo, y_hi)
    else:
        return _layer_norm(x, m, w, b, C, eps)


@triton.jit
def _pack_max(value, idx):
    """(fp32 value, index < 2^31) -> an int64 key whose signed order is the value's order, then the smaller index:
    the maximum key over the head programs is the argmax with torch's tie rule, found in one load and one max."""
    bits = value.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: larger magnitude, smaller key
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - idx.to(tl.int64))


@triton.jit
def _unpack_index(key):
    return 0x7FFFFFFF - (key & 0xFFFFFFFF)


@triton.jit
def _grid_sync(bar_ptr, target, spin_limit, P, FLAG: tl.constexpr, GROUP: tl.constexpr):
    """Grid-wide barrier: every program adds one to the counter bar[0] (release: its writes before it are visible
    to whoever acquires the count), then waits until the count reaches ``target`` (P x the barrier's number in
    this launch) and acquires it. FLAG: the program whose arrival completes the count publishes the barrier's
    number in bar[32] (another cache line, release) and the others wait on that line, which then takes no
    read-modify-writes while they poll. GROUP > 0 (with FLAG): programs arrive on a counter per GROUP programs
    (each on its own cache line, bar[128 + 32 g]); the last of a group arrives on bar[0] for it, the last group
    publishes the flag, so no counter takes more than max(GROUP, P / GROUP) serialised arrivals instead of P.
    Needs the whole grid co-resident: the cooperative launch guarantees it or
    refuses. A wait past ``spin_limit`` polls (2^22 by default: seconds; a real one takes microseconds) sets the
    sticky error word bar[1], which releases every later wait at once, so a grid that is somehow not co-resident
    ends with an error the host raises instead of hanging the GPU."""
    tl.debug_barrier()
    err = tl.load(bar_ptr + 1, volatile=True)
    if FLAG:
        number = target // P
        if GROUP > 0:
            g = tl.program_id(0) // GROUP
            groups = (P + GROUP - 1) // GROUP
            size = tl.minimum(P - g * GROUP, GROUP)
            if tl.atomic_add(bar_ptr + 128 + 32 * g, 1, sem="acq_rel", scope="gpu") + 1 == number * size:
                if tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu") + 1 == number * groups:
                    tl.atomic_xchg(bar_ptr + 32, number, sem="release", scope="gpu")
        else:
            if tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu") + 1 == target:
                tl.atomic_xchg(bar_ptr + 32, number, sem="release", scope="gpu")
        seen = tl.load(bar_ptr + 32, volatile=True)
        polls = seen * 0
        while (seen < number) & (err == 0):
            seen = tl.load(bar_ptr + 32, volatile=True)
            polls += 1
            err = tl.load(bar_ptr + 1, volatile=True) | (polls > spin_limit).to(tl.int32)
        if err != 0:
            tl.store(bar_ptr + 1, 1)
        tl.atomic_add(bar_ptr + 32, 0, sem="acquire", scope="gpu")  # synchronizes with the last arrival's release
    else:
        seen = tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu") + 1
        polls = seen * 0
        while (seen < target) & (err == 0):  # plain L2 reads: read-modify-writes would queue behind arrivals
            seen = tl.load(bar_ptr, volatile=True)
            polls += 1
            err = tl.load(bar_ptr + 1, volatile=True) | (polls > spin_limit).to(tl.int32)
        if err != 0:
            tl.store(bar_ptr + 1, 1)
        tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")  # order every later read after the others' writes
    tl.debug_barrier()


# -- the phases: each program computes its rows of one matrix product for every row of the batch ----------------
@triton.jit
def _phase_in(t, fresh, pid, B, C, H, NPH, n_out, clamp, eps,
              tok_ptr, out_ptr, pkey_ptr, xs_ptr, ctx_ptr, rd_ptr, table_ptr, hs_ptr,
              lnw, lnb, wc, ncol, nm, cc, cm,
              NORM_OUT: tl.constexpr, NORM_READ: tl.constexpr, STORE_READ: tl.constexpr, SLOW: tl.constexpr,
              BP: tl.constexpr):
    """A: the token, c_{t-1}, r, and layer 1's rows ncol of relu(table[tok] + W_c r) (wc [BN, BC]). A row's
    partial maxima and x_{t-1} are loaded while the row before it computes."""
    first = fresh & (t == 0)
    pp = tl.arange(0, BP)
    pk = tl.load(pkey_ptr + pp * B, mask=pp < NPH, other=-(2**63), cache_modifier=".cg")
    x = tl.load(xs_ptr + cc, mask=cm, other=0.0, cache_modifier=".cg")
    for b in range(B):
        bn = b + 1 - (b + 1) // B  # the next row (the last row again at the end)
        pk_next = tl.load(pkey_ptr + pp * B + bn, mask=pp < NPH, other=-(2**63), cache_modifier=".cg")
        x_next = tl.load(xs_ptr + bn * C + cc, mask=cm, other=0.0, cache_modifier=".cg")
        tok = _unpack_index(tl.max(pk, 0))  # the largest logit, the first index among equals: torch.argmax's rule
        y = x
        if NORM_OUT:
            y = _state_norm(x, cc, cm, lnw, lnb, C, eps, SLOW)
        c = tl.minimum(tl.maximum(y, -clamp), clamp)
        if first:  # a fresh context: the one set_context gave, and its token
            tok = tl.load(tok_ptr + b)
            c = tl.load(ctx_ptr + b * C + cc, mask=cm, other=0.0, cache_modifier=".cg")
        r = c
        if NORM_READ:
            r = _state_norm(c, cc, cm, lnw, lnb, C, eps, SLOW)
        r = r.to(wc.dtype)
        if pid == 0:
            tl.store(ctx_ptr + b * C + cc, c, mask=cm)
            tl.store(tok_ptr + b, tok)
            tl.store(out_ptr + b * n_out + t, tok)
            if STORE_READ:
                tl.store(rd_ptr + b * C + cc, r, mask=cm)
        acc = tl.load(table_ptr + tok.to(tl.int64) * H + ncol, mask=nm, other=0.0).to(tl.float32)
        acc += _gemv(wc, r.to(tl.float32))
        tl.store(hs_ptr + b * H + ncol, tl.maximum(acc, 0.0).to(hs_ptr.dtype.element_ty), mask=nm)
        pk = pk_next
        x = x_next


@triton.jit
def _phase_layer(j, B, H, LB, eps, hs_ptr, wl, bl, fnw, fnb, ncol, nm, hc, hm, LP: tl.constexpr, RES: tl.constexpr):
    """L_j: rows ncol of layer j (j is 1-based past layer 1): relu(W_j h_{j-1} + b_j), or with RES 1 (residual)
    h_{j-1} + relu(W_j h_{j-1} + b_j), RES 2 (prenorm) h_{j-1} + relu(W_j LN_j(h_{j-1}) + b_j). wl [LP, BN, BH]
    holds this program's rows of every layer 2..L, bl [LP, BN] their biases, fnw / fnb [LP, BH] the prenorm gains.
    A row's input is loaded while the row before it computes."""
    sel = (tl.arange(0, LP) == j - 1)[:, None]
    bias = tl.sum(tl.where(sel, bl.to(tl.float32), 0.0), 0)
    src = hs_ptr + (j - 1) * LB
    if RES == 2:
        gw = tl.sum(tl.where(sel, fnw, 0.0), 0)
        gb = tl.sum(tl.where(sel, fnb, 0.0), 0)
    a = tl.load(src + hc, mask=hm, other=0.0, cache_modifier=".cg").to(tl.float32)
    for b in range(B):
        bn = b + 1 - (b + 1) // B  # the next row (the last row again at the end)
        a_next = tl.load(src + bn * H + hc, mask=hm, other=0.0, cache_modifier=".cg")
        z = a
        if RES == 2:
            z = _layer_norm(a, hm, gw, gb, H, eps).to(hs_ptr.dtype.element_ty).to(tl.float32)
        acc3 = tl.sum(wl.to(tl.float32) * z[None, None, :], 2)  # [LP, BN]: every layer's rows; keep layer j's
        y = tl.maximum(tl.sum(tl.where(sel, acc3, 0.0), 0) + bias, 0.0)
        if RES != 0:
            y += tl.load(src + b * H + ncol, mask=nm, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(hs_ptr + j * LB + b * H + ncol, y.to(hs_ptr.dtype.element_ty), mask=nm)
        a = a_next.to(tl.float32)


@triton.jit
def _gates(b64, C, a, r, ctx_ptr, xs_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm, READ_CTX: tl.constexpr,
           TANH: tl.constexpr):
    """Gate rows gcol for one batch row: x = sigmoid(f) c_{t-1} + sigmoid(i) u (TANH: tanh(u)) from a (h_L, or
    V [h_L ; r]) and, READ_CTX, r."""
    f = bf + _gemv(wf, a)
    i = bi + _gemv(wi, a)
    u = bu + _gemv(wu, a)
    if READ_CTX:
        f += _gemv(wfr, r)
        i += _gemv(wir, r)
        u += _gemv(wur, r)
    if TANH:
        u = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    c = tl.load(ctx_ptr + b64 * C + gcol, mask=gm, other=0.0, cache_modifier=".cg")
    tl.store(xs_ptr + b64 * C + gcol, tl.sigmoid(f) * c + tl.sigmoid(i) * u, mask=gm)


@triton.jit
def _head(pid, b64, B, V, HV, KH, a, dt: tl.constexpr, whead_ptr, hb_ptr, pkey_ptr, wh, hbr, vr, kc, km,
          RESIDENT: tl.constexpr, BV: tl.constexpr):
    """This program's head rows [pid HV, pid HV + HV) for one batch row, from its input a [BKH] (fp32): their
    logits (rounded to the model dtype ``dt``, as the torch head returns them), the maximum and its first index,
    packed into one key of pkey [P, B]."""
    if RESIDENT:
        vm = (vr < HV) & (pid * HV + vr < V)
        lg = tl.where(vm, (hbr.to(tl.float32) + _gemv(wh, a)).to(dt).to(tl.float32), float("-inf"))
        best = tl.max(lg, 0)
        idx = pid * HV + tl.argmax(lg, 0).to(tl.int64)
    else:
        best = tl.full([], float("-inf"), tl.float32)
        idx = tl.full([], 0, tl.int64) + pid * HV
        rows = pid * HV + vr
        vm = (vr < HV) & (rows < V)
        w = _tile(whead_ptr, rows, vm, KH, kc, km)
        hb = tl.load(hb_ptr + rows, mask=vm, other=0.0)
        for v0 in range(0, HV, BV):  # each tile's rows are loaded while the tile before them computes
            rows_next = pid * HV + v0 + BV + vr
            vm_next = (v0 + BV + vr < HV) & (rows_next < V)
            w_next = _tile(whead_ptr, rows_next, vm_next, KH, kc, km)
            hb_next = tl.load(hb_ptr + rows_next, mask=vm_next, other=0.0)
            vm = (v0 + vr < HV) & (pid * HV + v0 + vr < V)
            lg = tl.where(vm, (hb.to(tl.float32) + _gemv(w, a)).to(dt).to(tl.float32), float("-inf"))
            m = tl.max(lg, 0)
            up = m > best  # strictly greater: the first chunk with the maximum keeps it
            idx = tl.where(up, (pid * HV + v0 + tl.argmax(lg, 0)).to(tl.int64), idx)
            best = tl.where(up, m, best)
            w, hb = w_next, hb_next
    tl.store(pkey_ptr + pid * B + b64, _pack_max(best, idx))


# The token count and the phase change from launch to launch (a last launch of the tokens still wanted): not
# specialised on, so they never compile another kernel.
@triton.jit(do_not_specialize=["n_tokens", "phase", "t_step"],
            do_not_specialize_on_alignment=["n_tokens", "phase", "t_step"])
def _decode_kernel(tok_ptr, out_ptr, pkey_ptr, flag_ptr, bar_ptr, xs_ptr, ctx_ptr, rd_ptr, hs_ptr,
                   vs_ptr, z_ptr, table_ptr, wc_ptr, wl_ptr, bl_ptr, wg_ptr, bg_ptr, wv_ptr, wp_ptr, whead_ptr,
                   hb_ptr, lnw_ptr, lnb_ptr, fnw_ptr, fnb_ptr,
                   n_tokens, n_out, phase, t_step, spin_limit,
                   B, C, H, R, E, V, L, NB, GIN, WS, KH, HV, NPH, P, clamp, eps,
                   PERSISTENT: tl.constexpr, NORM_OUT: tl.constexpr, NORM_READ: tl.constexpr,
                   GATE_CTX: tl.constexpr, RANK: tl.constexpr, PROJ: tl.constexpr, HEAD_RESIDENT: tl.constexpr,
                   RES: tl.constexpr, TANH: tl.constexpr, SLOW: tl.constexpr, FLAG: tl.constexpr,
                   GROUP: tl.constexpr,
                   BN: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, LP: tl.constexpr, BG: tl.constexpr,
                   BR: tl.constexpr, BRO: tl.constexpr, BEO: tl.constexpr, BKH: tl.constexpr,
                   BV: tl.constexpr, BP: tl.constexpr):
    """PERSISTENT: decode ``n_tokens`` greedy tokens with a grid barrier between phases (a cooperative launch
    of P programs; NB barriers a token). Else run only phase ``phase`` (0: A, 1..L-1: layer j + 1, L: G, L + 1: H)
    of token ``t_step``, one launch a phase. The weights are loaded once at the start; ``flag`` != 0 says the
    first token reads ``ctx`` and ``tok`` (a fresh context) rather than the state the last launch left."""
    pid = tl.program_id(0)
    dt = wc_ptr.dtype.element_ty
    # -- this program's slices of every weight: loaded here, kept for all tokens ---------------------------------
    cc = tl.arange(0, BC)
    cm = cc < C
    hc = tl.arange(0, BH)
    hm = hc < H
    lnw = tl.load(lnw_ptr + cc, mask=cm, other=0.0)
    lnb = tl.load(lnb_ptr + cc, mask=cm, other=0.0)
    ncol = pid * BN + tl.arange(0, BN)  # layer rows
    nm = ncol < H
    wc = _tile(wc_ptr, ncol, nm, C, cc, cm)
    lp = tl.arange(0, LP)
    lrow = lp[:, None] * H + ncol[None, :]  # [LP, BN] rows of the stacked [L - 1, H, H] layers
    lmask = (lp < L - 1)[:, None] & nm[None, :]
    wl = tl.load(wl_ptr + lrow.to(tl.int64)[:, :, None] * H + hc[None, None, :],
                 mask=lmask[:, :, None] & hm[None, None, :], other=0.0)
    bl = tl.load(bl_ptr + lrow, mask=lmask, other=0.0)
    fmask = ((lp < L - 1) & (RES == 2))[:, None] & hm[None, :]  # the prenorm LayerNorms' gains and shifts
    fnw = tl.load(fnw_ptr + lp[:, None] * H + hc[None, :], mask=fmask, other=0.0)
    fnb = tl.load(fnb_ptr + lp[:, None] * H + hc[None, :], mask=fmask, other=0.0)
    gcol = pid * BG + tl.arange(0, BG)  # gate channels (each a row of W_f, W_i and W_u)
    gm = gcol < C
    bf = tl.load(bg_ptr + gcol, mask=gm, other=0.0).to(tl.float32)
    bi = tl.load(bg_ptr + C + gcol, mask=gm, other=0.0).to(tl.float32)
    bu = tl.load(bg_ptr + 2 * C + gcol, mask=gm, other=0.0).to(tl.float32)
    if RANK:  # U reads V [h_L ; r] (R wide); this program also holds rows vrow of V
        rc = tl.arange(0, BR)
        rcm = rc < R
        wf = _tile(wg_ptr, gcol, gm, WS, rc, rcm)
        wi = _tile(wg_ptr, C + gcol, gm, WS, rc, rcm)
        wu = _tile(wg_ptr, 2 * C + gcol, gm, WS, rc, rcm)
        vrow = pid * BRO + tl.arange(0, BRO)
        vrm = vrow < R
        wvh = _tile(wv_ptr, vrow, vrm, GIN, hc, hm)
        wvr = _tile(wv_ptr + H, vrow, vrm & GATE_CTX, GIN, cc, cm)
    else:
        wf = _tile(wg_ptr, gcol, gm, WS, hc, hm)
        wi = _tile(wg_ptr, C + gcol, gm, WS, hc, hm)
        wu = _tile(wg_ptr, 2 * C + gcol, gm, WS, hc, hm)
    rctx = GATE_CTX and not RANK
    wfr = _tile(wg_ptr + H, gcol, gm & rctx, WS, cc, cm)
    wir = _tile(wg_ptr + H, C + gcol, gm & rctx, WS, cc, cm)
    wur = _tile(wg_ptr + H, 2 * C + gcol, gm & rctx, WS, cc, cm)
    if PROJ:  # tied head with a projection: rows erow of P [E, H]
        erow = pid * BEO + tl.arange(0, BEO)
        erm = erow < E
        wp = _tile(wp_ptr, erow, erm, H, hc, hm)
    kc = tl.arange(0, BKH)
    km = kc < KH
    vr = tl.arange(0, BV)
    if HEAD_RESIDENT:
        hrow = pid * HV + vr
        hvm = (vr < HV) & (hrow < V)
        wh = _tile(whead_ptr, hrow, hvm, KH, kc, km)
        hbr = tl.load(hb_ptr + hrow, mask=hvm, other=0.0)
    else:
        wh = tl.zeros([BV, BKH], dt)
        hbr = tl.zeros([BV], dt)
    a_head = z_ptr if PROJ else hs_ptr + (L - 1) * B * H
    LB = B * H
    fresh = tl.load(flag_ptr) != 0
    if PERSISTENT:
        for t in range(n_tokens):
            _phase_in(t, fresh, pid, B, C, H, NPH, n_out, clamp, eps, tok_ptr, out_ptr, pkey_ptr, xs_ptr,
                      ctx_ptr, rd_ptr, table_ptr, hs_ptr, lnw, lnb, wc, ncol, nm, cc, cm, NORM_OUT, NORM_READ,
                      GATE_CTX, SLOW, BP)
            _grid_sync(bar_ptr, (t * NB + 1) * P, spin_limit, P, FLAG, GROUP)
            for j in range(1, L):
                _phase_layer(j, B, H, LB, eps, hs_ptr, wl, bl, fnw, fnb, ncol, nm, hc, hm, LP, RES)
                _grid_sync(bar_ptr, (t * NB + j + 1) * P, spin_limit, P, FLAG, GROUP)
            _phase_gate(pid, B, C, H, R, E, V, HV, KH, LB, L, hs_ptr, rd_ptr, ctx_ptr, xs_ptr, vs_ptr, z_ptr, a_head,
                        whead_ptr, hb_ptr, pkey_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm,
                        wvh if RANK else wf, wvr if RANK else wfr, vrow if RANK else gcol, vrm if RANK else gm,
                        wp if PROJ else wf, erow if PROJ else gcol, erm if PROJ else gm, wh, hbr, vr, kc, km, hc, hm,
                        cc, cm, GATE_CTX, RANK, PROJ, HEAD_RESIDENT, BV, TANH)
            _grid_sync(bar_ptr, (t * NB + L + 1) * P, spin_limit, P, FLAG, GROUP)
            if RANK or PROJ:
                _phase_late(pid, B, C, R, V, HV, KH, vs_ptr, rd_ptr, ctx_ptr, xs_ptr, a_head, whead_ptr, hb_ptr,
                            pkey_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm, wh, hbr, vr, kc, km,
                            rc if RANK else cc, rcm if RANK else cm, cc, cm, RANK, PROJ, HEAD_RESIDENT, BV, TANH)
                _grid_sync(bar_ptr, (t * NB + L + 2) * P, spin_limit, P, FLAG, GROUP)
    else:
        if phase == 0:
            _phase_in(t_step, fresh, pid, B, C, H, NPH, n_out, clamp, eps, tok_ptr, out_ptr, pkey_ptr, xs_ptr,
                      ctx_ptr, rd_ptr, table_ptr, hs_ptr, lnw, lnb, wc, ncol, nm, cc, cm, NORM_OUT, NORM_READ,
                      GATE_CTX, SLOW, BP)
        elif phase < L:
            _phase_layer(phase, B, H, LB, eps, hs_ptr, wl, bl, fnw, fnb, ncol, nm, hc, hm, LP, RES)
        elif phase == L:
            _phase_gate(pid, B, C, H, R, E, V, HV, KH, LB, L, hs_ptr, rd_ptr, ctx_ptr, xs_ptr, vs_ptr, z_ptr, a_head,
                        whead_ptr, hb_ptr, pkey_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm,
                        wvh if RANK else wf, wvr if RANK else wfr, vrow if RANK else gcol, vrm if RANK else gm,
                        wp if PROJ else wf, erow if PROJ else gcol, erm if PROJ else gm, wh, hbr, vr, kc, km, hc, hm,
                        cc, cm, GATE_CTX, RANK, PROJ, HEAD_RESIDENT, BV, TANH)
        else:
            _phase_late(pid, B, C, R, V, HV, KH, vs_ptr, rd_ptr, ctx_ptr, xs_ptr, a_head, whead_ptr, hb_ptr,
                        pkey_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm, wh, hbr, vr, kc, km,
                        rc if RANK else cc, rcm if RANK else cm, cc, cm, RANK, PROJ, HEAD_RESIDENT, BV, TANH)
    # Every program read the flag before the first barrier passed (one launch a phase: before phase G's launch).
    if pid == 0:
        if PERSISTENT:
            tl.store(flag_ptr, 0)
        elif phase == L:
            tl.store(flag_ptr, 0)


@triton.jit
def _phase_gate(pid, B, C, H, R, E, V, HV, KH, LB, L, hs_ptr, rd_ptr, ctx_ptr, xs_ptr, vs_ptr, z_ptr, a_head,
                whead_ptr, hb_ptr, pkey_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm,
                wvh, wvr, vrow, vrm, wp, erow, erm, wh, hbr, vr, kc, km, hc, hm, cc, cm,
                GATE_CTX: tl.constexpr, RANK: tl.constexpr, PROJ: tl.constexpr, HEAD_RESIDENT: tl.constexpr,
                BV: tl.constexpr, TANH: tl.constexpr):
    """G: everything that reads h_L (and r): the gates (or V [h_L ; r]), and the head (or P h_L). A row's inputs
    are loaded while the row before it computes."""
    dt = hs_ptr.dtype.element_ty
    src = hs_ptr + (L - 1) * LB
    h = tl.load(src + hc, mask=hm, other=0.0, cache_modifier=".cg").to(tl.float32)
    r = tl.load(rd_ptr + cc, mask=cm & GATE_CTX, other=0.0, cache_modifier=".cg").to(tl.float32)
    for b in range(B):
        bn = b + 1 - (b + 1) // B  # the next row (the last row again at the end)
        h_next = tl.load(src + bn * H + hc, mask=hm, other=0.0, cache_modifier=".cg")
        r_next = tl.load(rd_ptr + bn * C + cc, mask=cm & GATE_CTX, other=0.0, cache_modifier=".cg")
        if RANK:
            acc = _gemv(wvh, h)
            if GATE_CTX:
                acc += _gemv(wvr, r)
            tl.store(vs_ptr + b * R + vrow, acc.to(vs_ptr.dtype.element_ty), mask=vrm)
        else:
            _gates(b, C, h, r, ctx_ptr, xs_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm, GATE_CTX, TANH)
        if PROJ:
            tl.store(z_ptr + b * E + erow, _gemv(wp, h).to(z_ptr.dtype.element_ty), mask=erm)
        else:
            _head(pid, b, B, V, HV, KH, h, dt, whead_ptr, hb_ptr, pkey_ptr, wh, hbr, vr, kc, km,
                  HEAD_RESIDENT, BV)
        h = h_next.to(tl.float32)
        r = r_next.to(tl.float32)


@triton.jit
def _phase_late(pid, B, C, R, V, HV, KH, vs_ptr, rd_ptr, ctx_ptr, xs_ptr, a_head, whead_ptr, hb_ptr, pkey_ptr,
                wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm, wh, hbr, vr, kc, km, rc, rcm, cc, cm,
                RANK: tl.constexpr, PROJ: tl.constexpr, HEAD_RESIDENT: tl.constexpr, BV: tl.constexpr,
                TANH: tl.constexpr):
    """H: the gates from V [h_L ; r] (low rank), and the head from P h_L (a projected tied head). A row's inputs
    are loaded while the row before it computes."""
    dt = vs_ptr.dtype.element_ty
    v = tl.load(vs_ptr + rc, mask=rcm & RANK, other=0.0, cache_modifier=".cg").to(tl.float32)
    z = tl.load(a_head + kc, mask=km & PROJ, other=0.0, cache_modifier=".cg").to(tl.float32)
    for b in range(B):
        bn = b + 1 - (b + 1) // B  # the next row (the last row again at the end)
        v_next = tl.load(vs_ptr + bn * R + rc, mask=rcm & RANK, other=0.0, cache_modifier=".cg")
        z_next = tl.load(a_head + bn * KH + kc, mask=km & PROJ, other=0.0, cache_modifier=".cg")
        if RANK:
            _gates(b, C, v, v, ctx_ptr, xs_ptr, wf, wi, wu, wfr, wir, wur, bf, bi, bu, gcol, gm, False, TANH)
        if PROJ:
            _head(pid, b, B, V, HV, KH, z, dt, whead_ptr, hb_ptr, pkey_ptr, wh, hbr, vr, kc, km,
                  HEAD_RESIDENT, BV)
        v = v_next.to(tl.float32)
        z = z_next.to(tl.float32)


# -- the host side ------------------------------------------------------------------------------------------------
def _head_parts(model) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(W [V, K], b [V], P [E, H] or None): logits = W (P h) + b for an nn.Linear head (P None) or a tied head
    (W the embedding, P its projection where hidden != embed)."""
    head = model.head
    if isinstance(head, torch.nn.Linear) and head.bias is not None:
        return head.weight.detach(), head.bias.detach(), None
    if hasattr(head, "_embed") and hasattr(head, "proj"):
        proj = head.proj.weight.detach() if head.proj is not None else None
        return head._embed[0].weight.detach(), head.bias.detach(), proj
    raise ValueError(f"the persistent decoder needs a linear or tied head, not {type(head).__name__}")


def _env(name: str, default: int) -> int:
    raw = os.environ.get("NEWLLM_PDEC_" + name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"NEWLLM_PDEC_{name}={raw!r}: must be an integer >= 1")
    return int(raw)


class PersistentDecoder:
    """Greedy decoding with the weights kept on chip: one cooperative launch of ``programs`` programs (default: one
    per SM) decodes ``chunk`` tokens; device memory is constant (ids leave chunk by chunk into host memory).
    ``persistent=False`` runs the same phases one launch each (what the interpreter can run with many programs).
    ``spin_limit``: polls before a grid barrier gives up and the run raises (default 2^22).
    Weights are taken at construction, in the model's dtype: rebuild after training. Raises ValueError naming
    what it lacks for a model it cannot decode (``persistent_supported``, a head that is not linear, weights too
    large to stay on chip)."""

    def __init__(self, model, batch_size: int = 1, chunk: Optional[int] = None, programs: Optional[int] = None,
                 persistent: Optional[bool] = None, spin_limit: Optional[int] = None) -> None:
        cfg = model.config
        ok, why = persistent_supported(cfg)
        if not ok:
            raise ValueError(why)
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"invalid chunk={chunk!r}: must be an integer >= 1 (tokens per launch)")
        self.model, self.B, self.temperature = model.eval(), batch_size, 0.0
        self.chunk = chunk or _env("CHUNK", 512)
        self.persistent = (not _INTERPRET) if persistent is None else persistent
        W1 = model.fnn[0].weight.detach()
        dt, dev = W1.dtype, W1.device
        if programs is None:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
            programs = _env("PROGRAMS", DEFAULT_PROGRAMS or min(sms, MAX_PROGRAMS))
        P = programs
        self.spin_limit = spin_limit or 1 << 22  # polls before a barrier gives up (see _grid_sync)
        if self.persistent and _INTERPRET and P != 1 and spin_limit is None:
            raise ValueError("under TRITON_INTERPRET=1 the persistent kernel runs with one program (programs run one "
                             "after another, so a grid barrier would wait forever); use persistent=False")
        W_proj = self._take_weights(model)
        self._choose_tiles(cfg, P, W_proj is not None)
        self.launch = {} if _INTERPRET else {"num_warps": _env("WARPS", DEFAULT_WARPS)}
        self._allocate(batch_size, cfg, dt, dev, W_proj is not None)
        self.kernel_info: Optional[dict] = None  # registers, spills, programs an SM holds (after the first launch)

    def _take_weights(self, model) -> Optional[torch.Tensor]:
        """Every matrix and vector the kernel reads, contiguous, in the model's dtype (norms in fp32); returns the
        tied head's projection (None without one)."""
        cfg = model.config
        E, C, L = cfg.embed_dim, cfg.context_dim, cfg.num_layers
        W1 = model.fnn[0].weight.detach()
        dt, dev = W1.dtype, W1.device
        W_head, b_head, W_proj = _head_parts(model)
        with torch.no_grad():
            self.table = _embed_table(model.embed.weight.detach(), W1[:, :E], model.fnn[0].bias.detach())
        self.Wc = W1[:, E:].contiguous()
        one = torch.zeros(1, dtype=dt, device=dev)
        if L > 1:
            self.Wl = torch.stack([m.weight.detach() for m in model.fnn[1:]]).contiguous()
            self.bl = torch.stack([m.bias.detach() for m in model.fnn[1:]]).contiguous()
        else:
            self.Wl = self.bl = one
        self.Wg, self.bg = model.gates.weight.detach().contiguous(), model.gates.bias.detach().contiguous()
        self.Wv = model.gate_down.weight.detach().contiguous() if model.gate_down is not None else one
        self.Wp = W_proj.contiguous() if W_proj is not None else one
        self.Wh, self.bh = W_head.contiguous(), b_head.contiguous()
        if model.fnn_norms is not None:  # prenorm FNN layers 2..L
            self.fnw = torch.stack([n.weight.detach().float() for n in model.fnn_norms]).contiguous()
            self.fnb = torch.stack([n.bias.detach().float() for n in model.fnn_norms]).contiguous()
        else:
            self.fnw = self.fnb = torch.zeros(1, device=dev)
        affine = model.norm.weight is not None
        self.lnw = model.norm.weight.detach().float().contiguous() if affine else torch.ones(C, device=dev)
        self.lnb = model.norm.bias.detach().float().contiguous() if affine else torch.zeros(C, device=dev)
        return W_proj

    def _choose_tiles(self, cfg, P: int, proj: bool) -> None:
        """Block sizes for ``P`` programs, whether the head stays on chip, the weights a program holds (refused
        past what stays on chip) and the kernel's sizes and flags."""
        E, C, H, V, L = cfg.embed_dim, cfg.context_dim, cfg.hidden_dim, cfg.vocab_size, cfg.num_layers
        R = cfg.gate_rank
        GIN = H + C if cfg.gate_context else H
        KH = E if proj else H
        HV = triton.cdiv(V, P)
        blocks = dict(BN=_p2(triton.cdiv(H, P)), BC=_p2(C), BH=_p2(H), LP=_p2(L - 1), BG=_p2(triton.cdiv(C, P)),
                      BR=_p2(R), BRO=_p2(triton.cdiv(R, P)) if R else 1,
                      BEO=_p2(triton.cdiv(E, P)) if proj else 1, BKH=_p2(KH))
        resident = _p2(HV) * blocks["BKH"] <= _env("HEAD_RESIDENT", 8192)
        # A head kept on chip is one tile of all its rows; else it is read in tiles of at most HEAD_CHUNK elements.
        blocks["BV"] = _p2(HV) if resident else min(_p2(HV), _p2(max(1, _env("HEAD_CHUNK", 4096) // blocks["BKH"])))
        b = blocks
        self.resident_elements = (b["BN"] * b["BC"] + b["LP"] * b["BN"] * b["BH"] * (L > 1)
                                  + 3 * b["BG"] * (b["BR"] if R else b["BH"])
                                  + 3 * b["BG"] * b["BC"] * (cfg.gate_context and not R)
                                  + (b["BRO"] * (b["BH"] + b["BC"] * cfg.gate_context) if R else 0)
                                  + b["BEO"] * b["BH"] * proj + b["BV"] * b["BKH"] * resident)
        if self.persistent and not _INTERPRET and self.resident_elements > _MAX_RESIDENT:
            raise ValueError(f"{self.resident_elements} weights per program with {P} programs: more than stay on chip "
                             f"(NEWLLM_PDEC_MAX_RESIDENT={_MAX_RESIDENT})")
        NPH = triton.cdiv(V, HV)
        self.P, self.L, self.NB = P, L, L + 1 + (1 if (R or proj) else 0)
        self.sizes = (C, H, R, E, V, L, self.NB, GIN, R or GIN, KH, HV, NPH, P)
        self.flags = dict(NORM_OUT=cfg.state_norm in ("layernorm", "noaffine"), NORM_READ=cfg.state_norm == "read",
                          GATE_CTX=bool(cfg.gate_context), RANK=R > 0, PROJ=proj, HEAD_RESIDENT=resident,
                          RES=("none", "residual", "prenorm").index(cfg.fnn_residual), TANH=bool(cfg.context_tanh),
                          SLOW=bool(cfg.slow_forget_bias), FLAG=_env("BARRIER", DEFAULT_BARRIER) >= 2,
                          GROUP=16 if _env("BARRIER", DEFAULT_BARRIER) == 3 else 0,
                          BP=_p2(NPH), **blocks)

    def _allocate(self, B: int, cfg, dt: torch.dtype, dev: torch.device, proj: bool) -> None:
        """The buffers the kernel reads and writes between tokens and phases, for ``B`` rows."""
        C, H, R, E, L = cfg.context_dim, cfg.hidden_dim, cfg.gate_rank, cfg.embed_dim, cfg.num_layers
        P = self.P
        self.cur = torch.zeros(B, dtype=torch.long, device=dev)  # the kernel's current token
        self.out = torch.zeros(B, self.chunk, dtype=torch.long, device=dev)
        self.pkey = torch.zeros(P, B, dtype=torch.long, device=dev)  # each head program's packed (max, index)
        self.flag = torch.ones(1, dtype=torch.int32, device=dev)
        # The barrier's count [0], its sticky error word [1], (FLAG) its release flag [32] and (GROUP) the group
        # counters [128 + 32 g], a cache line apart.
        self.bar = torch.zeros(128 + 32 * triton.cdiv(P, 16), dtype=torch.int32, device=dev)
        self.xs = torch.zeros(B, C, dtype=torch.float32, device=dev)
        self.ctx = torch.zeros(B, C, dtype=torch.float32, device=dev)
        self.rd = torch.zeros(B, C, dtype=dt, device=dev)
        self.hs = torch.zeros(L, B, H, dtype=dt, device=dev)
        self.vs = torch.zeros(B, max(R, 1), dtype=dt, device=dev)
        self.z = torch.zeros(B, E if proj else 1, dtype=dt, device=dev)
        self.C, self.norm_out, self.slow = C, self.flags["NORM_OUT"], bool(cfg.slow_forget_bias)

    def set_context(self, context: torch.Tensor, tok: torch.Tensor) -> None:
        """Start from ``context`` [B, C] with ``tok`` [B] the next token."""
        self.ctx.copy_(context)
        self.cur.copy_(tok)
        self.flag.fill_(1)

    def context(self) -> torch.Tensor:
        """c_t after the last token the kernel read (the context given to ``set_context`` before any)."""
        if int(self.flag) != 0:
            return self.ctx.clone()
        y = self.xs
        if self.norm_out:
            halves = 2 if self.slow else 1  # slow_forget_bias: each half on its own
            z = y.unflatten(-1, (halves, self.C // halves))
            y = torch.nn.functional.layer_norm(z, (self.C // halves,), eps=LN_EPS).flatten(-2) * self.lnw + self.lnb
        return y.clamp(-CONTEXT_CLAMP, CONTEXT_CLAMP)

    def _args(self, n_tokens: int, phase: int = 0, t_step: int = 0) -> tuple:
        return (self.cur, self.out, self.pkey, self.flag, self.bar, self.xs, self.ctx, self.rd, self.hs,
                self.vs, self.z, self.table, self.Wc, self.Wl, self.bl, self.Wg, self.bg, self.Wv, self.Wp, self.Wh,
                self.bh, self.lnw, self.lnb, self.fnw, self.fnb, n_tokens, self.chunk, phase, t_step, self.spin_limit,
                self.B, *self.sizes,
                CONTEXT_CLAMP, LN_EPS)

    def _launch(self, n_tokens: int, phase: int = 0, t_step: int = 0) -> None:
        extra = dict(self.launch)
        if self.persistent and not _INTERPRET:
            extra["launch_cooperative_grid"] = True
            if self.kernel_info is None:
                self._check_coresident(extra)
        _decode_kernel[(self.P,)](*self._args(n_tokens, phase, t_step), PERSISTENT=self.persistent, **self.flags,
                                  **extra)

    def _check_coresident(self, extra: dict) -> None:
        """Compile, then refuse (RuntimeError) a grid the GPU cannot hold at once, before any program spins: the
        occupancy bound from the kernel's registers, shared memory and warps (the driver checks it again)."""
        k = _decode_kernel.warmup(*self._args(1), grid=(self.P,), PERSISTENT=True, **self.flags, **extra)
        if hasattr(k, "_init_handles"):
            k._init_handles()  # loads the binary: n_regs and n_spills are known from here
        props = torch.cuda.get_device_properties(self.out.device)
        warps = extra.get("num_warps", 4)
        regs = max(1, int(getattr(k, "n_regs", 0) or 0))
        per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
        shared = int(getattr(k.metadata, "shared", 0) or 0)
        fit = min(getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * warps),
                  getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps),
                  getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // shared if shared else 32)
        self.kernel_info = {"registers": regs, "spills": int(getattr(k, "n_spills", 0) or 0), "shared": shared,
                            "programs_per_sm": fit}
        if self.P > fit * props.multi_processor_count:
            raise RuntimeError(f"a grid of {self.P} programs cannot be co-resident on this GPU (at most "
                               f"{fit * props.multi_processor_count}: {regs} registers a thread, {warps} warps)")

    @torch.no_grad()
    def _decode(self, n: int) -> None:
        """``n`` (<= chunk) greedy tokens into ``out[:, :n]``: one cooperative launch, or (``persistent=False``)
        one launch a phase."""
        if self.persistent:
            self.bar[::32].zero_()  # the counts and the flag
            self._launch(n)
            return
        phases = self.L + 1 + (self.NB > self.L + 1)
        for t in range(n):
            for ph in range(phases):
                self._launch(1, ph, t)

    @torch.no_grad()
    def run(self, prompt_ids: torch.Tensor, max_new_tokens: int, seed: int = 0) -> torch.Tensor:
        """Greedy token ids [B, max_new_tokens] on the CPU after ``prompt_ids`` [B, T] (T >= 1), as
        ``ChunkDecoder.run`` (``seed`` is unused: greedy draws nothing); the last launch decodes only the tokens
        still wanted. The prompt's last token is the kernel's first input (out[:, 0], dropped), so a one-token
        prompt costs no launch of the model's own."""
        ids = prompt_ids.to(self.out.device)
        if ids.shape[1] > 1:
            _, ctx = prime(self.model, ids[:, :-1])
        else:
            ctx = self.model.init_context(self.B)
        self.set_context(ctx, ids[:, -1])
        cuda = self.out.device.type == "cuda"
        total = max_new_tokens + 1
        out = torch.empty(self.B, total, dtype=torch.long, pin_memory=cuda)
        for i in range(0, total, self.chunk):
            n = min(self.chunk, total - i)
            self._decode(n)
            out[:, i:i + n].copy_(self.out[:, :n], non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        if int(self.bar[1]) != 0:
            raise RuntimeError("the persistent decoder's grid barrier timed out (the grid was not co-resident): its "
                               "tokens are not valid")
        return out[:, 1:].clone()


def _embed_table(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Layer 1's embedding half for every vocabulary entry, bias included: the table phase A reads."""
    return torch.nn.functional.linear(x, w, b).contiguous()

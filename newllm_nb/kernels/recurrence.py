"""The New-LLM recurrence with a hand-written backward pass (truncated BPTT), for the GPU fast path.

Autograd differentiates the time loop step by step: for every token it runs a small weight-gradient
matmul per weight and adds it into the gradient. Here the backward loop computes only what must be
sequential (gradients w.r.t. activations and the carried context) and stores the per-step
pre-activation gradients; each weight gradient is then **one** large matmul over all B·T positions.
Same function as ``NewLLM.forward`` (tests compare outputs and gradients with autograd).

Per step (FNN layers j = 1..N, dropout p in training, context dropout mask M_c):
    a_1 = x_proj_t + W_c (M_c ⊙ c_{t-1})        h_j = D_j ⊙ a_j,  D_j = 1[a_j > 0] ⊙ dropout mask / (1 - p)
    a_j = W_j h_{j-1} + b_j             g = W_g h_N + b_g = [f | i | u]
    x = σ(f) ⊙ c_{t-1} + σ(i) ⊙ u      c_t = clamp(LayerNorm(x), -10, 10)
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import CONTEXT_CLAMP, LN_EPS
from . import workspace
from .linear import Matmul


class Dropout:
    """The FNN's dropout masks, scaled (each unit 0 or 1 / (1 - q), q the fraction dropped), for the L layers of
    ``steps`` time steps: ``dropout(t)`` is step t's [L, B, H]. On CPU each unit's draw is 16 bits of a 64-bit one
    (four units a draw: half the time of ``bernoulli_``'s, which draws one MT19937 number a unit), a unit drops
    with probability q = p rounded to a multiple of 1/65536 (|q - p| <= 2^-17), and the draws for ``chunk`` steps
    are made at once (a few large ops instead of some per layer and step, in the same order: the same masks as
    one step at a time, unless something else draws between the steps); off CPU (or H not a multiple of 4) q = p,
    by ``bernoulli_`` per layer and step, the draws ``nn.Dropout`` makes."""

    def __init__(self, steps: int, layers: int, rows: int, H: int, p: float, dtype: torch.dtype,
                 device: torch.device, chunk: int = 16) -> None:
        self.bits = device.type == "cpu" and H % 4 == 0
        self.steps, self.chunk = steps, min(chunk, steps) if self.bits else 1
        self.masks = workspace.empty("dropout", (self.chunk, layers, rows, H), dtype, device)
        if self.bits:
            self.threshold = -32768 + round(p * 65536)
            self.draw = workspace.empty("dropout_bits", (self.chunk, layers, rows, H // 4), torch.int64, device)
            p = round(p * 65536) / 65536
        self.p, self.scale = p, 1 / (1 - p)

    def __call__(self, t: int) -> torch.Tensor:
        k = t % self.chunk
        if k == 0:
            self._draw(min(self.chunk, self.steps - t))
        return self.masks[k]

    def _draw(self, n: int) -> None:
        if self.bits:
            kept = self.draw[:n].random_(-2**63, None).view(torch.int16) >= self.threshold
            torch.mul(kept, self.scale, out=self.masks[:n])
        else:
            for m in self.masks[0]:
                m.bernoulli_(1 - self.p).mul_(self.scale)


class NewLLMRecurrence(torch.autograd.Function):
    """Few ops per step (a CPU step is bound by them as much as by the matmuls): results written into their
    saved buffers (``out=``, in place), LayerNorm forward and backward one op each, and whatever does not depend
    on the carried gradient (x-hat, the clamp mask, the gate derivatives) computed for all steps at once outside
    the loops. The kept FNN units are exactly those with a stored output > 0. On CPU the per-step products take
    their weights prepacked (``Matmul.pack``) and the big buffers are kept from one call to the next
    (``workspace``)."""

    @staticmethod
    def forward(ctx, x_proj: torch.Tensor, c0: torch.Tensor, keep: Optional[torch.Tensor], W_c: torch.Tensor,
                W_g: torch.Tensor, b_g: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, p: float,
                p_ctx: float, training: bool, *layers: torch.Tensor):
        B, T, H = x_proj.shape
        C = c0.shape[1]
        dt = x_proj.dtype  # matmul dtype: bf16 / fp16 under autocast, else fp32
        f32 = torch.float32
        dev = x_proj.device
        mm = Matmul(dev, dt)
        Wc, Wg, bg = W_c.to(dt), W_g.to(dt), b_g.to(dt)
        Ws = [(layers[k].to(dt), layers[k + 1].to(dt)) for k in range(0, len(layers), 2)]
        packed = [(mm.pack(Wc, B), None)] + [(mm.pack(w, B), b) for w, b in Ws]
        packed_g = mm.pack(Wg, B)
        L = 1 + len(Ws)
        XP = _time_major("XP", x_proj, mm)  # [T, B, H]: step t's rows
        Hs = workspace.empty("Hs", (L, T, B, H), dt, dev)  # layer outputs (after ReLU and dropout)
        Cin = workspace.empty("Cin", (T, B, C), f32, dev)  # c_{t-1} after resets
        G = workspace.empty("G", (T, B, 3 * C), f32, dev)  # [sigmoid(f) | sigmoid(i) | u]
        X = workspace.empty("X", (T, B, C), f32, dev)  # LayerNorm's input (its mean and rstd: backward computes them)
        c = c0.float()
        drop = training and p > 0
        ctx_drop = training and p_ctx > 0  # dropout on the context path into layer 1 (not on the gate product)
        MC = workspace.empty("MC", (T, B, C), f32, dev) if ctx_drop else None
        # The context path's masks are drawn step by step: the FNN's then are too, so both keep their order.
        dropout = Dropout(T, L, B, H, p, dt, dev, chunk=1 if ctx_drop else 16) if drop else None
        # Every step's views made up front (a list each, one call): indexing in the loop costs more than its ops.
        cin, xp, gates, xs = Cin.unbind(0), XP.unbind(0), G.unbind(0), X.unbind(0)
        sig_fi, sig_f, sig_i, u = (G[..., a:b].unbind(0) for a, b in ((0, 2 * C), (0, C), (C, 2 * C), (2 * C, 3 * C)))
        hs = [Hs[j].unbind(0) for j in range(L)]
        no_masks = [None] * L
        for t in range(T):
            if keep is not None:
                c = torch.mul(c, keep[:, t], out=cin[t])
            else:
                c = cin[t].copy_(c)
            if ctx_drop:
                h = (c * MC[t].bernoulli_(1 - p_ctx).div_(1 - p_ctx)).to(dt)
            else:
                h = c.to(dt)
            masks = dropout(t) if drop else no_masks
            for j, (w, b) in enumerate(packed):
                h = mm(h, w, xp[t] if j == 0 else b, relu=True, out=hs[j][t], mask=masks[j])
            mm(h, packed_g, bg, out=gates[t])
            sig_fi[t].sigmoid_()
            x = torch.mul(sig_f[t], c, out=xs[t]).addcmul_(sig_i[t], u[t])
            c = torch.native_layer_norm(x, (C,), ln_w, ln_b, LN_EPS)[0].clamp_(-CONTEXT_CLAMP, CONTEXT_CLAMP)
        ctx.save_for_backward(keep if keep is not None else torch.empty(0, device=dev),
                              MC if ctx_drop else torch.empty(0, device=dev), Wc, Wg, ln_w, ln_b,
                              Hs, Cin, G, X, *[w for w, _ in Ws])
        ctx.ctx_drop, ctx.scale = ctx_drop, dropout.scale if drop else 1.0
        ctx.has_keep, ctx.dtypes = keep is not None, (c0.dtype, W_c.dtype)
        return Hs[L - 1].transpose(0, 1), c

    @staticmethod
    def backward(ctx, d_hs: torch.Tensor, d_c: Optional[torch.Tensor]):
        keep, MC, Wc, Wg, ln_w, ln_b, Hs, Cin, G, X, *Ws = ctx.saved_tensors
        L, T, B, H = Hs.shape
        C = Cin.shape[-1]
        dt, dev, s = Hs.dtype, Hs.device, ctx.scale
        mm = Matmul(dev, dt)
        dHL = _time_major("dHL", d_hs.to(dt), mm) if d_hs is not None else None
        dc = d_c.float() if d_c is not None else torch.zeros(B, C, device=dev)
        # LayerNorm's mean and rstd of every step at once: the same numbers (per row) as the forward's.
        _, MU, RS = torch.native_layer_norm(X, (C,), ln_w, ln_b, LN_EPS)
        XH = _x_hat(X, MU, RS)
        YM, GG, SF = _gradient_factors(G, XH, Cin, ln_w, ln_b)
        dG = workspace.empty("dG", (T, B, 3 * C), dt, dev)
        # Each layer's pre-activation gradient: relu' x dropout = s 1[h > 0] (kept units are those with output > 0),
        # s the dropout scale (1 without dropout).
        dA = workspace.empty("dA", (L, T, B, H), dt, dev)
        DY = workspace.empty("DY", (T, B, C), torch.float32, dev)
        no_affine_grads = [True, False, False]
        # x @ w.T: the activation gradients take the weights transposed (packed for oneDNN).
        WgT = mm.pack(Wg.t(), B)
        WT = [mm.pack(w.t(), B) for w in [Wc, *Ws]]
        # Every step's views made up front, as in the forward.
        ym, xs, mu, rs, gg, dys, sf = (a.unbind(0) for a in (YM, X, MU, RS, GG, DY, SF))
        dgs, dhl = dG.view(T, B, 3, C).unbind(0), dHL.unbind(0) if dHL is not None else [None] * T
        hs, das = [Hs[j].unbind(0) for j in range(L)], [dA[j].unbind(0) for j in range(L)]
        threshold_backward = torch.ops.aten.threshold_backward.grad_input
        for t in range(T - 1, -1, -1):
            dy = torch.mul(dc, ym[t], out=dys[t])
            dx = torch.ops.aten.native_layer_norm_backward(dy, xs[t], [C], mu[t], rs[t], ln_w, ln_b,
                                                           no_affine_grads)[0]
            dg = torch.mul(dx.unsqueeze(1), gg[t], out=dgs[t]).view(B, 3 * C)
            dh = mm(dg, WgT, dhl[t])
            for j in range(L - 1, -1, -1):
                dh = threshold_backward(dh, hs[j][t], 0, grad_input=das[j][t])
                dh = dh.mul_(s) if s != 1 else dh
                dh = mm(dh, WT[j])
            d_in = dh.float()
            if ctx.ctx_drop:
                d_in = d_in.mul_(MC[t])
            dc = d_in.addcmul_(dx, sf[t])
            if ctx.has_keep:
                dc = dc.mul_(keep[:, t])
        d_Wc, d_Wg, d_bg, layer_grads = _weight_grads(mm, dG, dA, Hs, Cin, MC if ctx.ctx_drop else None)
        d_lnw = (DY * XH).sum((0, 1))
        d_lnb = DY.sum((0, 1))
        d_x = workspace.empty("dX", (B, T, H), dt, dev).copy_(dA[0].transpose(0, 1))  # the layout x_proj has
        return (d_x, dc.to(ctx.dtypes[0]), None, d_Wc, d_Wg, d_bg, d_lnw, d_lnb, None, None, None, *layer_grads)


def _time_major(name: str, a: torch.Tensor, mm: Matmul) -> torch.Tensor:
    """[B, T, N] as [T, B, N]: a view, or for oneDNN (which adds step t's rows) a contiguous copy."""
    at = a.transpose(0, 1)
    return workspace.empty(name, at.shape, a.dtype, a.device).copy_(at) if mm.op is not None else at


def _x_hat(X: torch.Tensor, MU: torch.Tensor, RS: torch.Tensor) -> torch.Tensor:
    """LayerNorm's normalised input (x - mu) * rstd at every step, in a kept buffer."""
    return torch.sub(X, MU, out=workspace.empty("XH", X.shape, X.dtype, X.device)).mul_(RS)


def _gradient_factors(G: torch.Tensor, XH: torch.Tensor, Cin: torch.Tensor, ln_w: torch.Tensor,
                      ln_b: torch.Tensor) -> tuple:
    """What the backward loop multiplies the carried gradient by, for all steps at once: the clamp's pass mask YM
    (1 where y = LN(x) was not clamped); GG [T, B, 3, C] = [sigma'(f) c_{t-1} | sigma'(i) u | sigma(i)], the gate
    pre-activations' gradients over x's; and sigma(f), x's over c_{t-1}'s."""
    T, B, C = Cin.shape
    SF, SI, U = G[..., :C], G[..., C:2 * C], G[..., 2 * C:]
    YM = torch.mul(XH, ln_w, out=workspace.empty("YM", Cin.shape, Cin.dtype, Cin.device))
    YM = YM.add_(ln_b).abs_().le_(CONTEXT_CLAMP)
    GG = workspace.empty("GG", (T, B, 3, C), Cin.dtype, Cin.device)
    torch.addcmul(SF, SF, SF, value=-1, out=GG[:, :, 0]).mul_(Cin)  # sigma (1 - sigma) c
    torch.addcmul(SI, SI, SI, value=-1, out=GG[:, :, 1]).mul_(U)
    GG[:, :, 2] = SI
    return YM, GG, SF


def _weight_grads(mm: Matmul, dG: torch.Tensor, dA: torch.Tensor, Hs: torch.Tensor, Cin: torch.Tensor,
                  MC: Optional[torch.Tensor]) -> tuple:
    """Every weight's gradient as one product over all T*B positions."""
    L, H, C = Hs.shape[0], Hs.shape[-1], Cin.shape[-1]
    dt = Hs.dtype
    flatG, flatA, flatH = dG.reshape(-1, 3 * C), dA.reshape(L, -1, H), Hs.reshape(L, -1, H)
    d_Wg = mm.weight_grad(flatG, flatH[L - 1]).float()
    d_bg = flatG.sum(0, dtype=torch.float32)  # summed in fp32 as read: no fp32 copy of a half-precision gradient
    c_in = Cin * MC if MC is not None else Cin  # what layer 1 actually read
    d_Wc = mm.weight_grad(flatA[0], c_in.reshape(-1, C).to(dt)).float()
    layer_grads = []
    for j in range(1, L):
        layer_grads += [mm.weight_grad(flatA[j], flatH[j - 1]).float(), flatA[j].sum(0, dtype=torch.float32)]
    return d_Wc, d_Wg, d_bg, layer_grads

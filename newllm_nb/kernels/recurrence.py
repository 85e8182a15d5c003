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
from .linear import Matmul


class Dropout:
    """In-place dropout of one step's [B, H] units, ``p`` the fraction dropped. On CPU each unit's draw is 16 bits
    of a 64-bit one (four units a draw: half the time of ``bernoulli_``'s, which draws one MT19937 number a unit), so
    a unit drops with probability q = p rounded to a multiple of 1/65536 (|q - p| <= 2^-17); elsewhere q = p, by
    ``bernoulli_``. Kept units are scaled by 1 / (1 - q)."""

    def __init__(self, shape: tuple, p: float, dtype: torch.dtype, device: torch.device) -> None:
        self.bits = device.type == "cpu" and shape[-1] % 4 == 0
        if self.bits:
            self.threshold = -32768 + round(p * 65536)
            self.draw = torch.empty(*shape[:-1], shape[-1] // 4, dtype=torch.int64, device=device)
            p = round(p * 65536) / 65536
        else:
            self.mask = torch.empty(shape, dtype=dtype, device=device)
        self.p, self.scale = p, 1 / (1 - p)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        if self.bits:
            dropped = self.draw.random_(-2**63, None).view(torch.int16) < self.threshold
            return a.masked_fill_(dropped, 0).mul_(self.scale)
        return a.mul_(self.mask.bernoulli_(1 - self.p)).mul_(self.scale)


class NewLLMRecurrence(torch.autograd.Function):
    """Few ops per step (a CPU step is bound by them as much as by the matmuls): results written into their
    saved buffers (``out=``, in place), LayerNorm forward and backward one op each, and whatever does not depend
    on the carried gradient (x-hat, the clamp mask, relu' x dropout scale, the gate derivatives) computed for all
    steps at once outside the loops. The kept FNN units are exactly those with a stored output > 0."""

    @staticmethod
    def forward(ctx, x_proj: torch.Tensor, c0: torch.Tensor, keep: Optional[torch.Tensor], W_c: torch.Tensor,
                W_g: torch.Tensor, b_g: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, p: float,
                p_ctx: float, training: bool, *layers: torch.Tensor):
        B, T, H = x_proj.shape
        C = c0.shape[1]
        dt = x_proj.dtype  # matmul dtype: bf16 / fp16 under autocast, else fp32
        f32 = torch.float32
        Wc, Wg, bg = W_c.to(dt).contiguous(), W_g.to(dt), b_g.to(dt)  # W_c is a column slice: oneDNN wants it dense
        Ws = [(layers[k].to(dt), layers[k + 1].to(dt)) for k in range(0, len(layers), 2)]
        L = 1 + len(Ws)
        dev = x_proj.device
        mm = Matmul(dev, dt)
        XP = x_proj.transpose(0, 1)  # [T, B, H]: step t's rows (contiguous for oneDNN, which adds them)
        XP = XP.contiguous() if mm.op is not None else XP
        Hs = torch.empty(L, T, B, H, dtype=dt, device=dev)  # layer outputs (after ReLU and dropout)
        Cin = torch.empty(T, B, C, dtype=f32, device=dev)  # c_{t-1} after resets
        G = torch.empty(T, B, 3 * C, dtype=f32, device=dev)  # [sigmoid(f) | sigmoid(i) | u]
        X = torch.empty(T, B, C, dtype=f32, device=dev)  # LayerNorm's input
        MU = torch.empty(T, B, 1, dtype=f32, device=dev)
        RS = torch.empty(T, B, 1, dtype=f32, device=dev)
        c = c0.float()
        drop = training and p > 0
        ctx_drop = training and p_ctx > 0  # dropout on the context path into layer 1 (not on the gate product)
        MC = torch.empty(T, B, C, dtype=f32, device=dev) if ctx_drop else None
        dropout = Dropout((B, H), p, dt, dev) if drop else None
        for t in range(T):
            if keep is not None:
                c = torch.mul(c, keep[:, t], out=Cin[t])
            else:
                c = Cin[t].copy_(c)
            if ctx_drop:
                h = (c * MC[t].bernoulli_(1 - p_ctx).div_(1 - p_ctx)).to(dt)
            else:
                h = c.to(dt)
            for j in range(L):
                w, add = (Wc, XP[t]) if j == 0 else Ws[j - 1]
                h = mm(h, w, add, relu=True, out=Hs[j, t])
                if drop:
                    dropout(h)
            g = mm(h, Wg, bg, out=G[t])
            g[:, :2 * C].sigmoid_()
            x = torch.mul(g[:, :C], c, out=X[t]).addcmul_(g[:, C:2 * C], g[:, 2 * C:])
            y, mu, rs = torch.native_layer_norm(x, (C,), ln_w, ln_b, LN_EPS)
            MU[t], RS[t] = mu, rs
            c = y.clamp_(-CONTEXT_CLAMP, CONTEXT_CLAMP)
        ctx.save_for_backward(keep if keep is not None else torch.empty(0, device=dev),
                              MC if ctx_drop else torch.empty(0, device=dev), W_c.to(dt), W_g.to(dt), ln_w, ln_b,
                              Hs, Cin, G, X, MU, RS, *[w for w, _ in Ws])
        ctx.ctx_drop, ctx.scale = ctx_drop, dropout.scale if drop else 1.0
        ctx.has_keep, ctx.dtypes = keep is not None, (c0.dtype, W_c.dtype)
        return Hs[L - 1].transpose(0, 1), c

    @staticmethod
    def backward(ctx, d_hs: torch.Tensor, d_c: Optional[torch.Tensor]):
        keep, MC, Wc, Wg, ln_w, ln_b, Hs, Cin, G, X, MU, RS, *Ws = ctx.saved_tensors
        L, T, B, H = Hs.shape
        C = Cin.shape[-1]
        dt, dev = Hs.dtype, Hs.device
        dHL = d_hs.transpose(0, 1).to(dt) if d_hs is not None else None
        dc = d_c.float() if d_c is not None else torch.zeros(B, C, device=dev)
        # Everything that does not depend on the carried gradient, for all steps at once.
        SF, SI, U = G[..., :C], G[..., C:2 * C], G[..., 2 * C:]
        XH = (X - MU) * RS
        YM = ((XH * ln_w + ln_b).abs() <= CONTEXT_CLAMP).float()  # where the clamp let y through
        GF, GI = Cin * SF * (1 - SF), U * SI * (1 - SI)
        DM = (Hs > 0).to(dt).mul_(ctx.scale)  # relu' x dropout scale: kept units are those with output > 0
        dG = torch.empty(T, B, 3 * C, dtype=dt, device=dev)
        dA = torch.empty(L, T, B, H, dtype=dt, device=dev)
        DY = torch.empty(T, B, C, dtype=torch.float32, device=dev)
        no_affine_grads = [True, False, False]
        mm = Matmul(dev, dt)  # x @ w.T: the activation gradients take the weights transposed (contiguous for oneDNN)
        WgT, WcT = (w.t().contiguous() if mm.op is not None else w.t() for w in (Wg, Wc))
        WsT = [w.t().contiguous() if mm.op is not None else w.t() for w in Ws]
        for t in range(T - 1, -1, -1):
            dy = torch.mul(dc, YM[t], out=DY[t])
            dx = torch.ops.aten.native_layer_norm_backward(dy, X[t], [C], MU[t], RS[t], ln_w, ln_b,
                                                           no_affine_grads)[0]
            dg = dG[t]
            if dt == torch.float32:
                torch.mul(dx, GF[t], out=dg[:, :C])
                torch.mul(dx, GI[t], out=dg[:, C:2 * C])
                torch.mul(dx, SI[t], out=dg[:, 2 * C:])
            else:
                dg.copy_(torch.cat([dx * GF[t], dx * GI[t], dx * SI[t]], -1))
            dh = mm(dg, WgT, dHL[t] if dHL is not None else None)
            for j in range(L - 1, -1, -1):
                da = torch.mul(dh, DM[j, t], out=dA[j, t])
                if j:
                    dh = mm(da, WsT[j - 1])
            d_in = mm(da, WcT).float()
            if ctx.ctx_drop:
                d_in = d_in.mul_(MC[t])
            dc = d_in.addcmul_(dx, SF[t])
            if ctx.has_keep:
                dc = dc.mul_(keep[:, t])
        # Weight gradients: one matmul each over all T*B positions.
        flatG, flatA = dG.reshape(-1, 3 * C), dA.reshape(L, -1, H)
        d_Wg = mm(flatG.t(), Hs[L - 1].reshape(-1, H).t()).float()
        d_bg = flatG.float().sum(0)
        c_in = Cin * MC if ctx.ctx_drop else Cin  # what layer 1 actually read
        d_Wc = mm(flatA[0].t(), c_in.reshape(-1, C).to(dt).t()).float()
        layer_grads = []
        for j in range(1, L):
            layer_grads += [mm(flatA[j].t(), Hs[j - 1].reshape(-1, H).t()).float(), flatA[j].float().sum(0)]
        d_lnw = (DY * XH).sum((0, 1))
        d_lnb = DY.sum((0, 1))
        d_x = dA[0].transpose(0, 1)
        return (d_x, dc.to(ctx.dtypes[0]), None, d_Wc, d_Wg, d_bg, d_lnw, d_lnb, None, None, None, *layer_grads)

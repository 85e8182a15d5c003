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


class NewLLMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_proj: torch.Tensor, c0: torch.Tensor, keep: Optional[torch.Tensor], W_c: torch.Tensor,
                W_g: torch.Tensor, b_g: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, p: float,
                p_ctx: float, training: bool, *layers: torch.Tensor):
        B, T, H = x_proj.shape
        C = c0.shape[1]
        dt = x_proj.dtype  # matmul dtype: bf16 / fp16 under autocast, else fp32
        Wc, Wg, bg = W_c.to(dt), W_g.to(dt), b_g.to(dt)
        Ws = [(layers[k].to(dt), layers[k + 1].to(dt)) for k in range(0, len(layers), 2)]
        L = 1 + len(Ws)
        dev = x_proj.device
        Hs = torch.empty(L, T, B, H, dtype=dt, device=dev)  # layer outputs
        Ds = torch.empty(L, T, B, H, dtype=dt, device=dev)  # relu' x dropout scale
        Cin = torch.empty(T, B, C, dtype=torch.float32, device=dev)  # c_{t-1} after resets
        SF, SI, U, XH = (torch.empty(T, B, C, dtype=torch.float32, device=dev) for _ in range(4))
        RS = torch.empty(T, B, 1, dtype=torch.float32, device=dev)
        YM = torch.empty(T, B, C, dtype=torch.bool, device=dev)
        c = c0.float()
        drop = training and p > 0
        ctx_drop = training and p_ctx > 0  # dropout on the context path into layer 1 (not on the gate product)
        MC = torch.empty(T, B, C, dtype=torch.float32, device=dev) if ctx_drop else None
        for t in range(T):
            if keep is not None:
                c = c * keep[:, t]
            Cin[t] = c
            if ctx_drop:
                MC[t] = torch.empty_like(c).bernoulli_(1 - p_ctx) / (1 - p_ctx)
                h = (c * MC[t]).to(dt)
            else:
                h = c.to(dt)
            for j in range(L):
                a = torch.addmm(x_proj[:, t], h, Wc.t()) if j == 0 else torch.addmm(Ws[j - 1][1], h, Ws[j - 1][0].t())
                D = (a > 0).to(dt)
                if drop:
                    D = D * torch.empty_like(a).bernoulli_(1 - p) / (1 - p)
                Ds[j, t] = D
                h = a * D
                Hs[j, t] = h
            g = torch.addmm(bg, h, Wg.t()).float()
            sf, si, u = torch.sigmoid(g[:, :C]), torch.sigmoid(g[:, C:2 * C]), g[:, 2 * C:]
            x = sf * c + si * u
            mu = x.mean(-1, keepdim=True)
            rstd = (x.var(-1, unbiased=False, keepdim=True) + LN_EPS).rsqrt()
            xhat = (x - mu) * rstd
            y = xhat * ln_w + ln_b
            SF[t], SI[t], U[t], XH[t], RS[t] = sf, si, u, xhat, rstd
            YM[t] = (y >= -CONTEXT_CLAMP) & (y <= CONTEXT_CLAMP)
            c = y.clamp(-CONTEXT_CLAMP, CONTEXT_CLAMP)
        ctx.save_for_backward(keep if keep is not None else torch.empty(0, device=dev),
                              MC if ctx_drop else torch.empty(0, device=dev), Wc, Wg, ln_w, Hs, Ds,
                              Cin, SF, SI, U, XH, RS, YM, *[w for w, _ in Ws])
        ctx.ctx_drop = ctx_drop
        ctx.has_keep, ctx.dtypes = keep is not None, (c0.dtype, W_c.dtype)
        return Hs[L - 1].transpose(0, 1), c

    @staticmethod
    def backward(ctx, d_hs: torch.Tensor, d_c: Optional[torch.Tensor]):
        keep, MC, Wc, Wg, ln_w, Hs, Ds, Cin, SF, SI, U, XH, RS, YM, *Ws = ctx.saved_tensors
        L, T, B, H = Hs.shape
        C = Cin.shape[-1]
        dt = Hs.dtype
        dHL = d_hs.transpose(0, 1).to(dt) if d_hs is not None else torch.zeros(T, B, H, dtype=dt, device=Hs.device)
        dc = d_c.float() if d_c is not None else torch.zeros(B, C, device=Hs.device)
        dG = torch.empty(T, B, 3 * C, dtype=dt, device=Hs.device)
        dA = torch.empty(L, T, B, H, dtype=dt, device=Hs.device)
        DY = torch.empty(T, B, C, dtype=torch.float32, device=Hs.device)
        for t in range(T - 1, -1, -1):
            dy = dc * YM[t]
            DY[t] = dy
            dxh = dy * ln_w
            xh = XH[t]
            dx = RS[t] * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))
            sf, si = SF[t], SI[t]
            dg = torch.cat([dx * Cin[t] * sf * (1 - sf), dx * U[t] * si * (1 - si), dx * si], -1).to(dt)
            dG[t] = dg
            dh = dHL[t] + dg @ Wg
            for j in range(L - 1, -1, -1):
                da = dh * Ds[j, t]
                dA[j, t] = da
                if j:
                    dh = da @ Ws[j - 1]
            d_in = (da @ Wc).float()
            dc = dx * sf + (d_in * MC[t] if ctx.ctx_drop else d_in)
            if ctx.has_keep:
                dc = dc * keep[:, t]
        # Weight gradients: one matmul each over all T*B positions.
        flatG, flatA = dG.reshape(-1, 3 * C), dA.reshape(L, -1, H)
        d_Wg = (flatG.t() @ Hs[L - 1].reshape(-1, H)).float()
        d_bg = flatG.float().sum(0)
        c_in = Cin * MC if ctx.ctx_drop else Cin  # what layer 1 actually read
        d_Wc = (flatA[0].t() @ c_in.reshape(-1, C).to(dt)).float()
        layer_grads = []
        for j in range(1, L):
            layer_grads += [(flatA[j].t() @ Hs[j - 1].reshape(-1, H)).float(), flatA[j].float().sum(0)]
        d_lnw = (DY * XH).sum((0, 1))
        d_lnb = DY.sum((0, 1))
        d_x = dA[0].transpose(0, 1)
        return (d_x, dc.to(ctx.dtypes[0]), None, d_Wc, d_Wg, d_bg, d_lnw, d_lnb, None, None, None, *layer_grads)

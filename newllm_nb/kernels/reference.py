"""The New-LLM cell as its equations, token by token: the one reference every fast version is checked against.

For token t, given layer 1's embedding half x_t = W_e e_t + b_1 (the model hoists it out of the time loop):

    r_t  = c_{t-1}                      (state_norm="read": LN(c_{t-1}))     what the FNN and the gates read
    h_1  = drop(relu(x_t + W_c drop_c(r_t)))
    h_j  = drop(relu(W_j h_{j-1} + b_j))                       j = 2..N   (fnn_residual="none")
         = h_{j-1} + drop(relu(W_j z + b_j)),  z = h_{j-1} ("residual") or LN_j(h_{j-1}) ("prenorm")
    [f; i; u] = W_g g + b_g,  g = h_N, or [h_N ; drop_c(r_t)] with gate_context;  W_g = U V with gate_rank
    u    = tanh(u) with context_tanh
    s_t  = sigmoid(f) * c_{t-1} + sigmoid(i) * u
    c_t  = clamp(LN(s_t), -10, 10)      state_norm "layernorm" / "noaffine" (with slow_forget_bias: LN per half)
         = clamp(s_t, -10, 10)          state_norm "none" / "read"

Plain and slow on purpose: ``NewLLM.forward``'s per-token loop and ``NewLLM.step`` run it as it is. The fast
versions compute the same function: the hand-written BPTT (recurrence.py) and the Triton training and decoding
kernels (fused.py). tests/test_reference.py and tests/test_fused.py (on CPU under TRITON_INTERPRET=1) compare
each of them with ``sequence`` / ``cell``, outputs and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import CONTEXT_CLAMP, LN_EPS


def state_norm(m, s: torch.Tensor) -> torch.Tensor:
    """The context's LayerNorm, over all C channels or (slow_forget_bias) over each half on its own."""
    if not m.config.slow_forget_bias:
        return m.norm(s)
    C = s.shape[-1]
    z = F.layer_norm(s.unflatten(-1, (2, C // 2)), (C // 2,), eps=LN_EPS).flatten(-2)
    return z if m.norm.weight is None else z * m.norm.weight + m.norm.bias


def cell(m, x_proj: torch.Tensor, c: torch.Tensor, W_c: torch.Tensor,
         masks: Optional[Sequence[torch.Tensor]] = None,
         ctx_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: (h_N [B, H], c_t [B, C]). ``m`` (a NewLLM) holds the weights and the config; ``W_c`` is layer
    1's context half. ``masks`` (one [B, H] per FNN layer) and ``ctx_mask`` ([B, C]), scaled keep masks, stand
    in for the module's own dropout draws, so a version that draws its masks its own way can be compared."""
    cfg = m.config

    def drop(z: torch.Tensor, j: int) -> torch.Tensor:
        return m.drop(z) if masks is None else z * masks[j]

    r = state_norm(m, c) if cfg.state_norm == "read" else c
    if ctx_mask is not None:
        r = r * ctx_mask
    elif cfg.context_dropout > 0:  # skip a no-op kernel per step
        r = m.ctx_drop(r)
    h = drop(F.relu(x_proj + F.linear(r.to(W_c.dtype), W_c)), 0)
    for j, layer in enumerate(m.fnn[1:], start=1):
        if cfg.fnn_residual == "none":
            h = drop(F.relu(layer(h)), j)
        else:
            z = m.fnn_norms[j - 1](h) if m.fnn_norms is not None else h
            h = h + drop(F.relu(layer(z)), j)
    g = torch.cat([h, r.to(h.dtype)], dim=-1) if cfg.gate_context else h
    if m.gate_down is not None:
        g = m.gate_down(g)
    f, i, u = m.gates(g).chunk(3, dim=-1)
    if cfg.context_tanh:
        u = torch.tanh(u)
    s = torch.sigmoid(f) * c + torch.sigmoid(i) * u
    if cfg.state_norm in ("layernorm", "noaffine"):
        s = state_norm(m, s)
    return h, s.clamp(-CONTEXT_CLAMP, CONTEXT_CLAMP)


def sequence(m, x_proj: torch.Tensor, c: torch.Tensor, keep: Optional[torch.Tensor] = None,
             masks: Optional[Sequence[torch.Tensor]] = None, ctx_mask: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The time loop over ``cell``: x_proj [B, T, H] from c [B, C] -> (h_N for every t [B, T, H], c_T). ``keep``
    [B, T, 1] zeroes the context before token t where 0; ``masks`` ([T, B, H] per layer) and ``ctx_mask``
    ([T, B, C]) are the dropout masks to use, as in ``cell``."""
    W_c = m.fnn[0].weight[:, m.config.embed_dim:].to(x_proj.dtype)
    hs = []
    for t in range(x_proj.shape[1]):
        if keep is not None:
            c = c * keep[:, t]
        h, c = cell(m, x_proj[:, t], c, W_c, None if masks is None else [mk[t] for mk in masks],
                    None if ctx_mask is None else ctx_mask[t])
        hs.append(h)
    return torch.stack(hs, dim=1), c

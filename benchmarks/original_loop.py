"""The original's training-loop shape, for the throughput comparison only: every matmul inside the per-token
loop, [embed ; context] concatenated per step, W_f / W_i / W_u as three matmuls, the head per token."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from newllm_nb.config import CONTEXT_CLAMP


class OriginalLoop(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.m = model
        self.config = model.config

    def forward(self, ids, context=None, reset=None):
        m, C = self.m, self.config.context_dim
        c = m.init_context(ids.shape[0]) if context is None else context
        W, b = m.gates.weight, m.gates.bias
        outs = []
        for t in range(ids.shape[1]):
            h = torch.cat([m.embed(ids[:, t]), c], dim=-1)
            for layer in m.fnn:
                h = m.drop(F.relu(layer(h)))
            outs.append(m.head(h))
            f = torch.sigmoid(F.linear(h, W[:C], b[:C]))
            i = torch.sigmoid(F.linear(h, W[C:2 * C], b[C:2 * C]))
            u = F.linear(h, W[2 * C:], b[2 * C:])
            c = m.norm(f * c + i * u).clamp(-CONTEXT_CLAMP, CONTEXT_CLAMP)
        return torch.stack(outs, 1), c

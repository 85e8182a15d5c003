"""New-LLM: an attention-free language model whose whole context is one fixed-size vector.

For each token t (c_0 = 0):

    h_t      = FNN([embed(x_t) ; c_{t-1}])                    N x (Linear + ReLU + Dropout)
    logits_t = W_out h_t
    c_t      = clamp(LayerNorm(sigmoid(W_f h_t) * c_{t-1} + sigmoid(W_i h_t) * (W_u h_t)), -10, 10)

No attention and no positional embeddings: the state carried between tokens is c_t alone, so
memory is O(1) in sequence length.

Only the recurrence must run token by token. Everything else is hoisted out of the time loop:
the embedding half of layer 1 is one matmul over all positions, the output head runs once over
all hidden states, and W_f / W_i / W_u are one fused matmul. ``step`` is the literal single-token
update, used by generation.

Cell options (``ModelConfig`` fields, each off by default; their comments there give the equations):
``state_norm``, ``chrono_init``, ``gate_context``, ``fnn_residual``, ``gate_rank``, ``slow_forget_bias``. The cell
itself, with every option, is kernels/reference.py's ``cell``; with any option on, ``forward`` always runs
that per-token loop.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LN_EPS, ModelConfig
from ..kernels import reference
from ..kernels.linear import linear


def embed_lookup(embed: nn.Embedding, ids: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Embedding lookup with word-type dropout (AWD-LSTM's ``dropoute``): while training, each
    vocabulary row is zeroed with probability ``p`` for the whole batch (the rest scaled by 1/(1-p)),
    so the model cannot lean on any single word's vector."""
    if not training or p == 0:
        return embed(ids)
    keep = torch.empty(embed.weight.shape[0], 1, device=ids.device, dtype=embed.weight.dtype).bernoulli_(1 - p)
    return F.embedding(ids, embed.weight * keep / (1 - p), embed.padding_idx)


class TiedHead(nn.Module):
    """Output layer sharing the input embedding (Press & Wolf 2017): logits = E (P h) + b.

    ``P`` maps the hidden size to the embedding size (None when they are equal). At vocab 10000 this
    replaces a hidden x vocab matrix (5.1M parameters at hidden 512) with hidden x embed (0.13M).
    The embedding is referenced, not registered, so its weight is saved once (as ``embed.weight``).
    """

    def __init__(self, embed: nn.Embedding, in_dim: int) -> None:
        super().__init__()
        V, E = embed.weight.shape
        self.proj = nn.Linear(in_dim, E, bias=False) if in_dim != E else None
        self.bias = nn.Parameter(torch.zeros(V))
        self._embed = [embed]  # a list: not a submodule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = linear(h, self.proj.weight) if self.proj is not None else h
        return linear(x, self._embed[0].weight, self.bias)


def count_parameters(module: nn.Module) -> int:
    """The one way parameters are counted: every registered parameter once (a tied head adds none)."""
    return sum(p.numel() for p in module.parameters())


def init_weights(module: nn.Module, std: float) -> None:
    """The original's init, for New-LLM and the baselines alike: every Linear / Embedding weight N(0, std),
    every bias (a tied head's included) zero."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, TiedHead):
            nn.init.zeros_(m.bias)


class NewLLM(nn.Module):
    """The New-LLM cell. ``forward(ids, context)`` returns ``(logits, final_context)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        E, C, H = config.embed_dim, config.context_dim, config.hidden_dim
        self.embed = nn.Embedding(config.vocab_size, E)
        # Layer 1 reads [embed ; context]; its weight is split at use so the embedding half can be hoisted.
        self.fnn = nn.ModuleList([nn.Linear(E + C, H)] + [nn.Linear(H, H) for _ in range(config.num_layers - 1)])
        self.drop = nn.Dropout(config.dropout)
        self.ctx_drop = nn.Dropout(config.context_dropout)
        gate_in = H + C if config.gate_context else H
        # Low rank (gate_rank): V maps the gate input down, then ``gates`` (U) up; ``gates`` keeps its name.
        self.gate_down = nn.Linear(gate_in, config.gate_rank, bias=False) if config.gate_rank else None
        self.gates = nn.Linear(config.gate_rank or gate_in, 3 * C)  # W_f, W_i, W_u fused: [forget | input | candidate]
        # Without affine parameters for "noaffine", and for "none", which has no norm (no dead parameters).
        self.norm = nn.LayerNorm(C, eps=LN_EPS, elementwise_affine=config.state_norm not in ("noaffine", "none"))
        self.fnn_norms = (nn.ModuleList([nn.LayerNorm(H, eps=LN_EPS) for _ in range(config.num_layers - 1)])
                          if config.fnn_residual == "prenorm" else None)
        # Off the recurrent path (None = the original: none): on embedding vectors in, on features to the head.
        self.in_drop = nn.Dropout(config.input_dropout or 0.0)
        self.out_drop = nn.Dropout(config.output_dropout or 0.0)
        self.head = TiedHead(self.embed, H) if config.tie_embeddings else nn.Linear(H, config.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's init: weights N(0, init_std), biases zero (the forget gate's: ``forget_bias``),
        LayerNorm identity."""
        cfg = self.config
        init_weights(self, cfg.init_std)
        self.norm.reset_parameters()
        if self.fnn_norms is not None:
            for ln in self.fnn_norms:
                ln.reset_parameters()
        C = cfg.context_dim
        with torch.no_grad():
            if self.gate_down is not None:  # V at unit gain, so U V h starts at the scale of a full-rank W_g h
                nn.init.normal_(self.gate_down.weight, 0.0, self.gate_down.weight.shape[1] ** -0.5)
            b_f, b_i = self.gates.bias[:C], self.gates.bias[C: 2 * C]
            b_f.fill_(cfg.forget_bias)
            if cfg.chrono_init:
                b_f.copy_(torch.empty(C).uniform_(1.0, cfg.chrono_init - 1.0).log_())
                b_i.copy_(-b_f)
            if cfg.slow_forget_bias:
                b_f[C // 2:].fill_(cfg.slow_forget_bias)
                b_i[C // 2:].fill_(-cfg.slow_forget_bias)

    def init_context(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """c_0 = 0."""
        return torch.zeros(batch_size, self.config.context_dim, device=device or self.embed.weight.device,
                           dtype=dtype or self.embed.weight.dtype)

    # -- the recurrence, one token ------------------------------------------------------------------
    def _context_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # Layer 1's context half, sliced (and cast, under autocast) once per call rather than per token:
        # a slice is not a leaf, so autocast's weight-cast cache would not help inside the loop.
        return self.fnn[0].weight[:, self.config.embed_dim:].to(dtype)

    def _cell(self, x_proj: torch.Tensor, c: torch.Tensor, W_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step given layer 1's hoisted embedding projection ``x_proj`` = W_e e_t + b: the reference
        cell (kernels/reference.py), every cell option included."""
        return reference.cell(self, x_proj, c, W_c)

    def _embed_proj(self, ids: torch.Tensor) -> torch.Tensor:
        W_e = self.fnn[0].weight[:, : self.config.embed_dim]
        e = embed_lookup(self.embed, ids, self.config.embed_dropout, self.training)
        return linear(self.in_drop(e), W_e, self.fnn[0].bias)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """logits = W_out h at every position, one matmul (kernels.linear: oneDNN on CPU)."""
        return linear(h, self.head.weight, self.head.bias) if isinstance(self.head, nn.Linear) else self.head(h)

    def step(self, token_ids: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one token: ``token_ids`` [B] -> (logits [B, V], new context [B, C])."""
        x_proj = self._embed_proj(token_ids)
        h, c = self._cell(x_proj, context, self._context_weight(x_proj.dtype))
        return self.head(self.out_drop(h)), c

    def compile_cell(self) -> None:
        """Compile the per-token cell (fuses its element-wise work); the loop around it stays Python."""
        self._cell = torch.compile(self._cell, dynamic=False)

    # -- a whole sequence -----------------------------------------------------------------------------
    def run_recurrence(self, recurrence: Callable, x_proj: torch.Tensor, c: torch.Tensor,
                       keep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole time loop through ``recurrence`` (``forward``'s, see there) from the hoisted embedding
        projection ``x_proj`` [B, T, H], c_0 ``c`` and the reset mask ``keep``: (hs [B, T, H], c_T)."""
        cfg = self.config
        layers = [p for layer in self.fnn[1:] for p in (layer.weight, layer.bias)]
        options = {} if getattr(recurrence, "implements", None) is None else dict(
            W_v=None if self.gate_down is None else self.gate_down.weight, state_norm=cfg.state_norm,
            gate_context=cfg.gate_context)
        return recurrence(x_proj, c, keep, self.fnn[0].weight[:, cfg.embed_dim:], self.gates.weight,
                          self.gates.bias, self.norm.weight, self.norm.bias, cfg.dropout, cfg.context_dropout,
                          self.training, *layers, **options)

    def forward(self, ids: torch.Tensor, context: Optional[torch.Tensor] = None,
                reset: Optional[torch.Tensor] = None, return_trajectory: bool = False,
                recurrence: Optional[Callable] = None):
        """Run ``ids`` [B, T] from ``context`` (zeros if None).

        ``reset`` [B, T] (bool) zeroes the context *before* token t where True: packed sequences
        start fresh at each example. Returns ``(logits [B, T, V], context [B, C])``, plus the context
        trajectory [B, T, C] (c_1..c_T) when ``return_trajectory``.

        ``recurrence`` runs the whole time loop at once instead of the per-token ``_cell`` loop, with
        ``recurrence.NewLLMRecurrence.apply``'s signature: the same function with a hand-written
        backward (the training steps pass it; see step.py). Not with ``return_trajectory`` or ``context_tanh``.
        Without an ``implements`` attribute it implements only the original cell; with one (a predicate on the
        ModelConfig, e.g. ``fused.fused_recurrence``) it also takes the cell options as keywords (``W_v``,
        ``state_norm``, ``gate_context``). A cell it does not implement runs the autograd loop below instead
        (the same result, slower).
        """
        B, T = ids.shape
        cfg = self.config
        c = self.init_context(B) if context is None else context
        x_proj = self._embed_proj(ids)  # hoisted: one matmul for all positions
        keep = None if reset is None else (~reset.bool()).unsqueeze(-1).to(c.dtype)
        implements = getattr(recurrence, "implements", None)  # a predicate on the config; absent: the original cell
        if recurrence is not None and (cfg.context_tanh or (implements(cfg) if implements else cfg.original_cell)):
            if return_trajectory or cfg.context_tanh:
                raise ValueError("a whole-loop recurrence returns no trajectory and has no context_tanh")
            hs, c = self.run_recurrence(recurrence, x_proj, c, keep)
            # [B, T, H] in the autograd loop's memory order (the head's matmul would copy it anyway): output
            # dropout draws its mask in memory order, so both loops drop the same units for the same seed.
            return self._logits(self.out_drop(hs.contiguous())), c
        W_c = self._context_weight(x_proj.dtype)
        hs, cs = [], []
        for t in range(T):
            if keep is not None:
                c = c * keep[:, t]
            h, c = self._cell(x_proj[:, t], c, W_c)
            hs.append(h)
            if return_trajectory:
                cs.append(c)
        logits = self._logits(self.out_drop(torch.stack(hs, dim=1)))  # hoisted: one matmul over all hidden states
        if return_trajectory:
            return logits, c, torch.stack(cs, dim=1)
        return logits, c


def gate_rank_for(config: ModelConfig, context_dim: int) -> int:
    """The ``gate_rank`` that gives ``config`` widened to ``context_dim`` the parameter count closest to
    ``config``'s own (a wider context at equal parameters: the low-rank gates pay for the wider state)."""
    with torch.device("meta"):
        target = count_parameters(NewLLM(config))

        def size(r: int) -> int:
            return count_parameters(NewLLM(dataclasses.replace(config, context_dim=context_dim,
                                                                         gate_rank=r)))
        lo, hi = 1, 4 * max(config.hidden_dim, context_dim)
        while lo < hi:  # parameters grow with the rank: the first rank at or above the target, or the one before
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if size(mid) < target else (lo, mid)
        return min((max(lo - 1, 1), lo), key=lambda r: abs(size(r) - target))

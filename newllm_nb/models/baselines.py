"""Equal-parameter baselines with New-LLM's interface: ``forward(ids, state, reset) -> (logits, state)``.

* ``LSTMLM``: cuDNN ``nn.LSTM``; the recurrent state is ``(h, c)``.
* ``TransformerLM``: causal, PyTorch SDPA, learned positions; it carries no state between windows
  (its memory is the window), and ``reset`` blocks attention across example boundaries.

``matched_config`` sizes either to a New-LLM config's parameter count so comparisons are fair.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .newllm import TiedHead, embed_lookup, init_weights


class LSTMLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        H = config.lstm_hidden or config.hidden_dim
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, H, num_layers=config.lstm_layers, batch_first=True,
                            dropout=config.dropout if config.lstm_layers > 1 else 0.0)
        # The LSTM's dropout sits off the recurrent path, at its input and output (Zaremba et al. 2014).
        p_in, p_out = (config.dropout if p is None else p for p in (config.input_dropout, config.output_dropout))
        self.in_drop, self.out_drop = nn.Dropout(p_in), nn.Dropout(p_out)
        self.head = TiedHead(self.embed, H) if config.tie_embeddings else nn.Linear(H, config.vocab_size)
        init_weights(self, config.init_std)
        if config.forget_bias:  # else PyTorch's own LSTM init, as measured so far
            with torch.no_grad():  # gate order i, f, g, o; the two biases add up to forget_bias
                for name, b in self.lstm.named_parameters():
                    if name.startswith("bias_"):
                        b[H: 2 * H].fill_(config.forget_bias if name.startswith("bias_ih") else 0.0)

    def forward(self, ids: torch.Tensor, context=None, reset: Optional[torch.Tensor] = None):
        x = self.in_drop(embed_lookup(self.embed, ids, self.config.embed_dropout, self.training))
        B, T = ids.shape
        state = context
        # cuDNN cannot reset mid-sequence: run the chunks between reset columns, zeroing rows that reset.
        cuts = [0] + ([] if reset is None else
                      [t for t in torch.nonzero(reset[:, 1:].any(0)).flatten().add(1).tolist()]) + [T]
        outs = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            if state is not None and reset is not None:
                keep = (~reset[:, a]).to(x.dtype).view(1, B, 1)
                state = (state[0] * keep.to(state[0].dtype), state[1] * keep.to(state[1].dtype))
            out, state = self.lstm(x[:, a:b], state)
            outs.append(out)
        return self.head(self.out_drop(torch.cat(outs, 1))), state


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.tf_dim or config.embed_dim
        self.tok = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_len, d)
        layer = nn.TransformerEncoderLayer(d, config.tf_heads, 4 * d, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.tf_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = TiedHead(self.tok, d) if config.tie_embeddings else nn.Linear(d, config.vocab_size)
        init_weights(self, config.init_std)

    def forward(self, ids: torch.Tensor, context=None, reset: Optional[torch.Tensor] = None):
        B, T = ids.shape
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} exceeds TransformerLM max_len {self.config.max_len}")
        positions = torch.arange(T, device=ids.device)
        if reset is not None:  # positions restart at each example, as if it were read on its own
            starts = torch.where(reset.bool(), positions, torch.zeros_like(positions)).cummax(1).values
            positions = positions - starts
        x = embed_lookup(self.tok, ids, self.config.embed_dropout, self.training) + self.pos(positions)
        if reset is None:
            mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device, dtype=x.dtype)
            h = self.blocks(x, mask=mask, is_causal=True)
        else:  # causal within each example: True = may attend, expanded to a float mask per head
            seg = reset.long().cumsum(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            allowed = causal & (seg[:, :, None] == seg[:, None, :])
            mask = torch.zeros(B, T, T, dtype=x.dtype, device=ids.device).masked_fill(~allowed, float("-inf"))
            mask = mask.repeat_interleave(self.config.tf_heads, 0)
            h = self.blocks(x, mask=mask)
        return self.head(self.norm(h)), None


    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """A preallocated KV cache for ``decode_step``: memory grows linearly with ``max_len``."""
        d, H = self.tok.embedding_dim, self.config.tf_heads
        w = self.tok.weight
        shape = (len(self.blocks.layers), batch_size, H, max_len, d // H)
        return {"k": torch.zeros(shape, device=w.device, dtype=w.dtype),
                "v": torch.zeros(shape, device=w.device, dtype=w.dtype), "len": 0}

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token with a KV cache (eval mode): the same computation as ``forward`` at that position.
        Positions past ``max_len`` wrap around (only the generation benchmark goes that far)."""
        B, pos = token_ids.shape[0], cache["len"]
        d, H = self.tok.embedding_dim, self.config.tf_heads
        x = self.tok(token_ids) + self.pos.weight[pos % self.config.max_len]
        for i, layer in enumerate(self.blocks.layers):
            att = layer.self_attn
            q, k, v = F.linear(layer.norm1(x), att.in_proj_weight, att.in_proj_bias).view(B, 3, H, d // H).unbind(1)
            cache["k"][i, :, :, pos] = k
            cache["v"][i, :, :, pos] = v
            # One query: plain attention (SDPA's cuDNN backend would build a new plan for every length).
            keys, vals = cache["k"][i, :, :, : pos + 1], cache["v"][i, :, :, : pos + 1]
            w = (keys @ q.unsqueeze(-1)).squeeze(-1).float().mul_((d // H) ** -0.5).softmax(-1)
            a = (w.to(vals.dtype).unsqueeze(-2) @ vals).squeeze(-2)
            x = x + att.out_proj(a.reshape(B, d))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        cache["len"] = pos + 1
        return self.head(self.norm(x))

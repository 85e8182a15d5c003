"""What does the context vector remember? Two measurements on a trained model and a token stream.

* ``loss_by_position``: evaluation loss as a function of a token's position in its article, with the
  state carried through the whole article or zeroed every ``reset_every`` tokens. Where the two curves part,
  the model uses context older than ``reset_every`` tokens.
* ``perturbation_fade``: change one token early in a span and follow how far the recurrent state (New-LLM's
  context c_t; an LSTM's (h, c)) and the next-token distribution move over the following tokens.

Both work for any model with the package's recurrent interface ``model(ids, state, reset) -> (logits, state)``
(``NewLLM`` and ``baselines.LSTMLM``) and return pandas DataFrames; plotting is left to the caller
(``benchmarks/context_memory.py``, the notebooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F

from ..config import BOS_ID, PAD_ID

# Position buckets (1-based positions of the predicted token in its article): fine early, coarse later.
DEFAULT_EDGES = (1, 9, 17, 33, 65, 129, 257, 513, 1025, 2049, 4097, 1 << 30)


def article_spans(resets: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each article in a stream whose ``resets`` flag is True at each article's first token
    (as ``batching.wikitext_stream`` makes it); the first token always starts one."""
    starts = torch.nonzero(resets.bool()).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [resets.numel()]
    return [(a, b) for a, b in zip(starts, ends) if b - a >= 2]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_losses(model: torch.nn.Module, tokens: torch.Tensor, resets: torch.Tensor,
                 reset_every: Optional[int] = None, window: int = 256) -> pd.DataFrame:
    """Per-token evaluation loss, every article read from a zero state.

    ``tokens`` / ``resets`` [N]: one stream with a reset flag at each article's first token. Articles are read
    side by side (padded), in windows of ``window`` tokens with the state carried between windows; with
    ``reset_every`` = k the state is also zeroed before positions k, 2k, ... of each article. Returns one row
    per predicted token: ``article``, ``position`` (1-based position of the predicted token in its article),
    ``loss`` (nats). PAD and BOS targets are skipped, as in ``metrics``.
    """
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    spans = article_spans(resets)
    L = max(b - a for a, b in spans)
    x = torch.full((len(spans), L), PAD_ID, dtype=torch.long)
    for k, (a, b) in enumerate(spans):
        x[k, : b - a] = tokens[a:b]
    x = x.to(dev)
    pos = torch.arange(L, device=dev)
    reset = None
    if reset_every:
        reset = ((pos % reset_every == 0) & (pos > 0)).unsqueeze(0).expand(len(spans), L)
    state, rows = None, []
    for t0 in range(0, L - 1, window):
        t1 = min(t0 + window, L - 1)
        logits, state = model(x[:, t0:t1], state, None if reset is None else reset[:, t0:t1].contiguous())
        y = x[:, t0 + 1: t1 + 1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        keep = (y != PAD_ID) & (y != BOS_ID)
        art, col = torch.nonzero(keep, as_tuple=True)
        rows.append(pd.DataFrame({"article": art.cpu().numpy(), "position": (col + t0 + 1).cpu().numpy(),
                                  "loss": loss[keep].cpu().numpy()}))
    model.train(was_training)
    return pd.concat(rows).sort_values(["article", "position"], kind="stable").reset_index(drop=True)


def loss_by_position(model: torch.nn.Module, tokens: torch.Tensor, resets: torch.Tensor,
                     reset_every: Sequence[Optional[int]] = (None, 64),
                     edges: Sequence[int] = DEFAULT_EDGES) -> pd.DataFrame:
    """Mean evaluation loss per position bucket, for each reading of the stream in ``reset_every``
    (None = state carried through each article; k = zeroed every k tokens).

    Returns one row per (reading, bucket): ``context`` ("carried" or "reset every k"), ``position_lo`` /
    ``position_hi`` (the bucket [lo, hi) of 1-based positions in the article), ``tokens``, ``loss`` (mean nats),
    ``ppl`` (exp of it). Only buckets holding tokens appear.
    """
    out = []
    for every in reset_every:
        df = token_losses(model, tokens, resets, every)
        bucket = pd.cut(df["position"], bins=list(edges), right=False)
        g = df.groupby(bucket, observed=True)["loss"].agg(["count", "mean"])
        for iv, row in g.iterrows():
            out.append({"context": "carried" if not every else f"reset every {every}",
                        "position_lo": int(iv.left), "position_hi": int(iv.right), "tokens": int(row["count"]),
                        "loss": float(row["mean"]), "ppl": float(torch.tensor(row["mean"]).exp())})
    return pd.DataFrame(out)


def flat_state(state: Union[torch.Tensor, tuple]) -> torch.Tensor:
    """A recurrent state as one [B, D] tensor: New-LLM's context as it is, an LSTM's (h, c) [layers, B, H]
    each as h and c of every layer side by side."""
    if torch.is_tensor(state):
        return state.float()
    return torch.cat([s.float().transpose(0, 1).flatten(1) for s in state], dim=1)


@torch.no_grad()
def perturbation_fade(model: torch.nn.Module, tokens: torch.Tensor, resets: torch.Tensor, warmup: int = 32,
                      horizon: int = 128, samples: int = 64, seed: int = 0) -> pd.DataFrame:
    """How fast a change in one token fades from the recurrent state.

    Takes ``samples`` spans of ``warmup + 1 + horizon`` tokens inside single articles of the stream, each read
    from a zero state; in a copy, the token at offset ``warmup`` is replaced by a random non-special token.
    After each following token (``distance`` 0 = just after the changed token) it compares the two runs:
    ``state_diff`` = mean ||s - s'|| of the flattened state (``flat_state``), ``rel_diff`` = mean of
    ||s - s'|| / ||s|| (comparable across models whose states differ in scale), ``kl`` = mean KL(p || p') of the
    next-token distributions (nats). Returns one row per distance.
    """
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    n = warmup + 1 + horizon
    g = torch.Generator().manual_seed(seed)
    starts = [a + int(torch.randint(0, b - a - n + 1, (1,), generator=g)) for a, b in article_spans(resets)
              if b - a >= n]
    if not starts:
        raise ValueError(f"no article of the stream holds {n} tokens (warmup + 1 + horizon)")
    pick = torch.randint(0, len(starts), (samples,), generator=g)
    x = torch.stack([tokens[starts[k]: starts[k] + n] for k in pick.tolist()])
    vocab = int(model.embed.weight.shape[0]) if hasattr(model, "embed") else int(tokens.max()) + 1
    x2 = x.clone()
    new = torch.randint(4, vocab, (samples,), generator=g)  # ids 0-3 are the special tokens
    new = torch.where(new == x[:, warmup], 4 + (new - 3) % (vocab - 4), new)
    x2[:, warmup] = new
    x, x2 = x.to(dev), x2.to(dev)
    _, s1 = model(x[:, :warmup], None)
    s2 = s1
    rows = []
    for t in range(warmup, n):
        l1, s1 = model(x[:, t: t + 1], s1)
        l2, s2 = model(x2[:, t: t + 1], s2)
        a, b = flat_state(s1), flat_state(s2)
        d = (a - b).norm(dim=1)
        lp1, lp2 = F.log_softmax(l1[:, -1].float(), -1), F.log_softmax(l2[:, -1].float(), -1)
        kl = (lp1.exp() * (lp1 - lp2)).sum(-1)
        rows.append({"distance": t - warmup, "state_diff": float(d.mean()),
                     "rel_diff": float((d / a.norm(dim=1).clamp_min(1e-8)).mean()), "kl": float(kl.mean())})
    model.train(was_training)
    return pd.DataFrame(rows)

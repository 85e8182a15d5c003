"""Cutting token ids into training batches.

Three ways:

* ``windows`` (the seed): each paragraph / example is its own sequence, cut into windows of
  ``max_seq_length`` with stride ``max_seq_length // 2`` and padded with PAD=0; context starts at 0.
* ``stream`` (stateful BPTT): the corpus is one token stream split into B parallel streams;
  consecutive windows carry the context forward, optionally reset at article boundaries.
* ``packed`` (instruction data): examples joined into full windows with the context reset at each
  example start, so no compute goes to padding.

In every mode inputs are tokens[:-1] and targets tokens[1:]; a target of PAD is ignored by the loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, Optional, Union

import torch

from ..config import BOS_ID, PAD_ID
from ..runtime.distributed import stream_rows, window_rows
from ..runtime.hashing import tensor_sha256
from .prompt import encode_example
from .sources import MIN_WORDS, DataError, is_article_heading


def make_windows(ids: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """The original's windows over one encoded paragraph: length ``max_seq_length``, stride half of it, PAD-padded.

    A paragraph no longer than a window is one padded window. A longer one gives windows starting at
    0, S/2, S, ...; where the last full window stops short of the end, one more window starting a
    stride later (padded) keeps the tail, so no token is dropped.
    """
    S, stride = max_seq_length, max(1, max_seq_length // 2)
    ids = list(ids)
    if len(ids) <= S:
        return [ids + [PAD_ID] * (S - len(ids))]
    starts = list(range(0, len(ids) - S + 1, stride))
    if starts[-1] + S < len(ids):
        starts.append(starts[-1] + stride)
    return [(ids[s:s + S] + [PAD_ID] * S)[:S] for s in starts]


def wikitext_sequences(lines: Sequence[str], tokenizer, max_seq_length: int) -> torch.Tensor:
    """[N, max_seq_length] windows of all paragraphs with >= 5 words (seed processing)."""
    rows = []
    for line in lines:
        if len(line.split()) >= MIN_WORDS:
            rows.extend(make_windows(tokenizer.encode(line.strip()), max_seq_length))
    if not rows:
        raise DataError(f"no WikiText paragraph with >= {MIN_WORDS} words to train on")
    return torch.tensor(rows, dtype=torch.long)



def wikitext_stream(lines: Sequence[str], tokenizer, reset_at_articles: bool = True, reset_every_line: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-empty lines as one token stream (BOS ... EOS per line) and a reset flag per token
    (True at the very start, at each article when ``reset_at_articles``, at every line when
    ``reset_every_line``: the original's conditioning, each paragraph from a zero context)."""
    ids: list[int] = []
    resets: list[bool] = []
    for line in lines:
        if not line.strip():
            continue
        enc = tokenizer.encode(line.strip())
        start = not ids or reset_every_line or (reset_at_articles and is_article_heading(line))
        resets.extend([start] + [False] * (len(enc) - 1))
        ids.extend(enc)
    if len(ids) < 4:
        raise DataError("WikiText stream is empty")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(resets, dtype=torch.bool)



def instruction_sequences(records: Sequence[dict], tokenizer, max_seq_length: int, response_only: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's processing: one row per example, truncated / padded to ``max_seq_length``.
    Returns (tokens, target_tokens); target_tokens has PAD outside the Response when ``response_only``."""
    rows, tgt_rows = [], []
    for rec in records:
        ids, start = encode_example(rec, tokenizer)
        ids = (ids + [PAD_ID] * max_seq_length)[:max_seq_length]
        tgt = list(ids)
        if response_only:
            tgt[:start] = [PAD_ID] * min(start, max_seq_length)
        rows.append(ids)
        tgt_rows.append(tgt)
    if not rows:
        raise DataError("no instruction example to train on")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(tgt_rows, dtype=torch.long)


def instruction_stream(records: Sequence[dict], tokenizer, response_only: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples joined into one stream (packing), a reset at each example's BOS, and the target stream."""
    ids, resets, tgt = [], [], []
    for rec in records:
        enc, start = encode_example(rec, tokenizer)
        ids.extend(enc)
        resets.extend([True] + [False] * (len(enc) - 1))
        tgt.extend([PAD_ID] * start + enc[start:] if response_only else enc)
    if not ids:
        raise DataError("no instruction example to pack")
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(resets, dtype=torch.bool),
            torch.tensor(tgt, dtype=torch.long))



class Batch(NamedTuple):
    x: torch.Tensor  # [B, T] input ids
    y: torch.Tensor  # [B, T] target ids, PAD = ignored
    reset: Optional[torch.Tensor]  # [B, T] bool or None
    carry: bool  # True: start from the previous batch's final context (stateful streams)


class WindowLayout:
    """Batches of whole windows in a (seeded) shuffled order, lists and memory maps alike: a subclass gives
    ``__len__`` and ``_xy(idx)``, the inputs and targets of the windows at ``idx`` (a LongTensor)."""

    stateful = False

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        """Global batches of ``batch_size`` rows in a (seeded) shuffled order; with ``world`` > 1 processes,
        rank ``rank``'s share of each (every rank draws the same order from the same seed)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = window_rows(order[i:i + batch_size], rank, world)
            if len(idx) == 0:  # a last batch shorter than the ranks: one row whose targets count nothing
                x, y = self._xy(order[i:i + 1])
                yield Batch(x, torch.full_like(y, PAD_ID), None, False)
                continue
            x, y = self._xy(idx)
            yield Batch(x, y, None, False)


class WindowData(WindowLayout):
    """Independent sequences (original): rows of [N, S] tokens -> inputs [:, :-1], targets [:, 1:]."""

    def __init__(self, tokens: torch.Tensor, target_tokens: Optional[torch.Tensor] = None) -> None:
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
            raise DataError(f"need a non-empty [N, S>=2] token tensor, got shape {tuple(tokens.shape)}")
        tt = tokens if target_tokens is None else target_tokens
        self.x, self.y = tokens[:, :-1].contiguous(), tt[:, 1:].contiguous()
        # BOS is never a prediction target.
        self.y = self.y.masked_fill(self.y == BOS_ID, PAD_ID)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def seq_len(self) -> int:
        return self.x.shape[1]

    def num_targets(self) -> int:
        return int((self.y != PAD_ID).sum())

    def content_hash(self) -> str:
        return tensor_sha256(self.x, self.y)

    def _xy(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


class StreamLayout:
    """How ``len(self)`` tokens split into parallel streams of ``seq_len`` windows (lists and memory maps alike)."""

    seq_len: int

    def streams_for(self, batch_size: int) -> int:
        # At least two windows per stream, so small corpora still make full-length windows.
        return max(1, min(batch_size, (len(self) - 1) // (2 * self.seq_len)))

    def num_batches(self, batch_size: int) -> int:
        B = self.streams_for(batch_size)
        return -(-((len(self) - 1) // B) // self.seq_len)


class StreamData(StreamLayout):
    """One token stream split into B parallel streams, read in consecutive windows of ``seq_len``.

    The trainer carries each stream's context from one window to the next (truncated BPTT) and
    zeroes it where ``reset`` is True. Targets at reset positions (the next segment's BOS) are ignored.
    """

    stateful = True

    def __init__(self, tokens: torch.Tensor, resets: torch.Tensor, seq_len: int,
                 target_tokens: Optional[torch.Tensor] = None) -> None:
        if tokens.ndim != 1 or tokens.numel() < 2:
            raise DataError(f"need a 1-D stream of >= 2 tokens, got shape {tuple(tokens.shape)}")
        self.tokens, self.resets, self.seq_len = tokens, resets.bool(), seq_len
        tgt = tokens if target_tokens is None else target_tokens
        self.targets = tgt.masked_fill(self.resets | (tgt == BOS_ID), PAD_ID)

    def __len__(self) -> int:
        return self.tokens.numel()

    def num_targets(self) -> int:
        return int((self.targets[1:] != PAD_ID).sum())

    def content_hash(self) -> str:
        return tensor_sha256(self.tokens, self.resets, self.targets, torch.tensor([self.seq_len]))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        """Consecutive windows of the ``streams_for(batch_size)`` parallel streams (the global batch); with
        ``world`` > 1 processes, rank ``rank``'s block of those streams. ``shuffle`` / ``seed`` do nothing:
        a stream is read in order."""
        B = self.streams_for(batch_size)
        n = (len(self) - 1) // B
        T = self.seq_len
        x_all = self.tokens[: B * n].view(B, n)
        y_all = self.targets[1: B * n + 1].view(B, n)
        r_all = self.resets[: B * n].view(B, n).clone()
        r_all[:, 0] = True  # each stream starts fresh
        if world > 1:
            rows = stream_rows(B, rank, world)
            x_all, y_all, r_all = (a[rows.start:rows.stop] for a in (x_all, y_all, r_all))
        for i in range(0, n, T):
            x, y, r = x_all[:, i:i + T], y_all[:, i:i + T], r_all[:, i:i + T]
            if x.shape[1] < T:  # keep static shapes: pad the last window, padded targets are ignored
                pad = T - x.shape[1]
                x = torch.nn.functional.pad(x, (0, pad), value=PAD_ID)
                y = torch.nn.functional.pad(y, (0, pad), value=PAD_ID)
                r = torch.nn.functional.pad(r, (0, pad), value=False)
            yield Batch(x.contiguous(), y.contiguous(), r.contiguous(), i > 0)


Dataset = Union[WindowData, StreamData]

"""Training batches cut from a memory-mapped token file: the same windows and streams as
``WindowData`` / ``StreamData`` build from lists, without holding the corpus (or its windows) in memory.

Each batch is gathered from the map when it is asked for, so memory stays at the index arrays
(16 bytes a window, 8 a reset) whatever the corpus's size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from ..config import BOS_ID, PAD_ID
from ..runtime.distributed import stream_rows
from .batching import Batch, StreamLayout, WindowLayout
from .sources import MIN_WORDS, DataError
from .token_cache import HEADING, LONG, TokenFile

CHUNK = 1 << 22  # tokens scanned at a time when counting targets


def _hash(tf: TokenFile, *params) -> str:
    return hashlib.sha256(f"{tf.sha256}|{params}".encode()).hexdigest()


def _int64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64))


class TokenWindows(WindowLayout):
    """The original windows over each document of >= 5 words: ``max_seq_length`` tokens, stride half of
    it, PAD-padded, one more window where the last full one stops short (``batching.make_windows``)."""

    def __init__(self, tf: TokenFile, max_seq_length: int) -> None:
        S, stride = max_seq_length, max(1, max_seq_length // 2)
        long = (tf.flags & LONG) != 0
        starts, ends = np.asarray(tf.offsets[:-1])[long], np.asarray(tf.offsets[1:])[long]
        if len(starts) == 0:
            raise DataError(f"no document with >= {MIN_WORDS} words to train on in {tf.meta.get('corpus')} "
                            f"{tf.meta.get('split')}")
        L = ends - starts
        full = np.where(L > S, (L - S) // stride + 1, 1)
        last = (full - 1) * stride
        count = full + ((L > S) & (last + S < L))
        first = np.repeat(np.cumsum(count) - count, count)
        self.starts = np.repeat(starts, count) + (np.arange(int(count.sum())) - first) * stride
        self.ends = np.repeat(ends, count)
        self.tf, self.S = tf, S
        self._offsets = np.arange(S, dtype=np.int64)
        self._targets = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def seq_len(self) -> int:
        return self.S - 1

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Windows ``idx`` as an [len(idx), S] int64 array."""
        starts, ends = self.starts[idx], self.ends[idx]
        tokens, S = self.tf.tokens, self.S
        if len(tokens) >= S and starts.max(initial=0) <= len(tokens) - S:
            w = np.lib.stride_tricks.sliding_window_view(tokens, S)[starts].astype(np.int64)
        else:  # a window reaching past the last token (only at the very end)
            w = tokens[np.minimum(starts[:, None] + self._offsets, len(tokens) - 1)].astype(np.int64)
        w[self._offsets >= (ends - starts)[:, None]] = PAD_ID
        return w

    def _xy(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.rows(idx.numpy())
        y = w[:, 1:]
        y = np.where(y == BOS_ID, PAD_ID, y)  # BOS is never a prediction target
        return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(y))

    def num_targets(self) -> int:
        if self._targets is None:
            step = max(1, CHUNK // self.S)
            self._targets = sum(int(np.isin(self.rows(np.arange(i, min(i + step, len(self))))[:, 1:],
                                            (PAD_ID, BOS_ID), invert=True).sum()) for i in range(0, len(self), step))
        return self._targets

    def content_hash(self) -> str:
        return _hash(self.tf, "windows", self.S)


class TokenStream(StreamLayout):
    """The corpus as one token stream in B parallel streams (``StreamData``), read from the map: the
    context resets at the very start, at each article heading (``reset_at_articles``) or at every
    document (``reset_every_line``); targets at resets and at BOS are ignored."""

    stateful = True

    def __init__(self, tf: TokenFile, seq_len: int, reset_at_articles: bool = True,
                 reset_every_line: bool = False) -> None:
        if len(tf) < 4:
            raise DataError(f"the token stream of {tf.meta.get('corpus')} {tf.meta.get('split')} is empty")
        doc_starts = np.asarray(tf.offsets[:-1])
        if reset_every_line:
            r = doc_starts
        elif reset_at_articles:
            r = doc_starts[(tf.flags & HEADING) != 0]
        else:
            r = doc_starts[:0]
        self.reset_pos = np.union1d(np.zeros(1, dtype=np.int64), r).astype(np.int64)
        self.tf, self.seq_len = tf, seq_len
        self.params = (reset_at_articles, reset_every_line)
        self._targets = None

    def __len__(self) -> int:
        return len(self.tf)

    def num_targets(self) -> int:
        if self._targets is None:
            t = self.tf.tokens
            self._targets = sum(int(np.isin(t[i:i + CHUNK], (PAD_ID, BOS_ID), invert=True).sum())
                                for i in range(1, len(t), CHUNK))
            # resets hold a document's BOS, except where a document was empty of text: none are
            self._targets -= int((~np.isin(t[self.reset_pos[self.reset_pos >= 1]], (PAD_ID, BOS_ID))).sum())
        return self._targets

    def content_hash(self) -> str:
        return _hash(self.tf, "stream", self.seq_len, self.params)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        """As ``StreamData.batches``: consecutive windows of the parallel streams, rank ``rank``'s block."""
        B = self.streams_for(batch_size)
        n = (len(self) - 1) // B
        T = self.seq_len
        rows = range(B) if world == 1 else stream_rows(B, rank, world)
        x_all = self.tf.tokens[: B * n].reshape(B, n)[rows.start:rows.stop]
        y_all = self.tf.tokens[1: B * n + 1].reshape(B, n)[rows.start:rows.stop]
        row_start = np.arange(rows.start, rows.stop, dtype=np.int64) * n
        R = self.reset_pos
        for i in range(0, n, T):
            t = min(T, n - i)
            x = np.zeros((len(rows), T), dtype=np.int64)  # PAD past the end keeps the shapes static
            y = np.zeros((len(rows), T), dtype=np.int64)
            x[:, :t] = x_all[:, i:i + t]
            y[:, :t] = y_all[:, i:i + t]
            y[y == BOS_ID] = PAD_ID  # every reset is a document's BOS, so this also ignores the resets
            r = np.zeros((len(rows), T), dtype=bool)
            lo, hi = np.searchsorted(R, row_start + i), np.searchsorted(R, row_start + i + t)
            count = hi - lo
            if count.any():
                k = np.repeat(np.arange(len(rows)), count)
                at = R[np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count) + np.repeat(lo, count)]
                r[k, at - row_start[k] - i] = True
            if i == 0:
                r[:, 0] = True  # each stream starts fresh
            yield Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(r), i > 0)

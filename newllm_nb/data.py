"""WikiText-2 and Dolly-15k: loading (local path -> hub -> bundled sample) and seed-compatible batching.

Source order for both loaders: an explicit local ``path``; else ``datasets.load_dataset`` from the
Hugging Face hub; else, after one printed line saying the hub is unreachable, the samples bundled
in ``data/`` (our own writing in the same layout / schema, for offline runs and CI).

Three ways to cut text into batches:

* ``windows`` (the seed): each paragraph / example is its own sequence, cut into windows of
  ``max_seq_length`` with stride ``max_seq_length // 2`` and padded with PAD=0; context starts at 0.
* ``stream`` (stateful BPTT): the corpus is one token stream split into B parallel streams;
  consecutive windows carry the context forward, optionally reset at article boundaries.
* ``packed`` (Dolly): examples joined into full windows with the context reset at each example
  start, so no compute goes to padding.

In every mode inputs are tokens[:-1] and targets tokens[1:]; a target of PAD is ignored by the loss.
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

from .config import BOS_ID, EOS_ID, PAD_ID, DataConfig


def _find_data_dir() -> Path:
    """$NEWLLM_DATA_DIR, else the repo's data/ (editable install), else a Colab clone's data/."""
    candidates = [os.environ.get("NEWLLM_DATA_DIR"), Path(__file__).resolve().parent.parent / "data",
                  Path.cwd() / "newllm-nb" / "data", Path("/content/newllm-nb/data")]
    for c in candidates:
        if c and (Path(c) / "dolly-sample.jsonl").exists():
            return Path(c)
    return Path(__file__).resolve().parent.parent / "data"


DATA_DIR = _find_data_dir()
WIKITEXT_SAMPLE = DATA_DIR / "wikitext-sample"
DOLLY_SAMPLE = DATA_DIR / "dolly-sample.jsonl"
DOLLY_FIELDS = ("instruction", "context", "response", "category")
MIN_WORDS = 5  # the seed skipped WikiText lines with fewer words


class DataError(ValueError):
    """A dataset that is missing, empty, unreadable or malformed."""


# ---------------------------------------------------------------------------------------------------
# Hub reachability: answer in about a second instead of letting load_dataset retry for ~26 s.
# ---------------------------------------------------------------------------------------------------
def hub_offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 1.5, host: str = "huggingface.co") -> bool:
    """False when offline mode is requested or huggingface.co:443 does not answer within ``timeout``."""
    if hub_offline_requested():
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_from_hub(*args, **kwargs):
    """``datasets.load_dataset`` or None (printing why) when the hub or the library is unavailable."""
    try:
        import datasets  # noqa: F401  (lazy: the GPU box and minimal installs lack it)
    except ImportError:
        print("`datasets` is not installed (pip install datasets): using the bundled sample in data/")
        return None
    if not hub_reachable():
        print("Hugging Face hub unreachable (or HF_HUB_OFFLINE set): using the bundled sample in data/")
        return None
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except Exception as e:  # network hiccups, auth, renamed datasets: fall back, say why
        print(f"load_dataset{args} failed ({type(e).__name__}: {e}): using the bundled sample in data/")
        return None


def read_text(path: Union[str, Path]) -> str:
    """Read a UTF-8 text file with clear errors for missing, empty or non-UTF-8 files."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset file not found: {p}")
    if p.is_dir():
        raise DataError(f"expected a file, got a directory: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from e
    if not text.strip():
        raise DataError(f"dataset file is empty: {p}")
    return text


# ---------------------------------------------------------------------------------------------------
# WikiText
# ---------------------------------------------------------------------------------------------------
@dataclass
class TextSplits:
    train: list
    valid: list
    test: list = field(default_factory=list)
    source: str = ""


def _wikitext_files(folder: Path) -> dict:
    found = {}
    for split, names in {"train": ("wiki.train", "train"), "valid": ("wiki.valid", "valid", "validation"),
                         "test": ("wiki.test", "test")}.items():
        for name in names:
            for ext in (".raw", ".tokens", ".txt"):
                if (folder / f"{name}{ext}").exists():
                    found.setdefault(split, folder / f"{name}{ext}")
    return found


def split_lines(lines: Sequence[str], frac: float = 0.9) -> tuple[list, list]:
    """First ``frac`` of the lines for training, the rest for evaluation (the offline benchmark split)."""
    k = int(len(lines) * frac)
    return list(lines[:k]), list(lines[k:])


def load_wikitext(path: Optional[Union[str, Path]] = None, max_examples: Optional[int] = None) -> TextSplits:
    """WikiText lines (a paragraph a line, raw or tokenized variant).

    ``path`` may be a folder with ``wiki.{train,valid,test}.{raw,tokens}`` (or ``train/valid/test.txt``)
    or a single file, whose first 90% of lines train and last 10% validate.
    """
    if path is not None:
        p = Path(path)
        if p.is_dir():
            files = _wikitext_files(p)
            if "train" not in files:
                raise DataError(f"no wiki.train.raw / wiki.train.tokens / train.txt in {p}")
            parts = {k: read_text(v).splitlines() for k, v in files.items()}
            if "valid" not in parts:
                parts["train"], parts["valid"] = split_lines(parts["train"])
            splits = TextSplits(parts["train"], parts["valid"], parts.get("test", []), source=f"local:{p}")
        else:
            train, valid = split_lines(read_text(p).splitlines())
            splits = TextSplits(train, valid, [], source=f"local:{p}")
    else:
        ds = _load_from_hub("wikitext", "wikitext-2-raw-v1")
        if ds is not None:
            splits = TextSplits(list(ds["train"]["text"]), list(ds["validation"]["text"]),
                                list(ds["test"]["text"]), source="hub:wikitext-2-raw-v1")
        else:
            splits = load_wikitext(WIKITEXT_SAMPLE)
            splits.source = "sample:data/wikitext-sample"
    if max_examples is not None:
        splits.train = _cap_paragraphs(splits.train, max_examples)
        splits.valid = _cap_paragraphs(splits.valid, max(2, max_examples // 4))
    if not any(len(x.split()) >= MIN_WORDS for x in splits.train):
        raise DataError(f"WikiText training split from {splits.source} has no line with >= {MIN_WORDS} words")
    return splits


def _cap_paragraphs(lines: list, n: int) -> list:
    out, kept = [], 0
    for line in lines:
        out.append(line)
        kept += len(line.split()) >= MIN_WORDS
        if kept >= n:
            break
    return out


def make_windows(ids: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Seed windows over one encoded paragraph: length ``max_seq_length``, stride half of it, PAD-padded.

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


def is_article_heading(line: str) -> bool:
    s = line.strip()
    return s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def wikitext_stream(lines: Sequence[str], tokenizer, reset_at_articles: bool = True, reset_every_line: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-empty lines as one token stream (BOS ... EOS per line) and a reset flag per token
    (True at the very start, at each article when ``reset_at_articles``, at every line when
    ``reset_every_line``: the seed's conditioning, each paragraph from a zero context)."""
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


# ---------------------------------------------------------------------------------------------------
# Dolly (and any instruction dataset with a field mapping)
# ---------------------------------------------------------------------------------------------------
@dataclass
class RecordSplits:
    train: list
    valid: list
    source: str = ""
    skipped: int = 0


def read_jsonl(path: Union[str, Path], field_map: Optional[dict] = None) -> tuple[list[dict], int]:
    """Records from a jsonl file, renamed through ``field_map`` (ours -> theirs).

    Policy for bad lines: a line that is not JSON, or a record without instruction/response text,
    is skipped and counted; one printed line gives the count and the first line numbers. A file with
    no usable record raises DataError.
    """
    fmap = {k: k for k in DOLLY_FIELDS}
    fmap.update(field_map or {})
    text = read_text(path)
    records, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("not an object")
        except ValueError:
            bad.append(n)
            continue
        rec = {k: raw.get(v) for k, v in fmap.items()}
        if not isinstance(rec["instruction"], str) or not isinstance(rec["response"], str) \
                or not rec["instruction"].strip() or not rec["response"].strip():
            bad.append(n)
            continue
        rec["context"] = rec["context"] if isinstance(rec["context"], str) else ""
        rec["category"] = rec["category"] if isinstance(rec["category"], str) else "unknown"
        records.append(rec)
    if bad:
        print(f"{path}: skipped {len(bad)} malformed line(s) (not JSON, or missing instruction/response), "
              f"first at line(s) {bad[:5]}")
    if not records:
        raise DataError(f"{path}: no usable record (need fields {fmap['instruction']!r} and {fmap['response']!r})")
    return records, len(bad)


def split_records(records: list, valid_frac: float = 0.1, seed: int = 42) -> tuple[list, list]:
    """The seed's 90/10 split: a shuffle with ``random.Random(seed)``, last 10% for validation."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_valid = max(1, int(len(records) * valid_frac)) if len(records) > 1 else 0
    return [records[i] for i in idx[n_valid:]], [records[i] for i in idx[:n_valid]]


def load_instructions(path: Optional[Union[str, Path]] = None, hub_name: Optional[str] = None,
                      field_map: Optional[dict] = None, max_examples: Optional[int] = None,
                      hub_split: str = "train") -> RecordSplits:
    """Any instruction dataset: a local jsonl or a hub dataset, fields renamed by ``field_map``
    (e.g. ``{"context": "input", "response": "output"}`` for Alpaca-style sets)."""
    skipped = 0
    if path is not None:
        records, skipped = read_jsonl(path, field_map)
        source = f"local:{path}"
    else:
        ds = _load_from_hub(hub_name) if hub_name else None
        if ds is not None:
            fmap = {k: k for k in DOLLY_FIELDS}
            fmap.update(field_map or {})
            records = [{k: (row.get(v) or ("unknown" if k == "category" else "")) for k, v in fmap.items()}
                       for row in ds[hub_split]]
            records = [r for r in records if str(r["instruction"]).strip() and str(r["response"]).strip()]
            source = f"hub:{hub_name}"
        else:
            records, skipped = read_jsonl(DOLLY_SAMPLE)
            source = "sample:data/dolly-sample.jsonl"
    if max_examples is not None:
        records = records[:max_examples]
    if not records:
        raise DataError(f"instruction dataset from {source} is empty")
    train, valid = split_records(records)
    return RecordSplits(train, valid, source, skipped)


def load_dolly(path: Optional[Union[str, Path]] = None, max_examples: Optional[int] = None) -> RecordSplits:
    """Dolly-15k records (instruction / context / response / category), split 90/10 with seed 42."""
    return load_instructions(path, "databricks/databricks-dolly-15k", None, max_examples)


def dolly_prompt(instruction: str, context: str = "") -> str:
    """The training format up to and including ``Response:`` (Context only when non-empty)."""
    ctx = f" Context: {context.strip()}" if context and context.strip() else ""
    return f"Instruction: {instruction.strip()}{ctx} Response:"


def dolly_text(rec: dict) -> str:
    """``Instruction: {instruction} Context: {context} Response: {response}`` (the seed's format)."""
    return f"{dolly_prompt(rec['instruction'], rec.get('context') or '')} {rec['response'].strip()}"


def encode_example(rec: dict, tokenizer) -> tuple[list[int], int]:
    """[BOS] prompt response [EOS] and the index where the response's tokens start."""
    prompt = tokenizer.encode(dolly_prompt(rec["instruction"], rec.get("context") or ""), add_special=False)
    response = tokenizer.encode(" " + rec["response"].strip(), add_special=False)
    return [BOS_ID, *prompt, *response, EOS_ID], 1 + len(prompt)


def dolly_sequences(records: Sequence[dict], tokenizer, max_seq_length: int, response_only: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed processing: one row per example, truncated / padded to ``max_seq_length``.
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
        raise DataError("no Dolly example to train on")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(tgt_rows, dtype=torch.long)


def dolly_stream(records: Sequence[dict], tokenizer, response_only: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples joined into one stream (packing), a reset at each example's BOS, and the target stream."""
    ids, resets, tgt = [], [], []
    for rec in records:
        enc, start = encode_example(rec, tokenizer)
        ids.extend(enc)
        resets.extend([True] + [False] * (len(enc) - 1))
        tgt.extend([PAD_ID] * start + enc[start:] if response_only else enc)
    if not ids:
        raise DataError("no Dolly example to pack")
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(resets, dtype=torch.bool),
            torch.tensor(tgt, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    x: torch.Tensor  # [B, T] input ids
    y: torch.Tensor  # [B, T] target ids, PAD = ignored
    reset: Optional[torch.Tensor]  # [B, T] bool or None
    carry: bool  # True: start from the previous batch's final context (stateful streams)


class WindowData:
    """Independent sequences (seed): rows of [N, S] tokens -> inputs [:, :-1], targets [:, 1:]."""

    stateful = False

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

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i:i + batch_size]
            yield Batch(self.x[idx], self.y[idx], None, False)


class StreamData:
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

    def streams_for(self, batch_size: int) -> int:
        # At least two windows per stream, so small corpora still make full-length windows.
        return max(1, min(batch_size, (len(self) - 1) // (2 * self.seq_len)))

    def num_batches(self, batch_size: int) -> int:
        B = self.streams_for(batch_size)
        return -(-((len(self) - 1) // B) // self.seq_len)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        B = self.streams_for(batch_size)
        n = (len(self) - 1) // B
        T = self.seq_len
        x_all = self.tokens[: B * n].view(B, n)
        y_all = self.targets[1: B * n + 1].view(B, n)
        r_all = self.resets[: B * n].view(B, n).clone()
        r_all[:, 0] = True  # each stream starts fresh
        for i in range(0, n, T):
            x, y, r = x_all[:, i:i + T], y_all[:, i:i + T], r_all[:, i:i + T]
            if x.shape[1] < T:  # keep static shapes: pad the last window, padded targets are ignored
                pad = T - x.shape[1]
                x = torch.nn.functional.pad(x, (0, pad), value=PAD_ID)
                y = torch.nn.functional.pad(y, (0, pad), value=PAD_ID)
                r = torch.nn.functional.pad(r, (0, pad), value=False)
            yield Batch(x.contiguous(), y.contiguous(), r.contiguous(), i > 0)


Dataset = Union[WindowData, StreamData]


# ---------------------------------------------------------------------------------------------------
# One call from a DataConfig to train / valid datasets and a tokenizer
# ---------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    train: Dataset
    valid: Dataset
    tokenizer: object
    source: str
    valid_records: list = field(default_factory=list)  # Dolly: held-out examples (per-category eval, demos)
    info: dict = field(default_factory=dict)


def prepare(cfg: DataConfig, vocab_size: int, tokenizer=None) -> Prepared:
    """Load ``cfg.dataset``, train (or reuse) a tokenizer on its training split, build datasets."""
    from .tokenizer import train_tokenizer

    max_examples = cfg.max_examples  # smoke mode caps this through config.smoke_config
    S = cfg.max_seq_length
    if cfg.dataset == "wikitext":
        sp = load_wikitext(cfg.path, max_examples)
        tok = tokenizer or train_tokenizer(cfg.tokenizer, [x for x in sp.train if x.strip()], vocab_size)
        if cfg.mode == "windows":
            train, valid = (WindowData(wikitext_sequences(s, tok, S)) for s in (sp.train, sp.valid))
        else:
            train, valid = (StreamData(*wikitext_stream(s, tok, cfg.reset_at_articles), seq_len=S - 1)
                            for s in (sp.train, sp.valid))
        return Prepared(train, valid, tok, sp.source)
    if cfg.dataset == "dolly":
        rs = load_dolly(cfg.path, max_examples)
    else:
        rs = load_instructions(cfg.path, cfg.hub_name, cfg.field_map, max_examples)
    tok = tokenizer or train_tokenizer(cfg.tokenizer, [dolly_text(r) for r in rs.train], vocab_size)
    if cfg.mode == "packed" or cfg.mode == "stream":
        def make(recs):
            ids, resets, tgt = dolly_stream(recs, tok, cfg.response_only_loss)
            return StreamData(ids, resets, S - 1, tgt)
    else:
        def make(recs):
            return WindowData(*dolly_sequences(recs, tok, S, cfg.response_only_loss))
    return Prepared(make(rs.train), make(rs.valid), tok, rs.source, valid_records=rs.valid,
                    info={"skipped_records": rs.skipped})

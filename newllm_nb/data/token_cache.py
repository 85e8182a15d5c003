"""Tokenized once: a corpus's token ids in flat files, memory-mapped by every later run, notebook and
torchrun rank (as nanoGPT's ``prepare.py`` writes ``train.bin``).

One cache entry per (corpus content, tokenizer) fingerprint and split, a folder under the cache root:

* ``tokens.bin``: every non-empty document as BOS ... EOS, back to back; uint16 when the vocabulary fits,
  else uint32;
* ``docs.bin``: int64 offsets of the documents in ``tokens.bin`` (one more than documents);
* ``flags.bin``: a uint8 per document: ``LONG`` (>= 5 words, the documents windows are cut from) and
  ``HEADING`` (a WikiText article heading, where a stream's context resets);
* ``meta.json``: sizes and SHA-256 of the three files, the dtype, the tokenizer's hash, the corpus name.

An entry is written in a temporary folder and renamed into place in one step, so a half-written entry
never has the real name. On opening, sizes and checksums are checked; a damaged entry is rebuilt after
one printed line. A lock file makes concurrent processes (torchrun ranks, two notebooks) build an entry
once: the first takes the lock and builds, the others wait and read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..runtime.files import atomic_write_text
from .corpus import Corpus, DocBatch
from .sources import MIN_WORDS, DataError, is_article_heading
from .tokenizer import (
    MAX_COUNTED_WORDS,
    NORMALIZATION,
    WordTokenizer,
    bpe_pieces,
    normalized,
    prune_counts,
    tokenizer_from_json,
    tokenizer_hash,
    train_tokenizer,
)

FORMAT = 1
INT64 = np.dtype(np.int64)
LONG, HEADING = 1, 2
FILES = ("tokens.bin", "docs.bin", "flags.bin")


def cache_root(folder: Optional[Union[str, Path]] = None) -> Path:
    """``folder``, else $NEWLLM_CACHE_DIR, else ~/.cache/newllm_nb."""
    return Path(folder or os.environ.get("NEWLLM_CACHE_DIR") or Path.home() / ".cache" / "newllm_nb").expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class CacheDamaged(Exception):
    """A cache entry that cannot be trusted (missing or unreadable meta, wrong size or checksum)."""


@dataclass
class TokenFile:
    """A verified cache entry, memory-mapped (read-only pages shared by every process that maps it)."""

    path: Path
    tokens: np.ndarray  # [n_tokens] uint16 / uint32
    offsets: np.ndarray  # [n_docs + 1] int64
    flags: np.ndarray  # [n_docs] uint8
    meta: dict

    @property
    def sha256(self) -> str:
        """One hash of the entry's content (its files' checksums)."""
        return hashlib.sha256(json.dumps(self.meta["sha256"], sort_keys=True).encode()).hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(self.meta["sizes"].values())

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def open_entry(path: Path, verify: bool = True) -> TokenFile:
    """Map an entry's files, after checking them against its meta; CacheDamaged says what is wrong."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        sizes, shas, dtype = meta["sizes"], meta["sha256"], np.dtype(meta["dtype"])
    except FileNotFoundError:
        raise CacheDamaged("meta.json is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CacheDamaged(f"meta.json is unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CacheDamaged(f"format {meta.get('format')} is not {FORMAT}")
    for name in FILES:
        f = path / name
        if not f.is_file():
            raise CacheDamaged(f"{name} is missing")
        if f.stat().st_size != sizes[name]:
            raise CacheDamaged(f"{name} has {f.stat().st_size} bytes, its meta says {sizes[name]}")
        if verify and _file_sha(f) != shas[name]:
            raise CacheDamaged(f"{name} does not match its checksum")

    def mapped(name: str, dt) -> np.ndarray:
        if sizes[name] == 0:
            return np.zeros(0, dtype=dt)
        return np.memmap(path / name, dtype=dt, mode="r")

    return TokenFile(path, mapped("tokens.bin", dtype), mapped("docs.bin", np.int64), mapped("flags.bin", np.uint8),
                     meta)


class EntryWriter:
    """Appends encoded documents to a temporary folder; ``commit`` renames it to its key in one step."""

    def __init__(self, root: Path, key: str, dtype: np.dtype) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.final = root / key
        self.tmp = root / f".{key}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        self.tmp.mkdir()
        self.dtype = dtype
        self.files = {n: open(self.tmp / n, "wb") for n in FILES}
        self.hashes = {n: hashlib.sha256() for n in FILES}
        self.n_tokens = 0
        self.n_docs = 0
        self._write("docs.bin", np.zeros(1, dtype=np.int64))

    def _write(self, name: str, arr: np.ndarray) -> None:
        b = arr.tobytes()
        self.files[name].write(b)
        self.hashes[name].update(b)

    def add(self, ids: np.ndarray, lengths: np.ndarray, flags: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        self._write("tokens.bin", ids.astype(self.dtype, copy=False))
        self._write("docs.bin", self.n_tokens + np.cumsum(lengths, dtype=np.int64))
        self._write("flags.bin", flags.astype(np.uint8, copy=False))
        self.n_tokens += int(lengths.sum())
        self.n_docs += len(lengths)

    def commit(self, meta: dict) -> Path:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {**meta, "format": FORMAT, "dtype": self.dtype.name, "n_tokens": self.n_tokens, "n_docs": self.n_docs,
                "sizes": {n: (self.tmp / n).stat().st_size for n in FILES},
                "sha256": {n: h.hexdigest() for n, h in self.hashes.items()}}
        with open(self.tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if self.final.exists():  # a damaged entry (checked by the caller under the lock) gives way
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` across processes (POSIX ``flock``; no lock where there is none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------
# Encoding in batches, on several cores
# ---------------------------------------------------------------------------------------------------
_WORKER_TOKENIZER = None


def _init_worker(tok_json: Optional[str]) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer_from_json(tok_json) if tok_json else None


def encode_docs(tokenizer, docs: list, dtype: np.dtype = INT64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty documents of ``docs``, stripped and encoded (BOS ... EOS): (ids, lengths, flags)."""
    kept = [s for s in (d.strip() for d in docs) if s]
    ids, lengths = tokenizer.encode_flat(kept)
    flags = np.fromiter(((LONG if len(s.split(None, MIN_WORDS)) >= MIN_WORDS else 0)
                         | (HEADING if is_article_heading(s) else 0) for s in kept), dtype=np.uint8, count=len(kept))
    return ids, lengths, flags


def _encode_job(job: tuple) -> tuple:
    split, docs, nbytes, dtype = job
    return (split, nbytes, *encode_docs(_WORKER_TOKENIZER, docs, np.dtype(dtype)))


def _count_job(docs: list) -> Counter:
    c: Counter = Counter()
    for d in docs:
        c.update(normalized(d, NORMALIZATION).lower().split())
    return c


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, 16))


@contextlib.contextmanager
def _pool(workers: int, tok_json: Optional[str] = None):
    """Worker processes (forked, where the platform has fork) or None for in-process work."""
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        yield None
        return
    # The workers run the tokenizers library single-threaded; saying so keeps it from warning at the fork.
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = mp.get_context("fork").Pool(workers, _init_worker, (tok_json,))
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _ordered(pool, fn, jobs: Iterator, ahead: int) -> Iterator:
    """``pool.imap`` with at most ``ahead`` jobs in flight, so reading never runs ahead of the workers
    by more than a few batches (imap would read the whole corpus into its queue)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(fn, (job,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _progress(total: Optional[int], desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, disable=not show,
                mininterval=0.5, leave=False)


def encoded(tokenizer, batches: Iterator[DocBatch], dtype: np.dtype, workers: int) -> Iterator[tuple]:
    """(split, nbytes, ids, lengths, flags) per batch, in order, encoded in worker processes (BPE without
    the ``regex`` module: in the tokenizers library's own threads)."""
    if workers > 1 and (isinstance(tokenizer, WordTokenizer) or bpe_pieces() is not None):
        with _pool(workers, tokenizer.to_json()) as pool:
            if pool is not None:
                jobs = ((b.split, b.docs, b.nbytes, dtype.str) for b in batches)
                yield from _ordered(pool, _encode_job, jobs, 2 * workers)
                return
    for b in batches:
        yield (b.split, b.nbytes, *encode_docs(tokenizer, b.docs, dtype))


def count_words(texts_batches: Iterator[list], workers: int) -> Counter:
    """Word counts of every document, one pass, counted per batch in worker processes and merged in
    order (so ties rank by first appearance, as a single pass would). Bounded: see ``prune_counts``."""
    counts: Counter = Counter()
    with _pool(workers) as pool:
        parts = _ordered(pool, _count_job, texts_batches, 2 * workers) if pool is not None \
            else map(_count_job, texts_batches)
        for c in parts:
            counts.update(c)
            if len(counts) > MAX_COUNTED_WORDS:
                prune_counts(counts)
    return counts


# ---------------------------------------------------------------------------------------------------
# A corpus -> tokenizer + one token file per split
# ---------------------------------------------------------------------------------------------------
@dataclass
class Tokenized:
    """What ``tokenize_corpus`` gives: the tokenizer and each split's token file."""

    tokenizer: object
    splits: dict  # split -> TokenFile
    built: list  # splits tokenized by this call (the others came from the cache)
    seconds: float
    source_bytes: int  # bytes read to tokenize (0 when everything came from the cache)
    tokenizer_seconds: float = 0.0  # of ``seconds``, training (or loading) the tokenizer


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _wait_for_rank0(lock: Path, timeout: float = 60.0) -> None:
    """Under torchrun, other ranks let rank 0 take the lock first (it creates the lock file)."""
    if _is_main_rank() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    t0 = time.monotonic()
    while not lock.exists() and time.monotonic() - t0 < timeout:
        time.sleep(0.2)


def tokenizer_key(corpus: Corpus, kind: str, vocab_size: int, sample_bytes: Optional[int]) -> str:
    return hashlib.sha256(json.dumps([corpus.fingerprint, kind, vocab_size, sample_bytes]).encode()).hexdigest()[:24]


def _sampled(batches: Iterator[DocBatch], sample_bytes: Optional[int]) -> Iterator[DocBatch]:
    seen = 0
    for b in batches:
        yield b
        seen += b.nbytes
        if sample_bytes is not None and seen >= sample_bytes:
            return


def train_corpus_tokenizer(corpus: Corpus, kind: str, vocab_size: int, root: Path,
                           sample_bytes: Optional[int] = None, workers: Optional[int] = None,
                           show_progress: bool = True):
    """The tokenizer trained on the corpus's training split (or its first ``sample_bytes``), built once
    per (corpus, kind, vocab size, sample) and kept in the cache as JSON."""
    workers = workers or default_workers()
    key = tokenizer_key(corpus, kind, vocab_size, sample_bytes)
    path = root / "tokenizers" / f"{key}.json"
    lock = root / "locks" / f"tokenizer-{key}.lock"
    _wait_for_rank0(lock)
    with locked(lock):
        if path.exists():
            try:
                return tokenizer_from_json(path.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:
                print(f"token cache: tokenizer {path.name} is damaged ({e}): training it again")
        total = sample_bytes if sample_bytes is not None else None
        bar = _progress(total, f"{kind} tokenizer on {corpus.name}", show_progress and _is_main_rank())

        def texts_batches() -> Iterator[list]:
            for b in _sampled(corpus.batches("train"), sample_bytes):
                bar.update(b.nbytes)
                yield b.docs

        try:
            if kind == "word":
                tok = WordTokenizer.from_counts(count_words(texts_batches(), workers), vocab_size, NORMALIZATION)
            else:
                tok = train_tokenizer(kind, (d for docs in texts_batches() for d in docs), vocab_size)
        finally:
            bar.close()
        atomic_write_text(path, tok.to_json())
        return tok


def tokenize_corpus(corpus: Corpus, tokenizer, root: Optional[Union[str, Path]] = None,
                    workers: Optional[int] = None, show_progress: bool = True,
                    splits: Optional[list] = None) -> Tokenized:
    """Each split of ``corpus`` as a memory-mapped token file, tokenized now only where the cache lacks it
    (or holds it damaged). Splits that need tokenizing and can share a pass over the source share one."""
    t0 = time.perf_counter()
    root = cache_root(root)
    workers = workers or default_workers()
    tok_hash = tokenizer_hash(tokenizer)
    splits = splits or corpus.splits
    keys = {s: hashlib.sha256(f"{corpus.fingerprint}|{tok_hash}|{s}".encode()).hexdigest()[:24] for s in splits}
    folder = root / "tokens"
    lock = root / "locks" / f"tokens-{hashlib.sha256(''.join(keys.values()).encode()).hexdigest()[:24]}.lock"
    _wait_for_rank0(lock)
    out, built, nbytes = {}, [], 0
    with locked(lock):
        missing = []
        for s, key in keys.items():
            if not (folder / key).exists():
                missing.append(s)
                continue
            try:
                out[s] = open_entry(folder / key)
            except CacheDamaged as e:
                print(f"token cache: {corpus.name} {s} entry {key} is damaged ({e}): tokenizing it again")
                missing.append(s)
        if missing:
            dtype = token_dtype(tokenizer.vocab_size)
            writers = {s: EntryWriter(folder, keys[s], dtype) for s in missing}
            one_pass = set(missing) == set(corpus.splits) and corpus._single_pass is not None
            sources = [corpus.batches()] if one_pass else [corpus.batches(s) for s in missing]
            known = corpus.total_bytes if one_pass else None
            bar = _progress(known, f"tokenizing {corpus.name}", show_progress and _is_main_rank())
            try:
                for split, n, ids, lengths, flags in encoded(tokenizer, itertools.chain(*sources), dtype, workers):
                    if split in writers:
                        writers[split].add(ids, lengths, flags)
                    bar.update(n)
                    nbytes += n
                for s, w in writers.items():
                    if w.n_tokens == 0:
                        raise DataError(f"the {s} split of {corpus.name} has no text")
                    meta = {"corpus": corpus.name, "split": s, "tokenizer_sha256": tok_hash,
                            "vocab_size": tokenizer.vocab_size, "source_fingerprint": corpus.fingerprint}
                    out[s] = open_entry(w.commit(meta), verify=False)
                    built.append(s)
            except BaseException:
                for w in writers.values():
                    w.abort()
                raise
            finally:
                bar.close()
    return Tokenized(tokenizer, {s: out[s] for s in splits}, built, time.perf_counter() - t0, nbytes)


def prepare_tokens(corpus: Corpus, kind: str, vocab_size: int, root: Optional[Union[str, Path]] = None,
                   tokenizer=None, sample_bytes: Optional[int] = None, workers: Optional[int] = None,
                   show_progress: bool = True) -> Tokenized:
    """Tokenizer (given, or trained once on the training split and cached) + every split's token file."""
    root = cache_root(root)
    t0 = time.perf_counter()
    tok = tokenizer or train_corpus_tokenizer(corpus, kind, vocab_size, root, sample_bytes, workers, show_progress)
    t_tok = time.perf_counter() - t0
    res = tokenize_corpus(corpus, tok, root, workers, show_progress)
    res.seconds, res.tokenizer_seconds = time.perf_counter() - t0, t_tok
    return res


"""Any text corpus, read as a stream of documents: local ``.txt`` / ``.jsonl`` / ``.parquet`` files (a file,
a folder or a glob) or a Hugging Face hub dataset through ``datasets`` streaming.

Nothing the size of the corpus is held in memory: every reader yields batches of documents (a line of a
text file, a record's text field, a hub row's text field) together with the bytes they took, so the
callers can count, tokenize and show MB/s as they go.

Splits: the corpus's own where it has them (a hub dataset's ``validation`` / ``test``; a folder with
``train`` / ``valid`` / ``test`` files), else a deterministic held-out fraction: the last ``valid_frac``
of the documents, in file order (a single WikiText file gives its last 10% of lines to validation).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .sources import DataError, HubUnavailable, hub_cause, hub_endpoint, require_hub

TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text")
BATCH_BYTES = 1 << 20  # documents are handed on in batches of about this much text
MAX_LINE_BYTES = 1 << 28
VALID_NAMES = ("validation", "valid", "val", "dev")
SPLIT_FILES = {"train": ("wiki.train", "train"), "valid": ("wiki.valid", "valid", "validation"),
               "test": ("wiki.test", "test")}


@dataclass
class DocBatch:
    """Consecutive documents of one split and the number of source bytes they came from."""

    split: str
    docs: list
    nbytes: int


@dataclass
class Corpus:
    """A named text corpus: where it is, how to read each split, and a fingerprint of its content."""

    name: str  # what the user named, shown wherever results are shown
    fingerprint: str  # changes whenever the text would
    total_bytes: Optional[int]  # source bytes of one full pass (progress bars), None when unknown
    _passes: dict = field(repr=False, default_factory=dict)  # split -> callable() -> Iterator[DocBatch]
    _single_pass: Optional[object] = field(repr=False, default=None)  # callable() over all splits at once

    @property
    def splits(self) -> list:
        return list(self._passes)

    def batches(self, split: Optional[str] = None) -> Iterator[DocBatch]:
        """One pass over ``split`` (or over every split, each batch labelled with its own)."""
        if split is not None:
            yield from self._passes[split]()
        elif self._single_pass is not None:
            yield from self._single_pass()
        else:
            for s in self._passes:
                yield from self._passes[s]()

    def texts(self, split: str) -> Iterator[str]:
        for b in self.batches(split):
            yield from b.docs


# ---------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------
def expand_paths(spec: str) -> list:
    """A file, a folder (its text / jsonl / parquet files) or a glob, as a sorted list of regular files."""
    p = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in globlib.glob(os.path.expanduser(spec), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"no file matches {spec}")
        return files
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and _kind(f) is not None)
        if not files:
            raise DataError(f"no .txt / .jsonl / .parquet file in {p}")
        return files
    if not p.exists():
        raise DataError(f"dataset file not found: {p}")
    if not p.is_file():
        raise DataError(f"not a regular file: {p}")
    return [p]


def _kind(path: Path) -> Optional[str]:
    s = path.suffix.lower()
    if s in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if s in (".parquet", ".pq"):
        return "parquet"
    if s in TEXT_SUFFIXES or s == "":
        return "txt"
    return None


def read_text_lines(path: Path) -> Iterator[tuple[list, int]]:
    """Lines of a UTF-8 file in batches of about ``BATCH_BYTES``: (lines, bytes). The same lines as
    ``text.splitlines()`` of the whole file; a leading byte-order mark is dropped."""
    offset = 0
    rest = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(BATCH_BYTES)
            buf = rest + chunk
            cut = len(buf) if not chunk else buf.rfind(b"\n") + 1
            if cut == 0 and chunk:
                if len(buf) > MAX_LINE_BYTES:
                    raise DataError(f"{path} has a line longer than {MAX_LINE_BYTES >> 20} MB near byte {offset}: "
                                    f"split it into lines")
                rest = buf
                continue
            part, rest = buf[:cut], buf[cut:]
            text = _decode(path, part, offset)
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]
            if part:
                yield text.splitlines(), len(part)
            offset += len(part)
            if not chunk:
                return


def _decode(path: Path, data: bytes, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {offset + e.start}): convert it to UTF-8") from None


def read_jsonl_texts(path: Path, text_field: str) -> Iterator[tuple[list, int]]:
    """The ``text_field`` of every record of a JSON-lines file, in batches: (texts, bytes)."""
    n = 0
    for lines, nbytes in read_text_lines(path):
        out = []
        for line in lines:
            n += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise DataError(f"{path} line {n} is not JSON") from None
            if not isinstance(rec, dict) or text_field not in rec:
                have = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
                raise DataError(f"{path} line {n} has no field {text_field!r} (it has: {have}): pass the text "
                                f"field's name")
            v = rec[text_field]
            if v is not None and not isinstance(v, str):
                raise DataError(f"{path} line {n}: field {text_field!r} is {type(v).__name__}, not text")
            out.append(v or "")
        yield out, nbytes


def _parquet_file(path: Path, text_field: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(names[:8])}): pass the text "
                        f"field's name")
    return pf


def read_parquet_texts(path: Path, text_field: str) -> Iterator[tuple[list, int]]:
    """The ``text_field`` column of a parquet file, one row group batch at a time: (texts, bytes)."""
    pf = _parquet_file(path, text_field)
    size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    for rb in pf.iter_batches(batch_size=8192, columns=[text_field]):
        texts = [t or "" for t in rb.column(0).to_pylist()]
        yield texts, size * len(texts) // rows


def _file_batches(path: Path, text_field: str) -> Iterator[tuple[list, int]]:
    kind = _kind(path)
    if kind == "jsonl":
        return read_jsonl_texts(path, text_field)
    if kind == "parquet":
        return read_parquet_texts(path, text_field)
    return read_text_lines(path)


def _count_docs(path: Path, text_field: str) -> int:
    """How many documents a file holds (a cheap first pass; parquet from its footer)."""
    if _kind(path) == "parquet":
        return _parquet_file(path, text_field).metadata.num_rows
    return sum(len(docs) for docs, _ in _file_batches(path, text_field))


def _files_fingerprint(files: list, text_field: str) -> str:
    """SHA-256 of the files' bytes (and the text field's name), memoised by (path, size, mtime) so a
    second run does not read the files again."""
    h = hashlib.sha256(f"field={text_field}".encode())
    for f in files:
        h.update(_file_sha256(f).encode())
    return h.hexdigest()


_SHA_MEMO: dict = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def _batched(pieces: Iterator[tuple[list, int]], split: str) -> Iterator[DocBatch]:
    for docs, nbytes in pieces:
        yield DocBatch(split, docs, nbytes)


def _split_folder(files: list) -> Optional[dict]:
    """{split: file} where a folder's files are named train / valid / test (WikiText's layout)."""
    found = {}
    for f in files:
        stem = f.name.split(".")[0] if not f.name.startswith("wiki.") else ".".join(f.name.split(".")[:2])
        for split, names in SPLIT_FILES.items():
            if stem in names:
                found.setdefault(split, f)
    return found if "train" in found and len(found) > 1 else None


def local_corpus(spec: str, text_field: str = "text", valid_frac: float = 0.1,
                 max_docs: Optional[int] = None) -> Corpus:
    """A corpus of local files: ``spec`` is a file, a folder or a glob. A folder whose files are named
    train / valid / test (``wiki.train.raw`` ...) gives those splits; otherwise the last ``valid_frac``
    of all documents (in sorted file order) is held out for validation."""
    files = expand_paths(spec)
    fp = _files_fingerprint(files, text_field)
    total = sum(f.stat().st_size for f in files)
    named = _split_folder(files) if Path(spec).expanduser().is_dir() else None
    if named:
        passes = {s: (lambda f=f, s=s: _capped(_batched(_file_batches(f, text_field), s), max_docs))
                  for s, f in named.items()}
        return Corpus(f"local {spec}", _h(fp, "named", max_docs), total, passes)
    counts = [_count_docs(f, text_field) for f in files]
    n = sum(counts)
    if n == 0:
        raise DataError(f"{spec}: no text in {len(files)} file(s)")
    n_train = int(n * (1 - valid_frac))

    def routed() -> Iterator[DocBatch]:
        seen = 0
        for f in files:
            for docs, nbytes in _file_batches(f, text_field):
                cut = min(len(docs), max(0, n_train - seen))
                if cut:
                    yield DocBatch("train", docs[:cut], nbytes * cut // max(1, len(docs)))
                if cut < len(docs):
                    yield DocBatch("valid", docs[cut:], nbytes - nbytes * cut // max(1, len(docs)))
                seen += len(docs)

    def only(split: str) -> Iterator[DocBatch]:
        return (b for b in routed() if b.split == split)

    if max_docs is not None:
        passes = {"train": lambda: _capped(only("train"), max_docs),
                  "valid": lambda: _capped(only("valid"), max(2, max_docs // 4))}
        return Corpus(f"local {spec}", _h(fp, valid_frac, max_docs), total, passes)
    passes = {"train": lambda: only("train"), "valid": lambda: only("valid")}
    return Corpus(f"local {spec}", _h(fp, valid_frac), total, passes, _single_pass=routed)


def _capped(batches: Iterator[DocBatch], max_docs: Optional[int], min_words: int = 5) -> Iterator[DocBatch]:
    """The first documents up to ``max_docs`` of them with >= ``min_words`` words (smoke runs)."""
    if max_docs is None:
        yield from batches
        return
    kept = 0
    for b in batches:
        out = []
        for d in b.docs:
            out.append(d)
            kept += len(d.split(None, min_words)) >= min_words
            if kept >= max_docs:
                break
        yield DocBatch(b.split, out, b.nbytes * len(out) // max(1, len(b.docs)))
        if kept >= max_docs:
            return


def _h(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Hub datasets (``datasets`` streaming)
# ---------------------------------------------------------------------------------------------------
def hub_corpus(repo_id: str, config: Optional[str] = None, text_field: str = "text", split: str = "train",
               revision: Optional[str] = None, valid_frac: float = 0.1, max_docs: Optional[int] = None,
               what_to_do: str = "pass local files with --data-path") -> Corpus:
    """A hub dataset (or a local folder laid out like a hub repo), read with ``datasets`` streaming.

    Its own validation and test splits are used where it has them; otherwise every ``1/valid_frac``-th
    row of ``split`` is held out (the length of a stream is not known before reading it)."""
    local = Path(repo_id).expanduser().is_dir()
    described = f"hub {repo_id}" + (f" {config}" if config else "") + (f"@{revision}" if revision else "")
    dd = _stream_dataset(repo_id, config, revision, local, described, what_to_do)
    _check_split_and_field(dd, repo_id, config, split, text_field)
    own = _own_splits(list(dd), split)
    fp = _h(_hub_version(repo_id, revision, local), config, text_field, split, own.get("valid") or valid_frac,
            max_docs)

    def rows(hub_split: str, keep=None) -> Iterator[tuple[list, int]]:
        return _hub_rows(dd[hub_split], f"{repo_id} split {hub_split}", text_field, keep)

    return Corpus(described, fp, None, _hub_passes(rows, own, split, valid_frac, max_docs))


def _stream_dataset(repo_id: str, config: Optional[str], revision: Optional[str], local: bool, described: str,
                    what_to_do: str):
    """``datasets.load_dataset(..., streaming=True)``; a missing package, an unreachable hub or the hub's own
    error is one line naming the dataset."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {repo_id} from the hub needs `datasets` (pip install datasets)") from None
    if not local:
        try:
            require_hub()
        except HubUnavailable as why:
            raise DataError(f"{why}, and {described} was asked for: connect, or {what_to_do}") from None
    try:
        return datasets.load_dataset(repo_id, config, streaming=True, revision=revision)
    except Exception as e:  # the hub answered: its error is the user's to see, in one line naming the dataset
        raise DataError(f"could not load {described} from {hub_endpoint()} ({hub_cause(e)}): {what_to_do}") from None


def _check_split_and_field(dd, repo_id: str, config: Optional[str], split: str, text_field: str) -> None:
    names = list(dd)
    if split not in names:
        raise DataError(f"{repo_id}{f' ({config})' if config else ''} has no split {split!r} (splits: "
                        f"{', '.join(names)})")
    features = getattr(dd[split], "features", None)
    if features is not None and text_field not in features:
        raise DataError(f"{repo_id}{f' ({config})' if config else ''} has no field {text_field!r} (fields: "
                        f"{', '.join(list(features)[:8])}): pass the text field's name")


def _own_splits(names: list[str], split: str) -> dict[str, str]:
    """Our split -> the dataset's: ``split`` trains, and its own validation and test splits where it has them."""
    own = {"train": split}
    v = next((n for n in VALID_NAMES if n in names and n != split), None)
    if v:
        own["valid"] = v
    if "test" in names and split != "test":
        own["test"] = "test"
    return own


def _hub_rows(stream, described: str, text_field: str, keep=None) -> Iterator[tuple[list, int]]:
    """(texts, their UTF-8 bytes) a batch of 1000 rows of ``stream``; ``keep(row index)`` picks rows."""
    i = 0
    for batch in stream.iter(batch_size=1000):
        if text_field not in batch:
            raise DataError(f"{described} has no field {text_field!r} (fields: "
                            f"{', '.join(list(batch)[:8])}): pass the text field's name")
        texts = [t if isinstance(t, str) else "" for t in batch[text_field]]
        if keep is not None:
            texts = [t for j, t in enumerate(texts, i) if keep(j)]
        i += len(batch[text_field])
        yield texts, sum(len(t.encode("utf-8")) for t in texts)


def _hub_passes(rows, own: dict[str, str], split: str, valid_frac: float, max_docs: Optional[int]) -> dict:
    """Our split -> a function starting a pass over it. Without a validation split of its own, every
    ``1/valid_frac``-th row of ``split`` is validation and the rest train."""
    every = max(2, round(1 / valid_frac)) if valid_frac > 0 else 0

    def not_held_out(j: int) -> bool:
        return j % every != every - 1

    passes = {}
    for ours, theirs in own.items():
        keep = not_held_out if "valid" not in own and every and ours == "train" else None
        passes[ours] = (lambda theirs=theirs, keep=keep, ours=ours:
                        _capped(_batched(rows(theirs, keep), ours), _cap_for(ours, max_docs)))
    if "valid" not in own and every:
        passes["valid"] = (lambda: _capped(_batched(rows(split, lambda j: j % every == every - 1), "valid"),
                                            _cap_for("valid", max_docs)))
    return passes


def _cap_for(split: str, max_docs: Optional[int]) -> Optional[int]:
    return None if max_docs is None else max_docs if split == "train" else max(2, max_docs // 4)


def _hub_version(repo_id: str, revision: Optional[str], local: bool) -> str:
    """What identifies the dataset's content: a local repo's files (names, sizes, mtimes), else the hub's
    commit for ``revision`` (or the revision as named when the hub does not say)."""
    if local:
        root = Path(repo_id).expanduser()
        return _h(*sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                          for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts))
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision).sha or f"{repo_id}@{revision}"
    except Exception:
        return f"{repo_id}@{revision or 'main'}"


def open_corpus(path: Optional[str] = None, hub_id: Optional[str] = None, config: Optional[str] = None,
                text_field: str = "text", split: str = "train", revision: Optional[str] = None,
                valid_frac: float = 0.1, max_docs: Optional[int] = None) -> Corpus:
    """The corpus a user names: local files (``path``: a file, folder or glob) or a hub dataset id."""
    if path is not None:
        return local_corpus(str(path), text_field, valid_frac, max_docs)
    if hub_id:
        return hub_corpus(hub_id, config, text_field, split, revision, valid_frac, max_docs)
    raise DataError("a text corpus needs local files (a file, folder or glob) or a hub dataset id")

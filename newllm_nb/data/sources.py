"""Where text comes from, and parsing it: local path -> Hugging Face hub -> bundled sample.

Source order for every loader: an explicit local ``path``; else ``datasets.load_dataset`` from the
hub; else, after one printed line saying why, the samples bundled in ``data/`` (our own writing in
the same layout / schema, for offline runs and CI).
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union


def _find_data_dir() -> Path:
    """$NEWLLM_DATA_DIR, else the repo's data/ (editable install), else a Colab clone's data/."""
    candidates = [os.environ.get("NEWLLM_DATA_DIR"), Path(__file__).resolve().parents[2] / "data",
                  Path.cwd() / "newllm-nb" / "data", Path("/content/newllm-nb/data")]
    for c in candidates:
        if c and (Path(c) / "dolly-sample.jsonl").exists():
            return Path(c)
    return Path(__file__).resolve().parents[2] / "data"


DATA_DIR = _find_data_dir()
WIKITEXT_SAMPLE = DATA_DIR / "wikitext-sample"
DOLLY_SAMPLE = DATA_DIR / "dolly-sample.jsonl"
INSTRUCTION_FIELDS = ("instruction", "context", "response", "category")
MIN_WORDS = 5  # the original skipped WikiText lines with fewer words


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
        text = p.read_bytes().decode("utf-8-sig")  # a leading byte-order mark is not text
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



def is_article_heading(line: str) -> bool:
    s = line.strip()
    return s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")



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
    fmap = {k: k for k in INSTRUCTION_FIELDS}
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
    """The original's 90/10 split: a shuffle with ``random.Random(seed)``, last 10% for validation."""
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
            fmap = {k: k for k in INSTRUCTION_FIELDS}
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


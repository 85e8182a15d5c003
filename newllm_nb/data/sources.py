"""Where text comes from, and parsing it: local path -> Hugging Face hub -> bundled sample.

Source order for every loader: an explicit local ``path``; else the hub repository ``HUB_DATASETS`` names,
through ``load_hub`` (``datasets.load_dataset``). The samples bundled in ``data/`` (our own writing in the
same layout / schema) are read only when asked for by name, or when the hub cannot be asked at all (offline
mode, unreachable, no ``datasets``), which one printed line says; their source string marks them
(``is_sample``). A hub that answers but fails to load stops the run with one line: no sample stands in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

from ..config import DATA_SOURCES
from ..runtime.files import check_regular_file, text_size_limit


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


def field_names(field_map: Optional[dict] = None) -> dict:
    """Our instruction field -> the dataset's name for it: the same name unless ``field_map`` says otherwise."""
    return {k: k for k in INSTRUCTION_FIELDS} | (field_map or {})
MIN_WORDS = 5  # the original skipped WikiText lines with fewer words


class DataError(ValueError):
    """A dataset that is missing, empty, unreadable or malformed."""


# ---------------------------------------------------------------------------------------------------
# The Hugging Face hub: which repository each dataset name loads, and the one loader they all go through.
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubDataset:
    """A dataset repository on the hub. Ids carry their namespace: huggingface_hub >= 1.0 refuses bare names
    such as ``wikitext``."""

    repo_id: str
    config: Optional[str] = None  # the dataset's configuration (subset), e.g. wikitext-2-raw-v1
    revision: Optional[str] = None  # a branch, tag or commit to pin; None = the repository's main branch
    title: str = ""  # what results call the data

    def with_revision(self, revision: Optional[str]) -> HubDataset:
        return self if not revision else dataclasses.replace(self, revision=revision)

    def describe(self) -> str:
        """'hub Salesforce/wikitext wikitext-2-raw-v1@rev': what a source line says."""
        return f"hub {self.repo_id}{f' {self.config}' if self.config else ''}" \
               f"{f'@{self.revision}' if self.revision else ''}"


HUB_DATASETS = {
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", title="WikiText-2"),
    "dolly": HubDataset("databricks/databricks-dolly-15k", title="Dolly-15k"),
}
SAMPLE_PREFIX = "bundled sample"  # every source string of the bundled samples starts with it (``is_sample``)


def hub_endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` (a mirror) when set, as huggingface_hub reads it, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 1.5) -> bool:
    """False when offline mode is requested or the hub's host (``hub_endpoint``) does not accept a connection
    within ``timeout`` seconds: about a second instead of load_dataset's ~26 s of retries."""
    if hub_offline_requested():
        return False
    url = urlsplit(hub_endpoint())
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:
        return False
    if not url.hostname:
        return False
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class HubUnavailable(Exception):
    """The hub cannot be asked (offline mode, unreachable, or no ``datasets``): the one case for a fallback."""


def require_hub() -> None:
    """Raise ``HubUnavailable`` (with the reason) when the hub cannot be asked."""
    try:
        import datasets  # noqa: F401  (lazy: the GPU box and minimal installs lack it)
    except ImportError:
        raise HubUnavailable("`datasets` is not installed (pip install datasets)") from None
    if hub_offline_requested():
        raise HubUnavailable("offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    if not hub_reachable():
        raise HubUnavailable(f"the Hugging Face hub ({hub_endpoint()}) is unreachable")


def hub_cause(e: Exception) -> str:
    """An exception from the hub or ``datasets`` as one short line."""
    cause = " ".join(f"{type(e).__name__}: {e}".split())
    return cause if len(cause) <= 300 else cause[:297] + "..."


def load_hub(spec: HubDataset, what_to_do: str = "pass --data-path FILE_OR_FOLDER"):
    """``datasets.load_dataset`` of ``spec`` (a ``DatasetDict``).

    Raises ``HubUnavailable`` (with the reason) when the hub cannot be asked; a hub that answers but whose
    dataset does not load raises ``DataError``: one line naming the dataset, the endpoint, the cause and
    ``what_to_do``. Nothing falls back here: callers decide what an unavailable hub means."""
    require_hub()
    from datasets import load_dataset

    try:
        return load_dataset(spec.repo_id, spec.config, revision=spec.revision)
    except Exception as e:  # the hub answered: an error there is the user's to see, never a reason to swap data
        raise DataError(f"could not load {spec.describe()} from {hub_endpoint()} ({hub_cause(e)}): "
                        f"{what_to_do}") from e


def is_sample(source: str) -> bool:
    """True for the source string of a bundled sample."""
    return str(source).startswith(SAMPLE_PREFIX)


def source_tag(dataset: str, source: str) -> str:
    """The data part of a run folder's name: ``wikitext`` (hub), ``wikitext-sample``, ``wikitext-local``."""
    if is_sample(source):
        return f"{dataset}-sample"
    return f"{dataset}-local" if str(source).startswith("local ") else dataset


def _sample_source(name: str, sample: Path) -> str:
    title = HUB_DATASETS[name].title if name in HUB_DATASETS else name
    return f"{SAMPLE_PREFIX} data/{sample.name} (not {title})"


HUB_TODO = "pass --data-path FILE_OR_FOLDER with the data, or ask for the bundled sample (--data-source sample)"


def hub_or_sample(name: str, source: str, sample: Path, revision: Optional[str] = None) -> Optional[HubDataset]:
    """The hub dataset to stream for ``name``, or None where the bundled sample is to be read (the rule of
    ``_hub_or_sample``, without loading anything)."""
    if source not in DATA_SOURCES:
        raise DataError(f"invalid data source {source!r}: choose one of {DATA_SOURCES}")
    if source == "sample":
        return None
    spec = HUB_DATASETS[name].with_revision(revision)
    try:
        require_hub()
    except HubUnavailable as why:
        if source == "hub":
            raise DataError(f"{why}, and {spec.describe()} was asked for: connect, or {HUB_TODO}") from None
        return None  # load_wikitext says so, and reads the sample
    return spec


def _hub_or_sample(name: str, source: str, sample: Path, revision: Optional[str] = None):
    """(DatasetDict, source string) from the hub, or (None, the sample's source string) where the sample is
    to be read: asked for by name (``source="sample"``), or ``source="auto"`` and the hub cannot be asked,
    which one printed line says. ``source="hub"`` never falls back."""
    if source not in DATA_SOURCES:
        raise DataError(f"invalid data source {source!r}: choose one of {DATA_SOURCES}")
    if source == "sample":
        return None, _sample_source(name, sample)
    spec = HUB_DATASETS[name].with_revision(revision)
    todo = HUB_TODO
    try:
        return load_hub(spec, todo), spec.describe()
    except HubUnavailable as why:
        if source == "hub":
            raise DataError(f"{why}, and {spec.describe()} was asked for: connect, or {todo}") from None
        print(f"{why}: training on the {_sample_source(name, sample)}; results say so")
        return None, _sample_source(name, sample)


def read_text(path: Union[str, Path]) -> str:
    """Read a UTF-8 text file with clear errors for missing, empty, non-UTF-8, too large or irregular files."""
    p = Path(path)
    check_regular_file(p, "dataset file", text_size_limit(), DataError)  # before a byte is read
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


def load_wikitext(path: Optional[Union[str, Path]] = None, max_examples: Optional[int] = None,
                  source: str = "auto", revision: Optional[str] = None) -> TextSplits:
    """WikiText lines (a paragraph a line, raw or tokenized variant).

    ``path`` may be a folder with ``wiki.{train,valid,test}.{raw,tokens}`` (or ``train/valid/test.txt``)
    or a single file, whose first 90% of lines train and last 10% validate. Without a path, ``source``
    decides (``config.DATA_SOURCES``): WikiText-2 from the hub (``HUB_DATASETS["wikitext"]``, at ``revision`` if given)
    or the bundled sample.
    """
    if path is not None:
        splits = _wikitext_local(Path(path))
    else:
        ds, where = _hub_or_sample("wikitext", source, WIKITEXT_SAMPLE, revision)
        if ds is not None:
            splits = TextSplits(*(_column(ds, split, "text", where) for split in ("train", "validation", "test")),
                                source=where)
        else:
            splits = _wikitext_local(WIKITEXT_SAMPLE)
            splits.source = where
    if max_examples is not None:
        splits.train = _cap_paragraphs(splits.train, max_examples)
        splits.valid = _cap_paragraphs(splits.valid, max(2, max_examples // 4))
    if not any(len(x.split()) >= MIN_WORDS for x in splits.train):
        raise DataError(f"WikiText training split from {splits.source} has no line with >= {MIN_WORDS} words")
    return splits


def _wikitext_local(p: Path) -> TextSplits:
    if p.is_dir():
        files = _wikitext_files(p)
        if "train" not in files:
            raise DataError(f"no wiki.train.raw / wiki.train.tokens / train.txt in {p}")
        parts = {k: read_text(v).splitlines() for k, v in files.items()}
        if "valid" not in parts:
            parts["train"], parts["valid"] = _split_file(files["train"], parts["train"])
        return TextSplits(parts["train"], parts["valid"], parts.get("test", []), source=f"local {p}")
    train, valid = _split_file(p, read_text(p).splitlines())
    return TextSplits(train, valid, [], source=f"local {p}")


def _split_file(p: Path, lines: list) -> tuple[list, list]:
    """``split_lines`` of one file's lines, saying so when the split, not the file, leaves training no text."""
    train, valid = split_lines(lines)
    if not any(x.strip() for x in train):
        raise DataError(f"{p} has {len(lines)} line(s): one file gives its first 90% of lines to training and the "
                        f"last 10% to validation, which leaves training no text; add lines (a paragraph a line, "
                        f"10 or more), or pass a folder with wiki.train and wiki.valid files")
    return train, valid


def _column(ds, split: str, column: str, where: str) -> list:
    """One column of one split of a loaded DatasetDict, as a list (a missing one is a DataError naming it)."""
    if split not in ds:
        raise DataError(f"{where} has no {split!r} split (it has {sorted(ds)})")
    if column not in ds[split].column_names:
        raise DataError(f"{where} split {split!r} has no {column!r} column (it has {ds[split].column_names})")
    return list(ds[split][column])


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
    fmap = field_names(field_map)
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
                      hub_split: str = "train", source: str = "auto", revision: Optional[str] = None) -> RecordSplits:
    """Any instruction dataset: a local jsonl or a hub dataset, fields renamed by ``field_map``
    (e.g. ``{"context": "input", "response": "output"}`` for Alpaca-style sets). ``hub_name`` is a key of
    ``HUB_DATASETS`` or a hub id ``namespace/name``; only Dolly has a bundled sample to fall back on."""
    skipped = 0
    if path is not None:
        records, skipped = read_jsonl(path, field_map)
        where = f"local {path}"
    else:
        if hub_name is None:
            raise DataError("an instruction dataset needs a local path or a hub dataset id")
        if hub_name in HUB_DATASETS:
            ds, where = _hub_or_sample(hub_name, source, DOLLY_SAMPLE, revision)
        else:
            if "/" not in hub_name.strip("/"):
                raise DataError(f"hub dataset id {hub_name!r} needs its namespace, as 'namespace/name' "
                                f"(e.g. databricks/databricks-dolly-15k)")
            spec = HubDataset(hub_name.strip("/"), revision=revision)
            try:
                ds, where = load_hub(spec), spec.describe()
            except HubUnavailable as why:
                raise DataError(f"{why}, and {spec.describe()} has no bundled sample: connect, or pass "
                                f"--data-path FILE") from None
        if ds is not None:
            fmap = field_names(field_map)
            if hub_split not in ds:
                raise DataError(f"{where} has no {hub_split!r} split (it has {sorted(ds)})")
            missing = [v for k, v in fmap.items() if k in ("instruction", "response")
                       and v not in ds[hub_split].column_names]
            if missing:
                raise DataError(f"{where} has no column {missing} (it has {ds[hub_split].column_names}): "
                                f"map the fields, e.g. response=output")
            records = [{k: (row.get(v) or ("unknown" if k == "category" else "")) for k, v in fmap.items()}
                       for row in ds[hub_split]]
            records = [r for r in records if str(r["instruction"]).strip() and str(r["response"]).strip()]
        else:
            records, skipped = read_jsonl(DOLLY_SAMPLE)
    if max_examples is not None:
        records = records[:max_examples]
    if not records:
        raise DataError(f"instruction dataset from {where} is empty")
    train, valid = split_records(records)
    return RecordSplits(train, valid, where, skipped)


def load_dolly(path: Optional[Union[str, Path]] = None, max_examples: Optional[int] = None,
               source: str = "auto", revision: Optional[str] = None) -> RecordSplits:
    """Dolly-15k records (instruction / context / response / category), split 90/10 with seed 42."""
    return load_instructions(path, "dolly", None, max_examples, source=source, revision=revision)

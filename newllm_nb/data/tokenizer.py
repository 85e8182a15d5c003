"""Tokenizers with one interface: the original's word tokenizer and a byte-level BPE option.

Both reserve PAD/UNK/BOS/EOS = 0/1/2/3, ``encode`` adds BOS and EOS by default, and both
round-trip through JSON (``to_json`` / ``tokenizer_from_json``) so a checkpoint carries its tokenizer.
A shared model's ``tokenizer.json`` is the Hugging Face ``tokenizers`` format of the same tokenizer
(``to_hub_json`` / ``tokenizer_from_hub_json``): ``tokenizers.Tokenizer.from_file`` gives the same ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Optional, Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from ..runtime.files import atomic_write_text

# Distinct words a vocabulary count keeps at most: past it the rarest half is dropped (the top words of
# any vocabulary this package trains are far more frequent than what is dropped), so memory stays bounded
# however many distinct strings a corpus holds.
MAX_COUNTED_WORDS = 1_000_000


def prune_counts(counts: Counter, keep: int = MAX_COUNTED_WORDS // 2) -> None:
    """Keep the ``keep`` most frequent words of ``counts``, in place."""
    top = counts.most_common(keep)
    counts.clear()
    counts.update(dict(top))


_MARK_CHAR = "\x02"  # not whitespace, so str.split keeps it as a word of its own between spaces
_MARK = f" {_MARK_CHAR} "


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special: bool = True) -> list[int]: ...
    def encode_batch(self, texts: Iterable[str], add_special: bool = True) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_json(self) -> str: ...


# Unicode normalisation: NFC. The same text typed or pasted differently (macOS pastes "café" as "cafe" + a
# combining accent, NFD) must give the same tokens, and NFC makes canonically equivalent text identical
# without changing what it says. NFKC would also fold compatibility characters ("x²" -> "x2", "ﬁ" -> "fi",
# full-width letters, circled digits), which loses meaning and cannot be undone in what the model generates.
# Both tokenizers apply it to every text they train on and encode, and record it in their JSON (so in their
# hash, the tokenizer's fingerprint); a tokenizer that records none (older checkpoints) normalises nothing.
NORMALIZATION = "NFC"


def normalized(text: str, form: Optional[str]) -> str:
    """``text`` as a tokenizer with normalisation ``form`` (None: none) reads it; lone surrogates become U+FFFD."""
    text = clean_text(text)
    return unicodedata.normalize(form, text) if form else text


class WordTokenizer:
    """Lowercase, whitespace split, the top ``vocab_size - 4`` words by frequency (the original's)."""

    kind = "word"

    def __init__(self, words: list[str], normalization: Optional[str] = None) -> None:
        self.itos = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.normalization = normalization

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000,
              normalization: Optional[str] = NORMALIZATION) -> WordTokenizer:
        """One pass over ``texts`` (any iterable, read once) in bounded memory: see ``count_words``."""
        counts: Counter = Counter()
        for text in texts:
            counts.update((normalized(text, normalization) if normalization else text).lower().split())
            if len(counts) > MAX_COUNTED_WORDS:
                prune_counts(counts)
        return cls.from_counts(counts, vocab_size, normalization)

    @classmethod
    def from_counts(cls, counts: Counter, vocab_size: int = 1000,
                    normalization: Optional[str] = None) -> WordTokenizer:
        """The ``vocab_size - 4`` most frequent words (ties: the word seen first)."""
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
        for tok in SPECIAL_TOKENS:
            counts.pop(tok, None)
        if not counts:
            raise ValueError("cannot build a vocabulary: the training texts contain no words")
        return cls([w for w, _ in counts.most_common(vocab_size - len(SPECIAL_TOKENS))], normalization)

    def encode_flat(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
        """``encode`` of each text, back to back in one int64 array, and the lengths: the batch is
        lowered and split once, with a marker word between texts that cannot occur in any of them."""
        if not texts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        joined = _MARK + _MARK.join(normalized(t, self.normalization) for t in texts)
        if joined.count(_MARK_CHAR) != len(texts):  # the marker occurs in the text: encode one by one
            encs = self.encode_batch(texts)
            lengths = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
            return np.fromiter(itertools.chain.from_iterable(encs), dtype=np.int64, count=int(lengths.sum())), lengths
        words = joined.lower().split()
        words.append(_MARK_CHAR)
        ids = np.fromiter(map(self.stoi.get, words, itertools.repeat(UNK_ID)), dtype=np.int64, count=len(words))
        marks = np.flatnonzero(np.fromiter(map(_MARK_CHAR.__eq__, words), dtype=bool, count=len(words)))
        return _with_specials(np.delete(ids, marks), np.diff(marks) - 1)

    def encode_batch(self, texts: Iterable[str], add_special: bool = True) -> list[list[int]]:
        get, unk, form = self.stoi.get, UNK_ID, self.normalization
        if add_special:
            return [[BOS_ID, *[get(w, unk) for w in normalized(t, form).lower().split()], EOS_ID] for t in texts]
        return [[get(w, unk) for w in normalized(t, form).lower().split()] for t in texts]

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = [self.stoi.get(w, UNK_ID) for w in normalized(text, self.normalization).lower().split()]
        return [BOS_ID, *ids, EOS_ID] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        specials = (PAD_ID, BOS_ID, EOS_ID)
        return " ".join(self.itos[i] if 0 <= i < self.vocab_size else "<unk>" for i in map(int, ids)
                        if i not in specials)

    def decode_token(self, token_id: int) -> str:
        """The text a streaming generator should append for one token."""
        return "" if token_id in (PAD_ID, BOS_ID, EOS_ID) else " " + self.decode([token_id])

    def to_json(self) -> str:
        d = {"kind": self.kind, "words": self.itos[len(SPECIAL_TOKENS):]}
        return json.dumps({**d, "normalization": self.normalization} if self.normalization else d)

    def to_hub_json(self) -> str:
        """The same vocabulary as a ``tokenizers`` WordLevel model: lowercase, whitespace split, BOS/EOS added."""
        tok = HFTokenizer(models.WordLevel(vocab=self.stoi, unk_token=SPECIAL_TOKENS[UNK_ID]))
        tok.normalizer = _hub_normalizer(self.normalization, normalizers.Lowercase())
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return _with_bos_eos(tok)


class BPETokenizer:
    """Byte-level BPE trained offline with Hugging Face ``tokenizers``; no word splitting needed,
    so it handles scripts without spaces (Japanese, Chinese) and never produces UNK."""

    kind = "bpe"

    def __init__(self, tok, normalization: Optional[str] = None) -> None:  # tok: tokenizers.Tokenizer
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.normalization = normalization

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000,
              normalization: Optional[str] = NORMALIZATION) -> BPETokenizer:
        tok = HFTokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        seen = [0]

        def nonempty() -> Iterable[str]:  # streamed: the trainer reads the texts once, in batches
            for t in texts:
                if t.strip():
                    seen[0] += 1
                    yield normalized(t, normalization) if normalization else t

        tok.train_from_iterator(nonempty(), trainer=trainer)
        if not seen[0]:
            raise ValueError("cannot train BPE: the training texts are empty")
        return cls(tok, normalization)

    def encode_batch(self, texts: Iterable[str], add_special: bool = True) -> list[list[int]]:
        """Many texts at once, on all cores (the library's own threads)."""
        encs = self._tok.encode_batch([normalized(t, self.normalization) for t in texts], add_special_tokens=False)
        if add_special:
            return [[BOS_ID, *e.ids, EOS_ID] for e in encs]
        return [e.ids for e in encs]

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = self._tok.encode(normalized(text, self.normalization), add_special_tokens=False).ids
        return [BOS_ID, *ids, EOS_ID] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_token(self, token_id: int) -> str:
        # Byte-level pieces may be partial UTF-8; generate.py decodes the running sequence instead.
        return self.decode([token_id])

    def encode_flat(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
        """``encode`` of each text, back to back in one int64 array, and the lengths.

        Text is split with GPT-2's pattern in Python where the ``regex`` module and the library's own split
        agree on every character of it (see ``_fast_split_agrees``), and each piece is looked up
        in a cache of the pieces seen before: corpora repeat their words, so most pieces cost a dict lookup.
        Other text goes through the library whole."""
        texts = [normalized(t, self.normalization) for t in texts]
        pieces = bpe_pieces()
        slow = [i for i, t in enumerate(texts) if pieces is None or (t and not _fast_split_agrees(t))]
        encs = dict(zip(slow, (e.ids for e in self._tok.encode_batch([texts[i] for i in slow],
                                                                       add_special_tokens=False))))
        out = [encs[i] if i in encs else self._encode_fast(t, pieces) for i, t in enumerate(texts)]
        n = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
        return _with_specials(np.fromiter(itertools.chain.from_iterable(out), dtype=np.int64, count=int(n.sum())), n)

    def _encode_fast(self, text: str, pieces) -> list:
        cache = self.__dict__.setdefault("_piece_ids", {})
        if len(cache) > 1_000_000:
            cache.clear()
        specials = self.__dict__.get("_specials")
        if specials is None:
            added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
            specials = self._specials = (added, re.compile("(" + "|".join(map(re.escape, added)) + ")"))
        ids: list = []
        for k, part in enumerate(specials[1].split(text) if specials[0] else [text]):
            if k % 2:
                ids.append(specials[0][part])
                continue
            ps = pieces.findall(part)
            got = list(map(cache.get, ps))
            if None in got:
                for j, p in enumerate(ps):
                    if got[j] is None:
                        got[j] = cache[p] = [t.id for t in self._tok.model.tokenize(
                            "".join(map(_BYTE_CHAR.__getitem__, p.encode())))]
            ids.extend(itertools.chain.from_iterable(got))
        return ids

    def to_json(self) -> str:
        d = {"kind": self.kind, "tokenizer": self._tok.to_str()}
        return json.dumps({**d, "normalization": self.normalization} if self.normalization else d)

    def to_hub_json(self) -> str:
        tok = HFTokenizer.from_str(self._tok.to_str())
        if self.normalization:
            tok.normalizer = _hub_normalizer(self.normalization)
        return _with_bos_eos(tok)


def _hub_normalizer(form: Optional[str], then=None):
    """The ``tokenizers`` normalizer doing what ours do: ``form`` (None: nothing), then ``then``."""
    steps = ([getattr(normalizers, form)()] if form else []) + ([then] if then is not None else [])
    return None if not steps else steps[0] if len(steps) == 1 else normalizers.Sequence(steps)


def _hub_form(d: dict) -> Optional[str]:
    """The Unicode normalisation a hub ``tokenizer.json``'s normalizer applies (what ``_hub_normalizer`` wrote)."""
    norm = d.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    forms = [s.get("type") for s in steps if s.get("type") in ("NFC", "NFKC", "NFD", "NFKD")]
    return forms[0] if forms else None


def _with_bos_eos(tok) -> str:
    """``tok`` as ``tokenizers`` JSON whose ``encode`` adds BOS and EOS as ours does."""
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos, eos = SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[EOS_ID]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                       special_tokens=[(bos, BOS_ID), (eos, EOS_ID)])
    return tok.to_str()


def _byte_chars() -> dict:
    """GPT-2's byte -> printable character table (what byte-level BPE's vocabulary is written in)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_CHAR = _byte_chars()
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PIECES: list = []


# Characters on which the regex module's Unicode tables and the tokenizers library's disagree (newer
# assignments), found by splitting every code point in context with both: all lie at or above U+A7CE
# except these three.
_SPLIT_DISAGREES = ("\u088f", "\u0c5c", "\u0cdc")


def _fast_split_agrees(text: str) -> bool:
    return max(text) < "\ua7ce" and not any(c in text for c in _SPLIT_DISAGREES)


def bpe_pieces():
    """GPT-2's pre-tokenizer pattern compiled with ``regex`` (None where it is not installed)."""
    if not _PIECES:
        try:
            import regex

            _PIECES.append(regex.compile(GPT2_SPLIT))
        except ImportError:
            _PIECES.append(None)
    return _PIECES[0]


def _with_specials(ids: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Texts of ``n`` ids each, back to back in ``ids``, as BOS ... EOS each: (ids, lengths)."""
    lengths = n + 2
    bos = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    keep = np.ones(len(out), dtype=bool)
    keep[bos] = keep[bos + lengths - 1] = False
    out[bos], out[bos + lengths - 1] = BOS_ID, EOS_ID
    out[keep] = ids
    return out, lengths


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> WordTokenizer | BPETokenizer:
    if kind == "word":
        return WordTokenizer.train(texts, vocab_size)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}: choose 'word' or 'bpe'")


def tokenizer_from_json(s: str) -> WordTokenizer | BPETokenizer:
    """Inverse of ``to_json``; raises ValueError on anything else."""
    try:
        d = json.loads(s)
        kind = d["kind"]
        if kind == "word":
            return WordTokenizer(list(d["words"]), _form(d))
        if kind == "bpe":
            return BPETokenizer(HFTokenizer.from_str(d["tokenizer"]), _form(d))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not a newllm_nb tokenizer JSON: {e}") from e
    raise ValueError(f"not a newllm_nb tokenizer JSON: unknown kind {kind!r}")


def _form(d: dict) -> Optional[str]:
    form = d.get("normalization")
    if form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
        raise ValueError(f"unknown normalization {form!r}")
    return form


def tokenizer_from_hub_json(s: str) -> WordTokenizer | BPETokenizer:
    """Inverse of ``to_hub_json``; raises ValueError on a ``tokenizer.json`` it did not write."""
    try:
        d = json.loads(s)
        kind = d["model"]["type"]
        if kind == "WordLevel":
            vocab = d["model"]["vocab"]
            words = sorted(vocab, key=vocab.get)
            if [vocab[w] for w in words] != list(range(len(words))) or tuple(words[:4]) != SPECIAL_TOKENS:
                raise ValueError("ids are not 0..n-1 with <pad> <unk> <bos> <eos> first")
            return WordTokenizer(words[len(SPECIAL_TOKENS):], _hub_form(d))
        if kind == "BPE":
            d["post_processor"] = None  # ours adds BOS/EOS itself
            form = _hub_form(d)
            if form:
                d["normalizer"] = None  # ours normalises before the library sees the text
            return BPETokenizer(HFTokenizer.from_str(json.dumps(d)), form)
    except Exception as e:  # json, a missing key, or tokenizers rejecting the JSON (a plain Exception)
        raise ValueError(f"not a newllm_nb tokenizer.json: {e}") from e
    raise ValueError(f"not a newllm_nb tokenizer.json: a {kind} model (expected WordLevel or BPE)")


def tokenizer_hash(tok: WordTokenizer | BPETokenizer) -> str:
    """SHA-256 of the tokenizer's JSON: two tokenizers with the same hash map text to the same ids."""
    return hashlib.sha256(tok.to_json().encode()).hexdigest()


def clean_text(text: str) -> str:
    """Text that UTF-8 can encode: lone surrogates (e.g. half an emoji from a broken copy) become U+FFFD."""
    try:
        text.encode("utf-8")  # the common case, checked in C
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


def save_tokenizer(tok: WordTokenizer | BPETokenizer, path: str) -> None:
    atomic_write_text(path, tok.to_json())


def load_tokenizer(path: str) -> WordTokenizer | BPETokenizer:
    with open(path, encoding="utf-8") as f:
        return tokenizer_from_json(f.read())

"""One call from a DataConfig to train / valid datasets and a tokenizer (sources -> tokenizer -> batches)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..config import DataConfig
from .batching import (
    Dataset,
    StreamData,
    WindowData,
    instruction_sequences,
    instruction_stream,
    wikitext_sequences,
    wikitext_stream,
)
from .corpus import hub_corpus, open_corpus
from .prompt import instruction_text
from .sources import (
    HUB_TODO,
    MIN_WORDS,
    WIKITEXT_SAMPLE,
    DataError,
    hub_or_sample,
    load_dolly,
    load_instructions,
    load_wikitext,
)
from .token_cache import prepare_tokens
from .token_data import TokenStream, TokenWindows
from .tokenizer import train_tokenizer


@dataclass
class Prepared:
    train: Dataset
    valid: Dataset
    tokenizer: object
    source: str
    valid_records: list = field(default_factory=list)  # instruction data: held-out examples (per-category eval, demos)
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line: where the text came from, how much of it, and the vocabulary."""
        unit = "tokens" if self.train.stateful else "sequences"
        return (f"data: {self.source} | train {len(self.train):,} / valid {len(self.valid):,} {unit} | "
                f"vocab {self.tokenizer.vocab_size:,}")


def prepare_text(cfg: DataConfig, vocab_size: int, tokenizer=None, what_to_do: Optional[str] = None) -> Prepared:
    """Any text corpus (``cfg.path``: files, a folder or a glob; else the hub dataset ``cfg.hub_name``),
    tokenized once into the token cache; windows or streams are cut from its memory map."""
    if cfg.path is None and what_to_do:
        corpus = hub_corpus(cfg.hub_name, cfg.hub_config, cfg.text_field, cfg.hub_split, cfg.hub_revision,
                            max_docs=cfg.max_examples, what_to_do=what_to_do)
    else:
        corpus = open_corpus(cfg.path, cfg.hub_name, cfg.hub_config, cfg.text_field, cfg.hub_split,
                             cfg.hub_revision, max_docs=cfg.max_examples)
    sample = None if cfg.tokenizer_sample_mb is None else int(cfg.tokenizer_sample_mb * 1e6)
    tk = prepare_tokens(corpus, cfg.tokenizer, vocab_size, cfg.cache_dir, tokenizer=tokenizer, sample_bytes=sample)
    S = cfg.max_seq_length
    if cfg.mode == "windows":
        train, valid = (TokenWindows(tk.splits[s], S) for s in ("train", "valid"))
    else:
        train, valid = (TokenStream(tk.splits[s], S - 1, cfg.reset_at_articles) for s in ("train", "valid"))
    return Prepared(train, valid, tk.tokenizer, corpus.name,
                    info={"token_files": {s: str(t.path) for s, t in tk.splits.items()}, "tokenized": tk.built,
                          "test": tk.splits.get("test")})


def prepare(cfg: DataConfig, vocab_size: int, tokenizer=None) -> Prepared:
    """Load ``cfg.dataset``, train (or reuse) a tokenizer on its training split, build datasets."""
    if cfg.dataset == "text":
        return prepare_text(cfg, vocab_size, tokenizer)
    if cfg.dataset == "wikitext" and cfg.path is None:  # WikiText-2 from the hub: streamed, as any text corpus
        spec = hub_or_sample("wikitext", cfg.source, WIKITEXT_SAMPLE, cfg.hub_revision)
        if spec is not None:
            text = dataclasses.replace(cfg, dataset="text", hub_name=spec.repo_id, hub_config=spec.config,
                                       hub_revision=spec.revision, hub_split="train", text_field="text")
            return prepare_text(text, vocab_size, tokenizer, what_to_do=HUB_TODO)
    max_examples = cfg.max_examples
    S = cfg.max_seq_length
    if cfg.dataset == "wikitext":
        sp = load_wikitext(cfg.path, max_examples, cfg.source, cfg.hub_revision)
        if not any(len(x.split()) >= MIN_WORDS for x in sp.valid):
            raise DataError(f"the validation split from {sp.source} is empty: none of its {len(sp.valid)} line(s) has "
                            f">= {MIN_WORDS} words (a single file gives its last 10% of lines to validation): "
                            f"add text, or pass a folder with a wiki.valid file")
        tok = tokenizer or train_tokenizer(cfg.tokenizer, [x for x in sp.train if x.strip()], vocab_size)
        if cfg.mode == "windows":
            train, valid = (WindowData(wikitext_sequences(s, tok, S)) for s in (sp.train, sp.valid))
        else:
            train, valid = (StreamData(*wikitext_stream(s, tok, cfg.reset_at_articles), seq_len=S - 1)
                            for s in (sp.train, sp.valid))
        return Prepared(train, valid, tok, sp.source)
    if cfg.dataset == "dolly":
        rs = load_dolly(cfg.path, max_examples, cfg.source, cfg.hub_revision)
    else:
        rs = load_instructions(cfg.path, cfg.hub_name, cfg.field_map, max_examples, source=cfg.source,
                               revision=cfg.hub_revision)
    if not rs.valid:
        raise DataError(f"the validation split from {rs.source} is empty: {len(rs.train)} usable record(s) leave none "
                        f"for the 10% held out (need at least 2)")
    tok = tokenizer or train_tokenizer(cfg.tokenizer, [instruction_text(r) for r in rs.train], vocab_size)
    if cfg.mode == "packed" or cfg.mode == "stream":
        def make(recs):
            ids, resets, tgt = instruction_stream(recs, tok, cfg.response_only_loss)
            return StreamData(ids, resets, S - 1, tgt)
    else:
        def make(recs):
            return WindowData(*instruction_sequences(recs, tok, S, cfg.response_only_loss))
    return Prepared(make(rs.train), make(rs.valid), tok, rs.source, valid_records=rs.valid,
                    info={"skipped_records": rs.skipped})

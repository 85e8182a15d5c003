"""Any corpus, streamed and tokenized once: readers, the token cache and batches cut from its memory map."""

import json
import multiprocessing as mp
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from newllm_nb.data import tokenizer as tokmod
from newllm_nb.data.batching import StreamData, WindowData, wikitext_sequences, wikitext_stream
from newllm_nb.data.corpus import hub_corpus, local_corpus, open_corpus
from newllm_nb.data.sources import WIKITEXT_SAMPLE, DataError, load_wikitext
from newllm_nb.data.token_cache import (
    EntryWriter,
    open_entry,
    prepare_tokens,
    token_dtype,
    tokenize_corpus,
)
from newllm_nb.data.token_data import TokenStream, TokenWindows
from newllm_nb.data.tokenizer import BPETokenizer, WordTokenizer, tokenizer_hash, train_tokenizer

SAMPLE_TRAIN = WIKITEXT_SAMPLE / "wiki.train.raw"


def _same_batches(a, b, batch_size, **kw):
    n = 0
    for ba, bb in zip(a.batches(batch_size, **kw), b.batches(batch_size, **kw), strict=True):
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.y, bb.y) and ba.carry == bb.carry
        assert (ba.reset is None) == (bb.reset is None)
        if ba.reset is not None:
            assert torch.equal(ba.reset, bb.reset)
        n += 1
    assert n == a.num_batches(batch_size) == b.num_batches(batch_size)
    assert a.num_targets() == b.num_targets()


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_memmap_windows_and_streams_equal_the_list_ones(tmp_path, kind):
    """The token file of a WikiText file gives the very batches the list path builds from its lines."""
    res = prepare_tokens(open_corpus(str(SAMPLE_TRAIN)), kind, 300, tmp_path, show_progress=False, workers=2)
    sp = load_wikitext(SAMPLE_TRAIN)
    tok = train_tokenizer(kind, [x for x in sp.train if x.strip()], 300)
    assert tokenizer_hash(tok) == tokenizer_hash(res.tokenizer)  # streamed training = training on the list
    for split, lines in (("train", sp.train), ("valid", sp.valid)):
        tf = res.splits[split]
        assert tf.tokens.dtype == np.uint16
        _same_batches(WindowData(wikitext_sequences(lines, tok, 16)), TokenWindows(tf, 16), 32, shuffle=True, seed=3)
        for world in (1, 2):
            for r in range(world):
                _same_batches(WindowData(wikitext_sequences(lines, tok, 16)), TokenWindows(tf, 16), 32, shuffle=True,
                              seed=1, rank=r, world=world)
        for articles in (True, False):
            _same_batches(StreamData(*wikitext_stream(lines, tok, articles), seq_len=15),
                          TokenStream(tf, 15, reset_at_articles=articles), 8)
        _same_batches(StreamData(*wikitext_stream(lines, tok, False, reset_every_line=True), seq_len=15),
                      TokenStream(tf, 15, reset_every_line=True), 8)
        _same_batches(StreamData(*wikitext_stream(lines, tok, True), seq_len=15), TokenStream(tf, 15), 8,
                      rank=1, world=2)


def test_second_call_reuses_the_cache_and_a_damaged_entry_is_rebuilt(tmp_path, capsys):
    corpus = open_corpus(str(SAMPLE_TRAIN))
    first = prepare_tokens(corpus, "word", 300, tmp_path, show_progress=False)
    assert sorted(first.built) == ["train", "valid"] and first.source_bytes == SAMPLE_TRAIN.stat().st_size
    again = prepare_tokens(open_corpus(str(SAMPLE_TRAIN)), "word", 300, tmp_path, show_progress=False)
    assert again.built == [] and again.source_bytes == 0
    good = np.array(first.splits["train"].tokens)
    train_dir = first.splits["train"].path

    def damage_and_reload(damage, words):
        damage(train_dir)
        capsys.readouterr()
        res = prepare_tokens(open_corpus(str(SAMPLE_TRAIN)), "word", 300, tmp_path, show_progress=False)
        lines = [x for x in capsys.readouterr().out.splitlines() if "damaged" in x]
        assert len(lines) == 1 and words in lines[0], lines
        assert res.built == ["train"]
        assert np.array_equal(np.array(res.splits["train"].tokens), good)

    damage_and_reload(lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-6]), "bytes")
    flipped = lambda d: (d / "tokens.bin").write_bytes(b"\x07\x00" + (d / "tokens.bin").read_bytes()[2:])  # noqa: E731
    damage_and_reload(flipped, "checksum")
    damage_and_reload(lambda d: (d / "meta.json").unlink(), "meta.json is missing")  # a half-written entry
    damage_and_reload(lambda d: (d / "meta.json").write_text("{"), "unreadable")
    assert not [p for p in (tmp_path / "tokens").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_tokenizer_kept_in_the_cache_and_a_changed_file_tokenized_again(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(SAMPLE_TRAIN.read_text(encoding="utf-8"), encoding="utf-8")
    a = prepare_tokens(open_corpus(str(f)), "word", 300, tmp_path / "c", show_progress=False)
    f.write_text(f.read_text(encoding="utf-8") + "\n one more line with some words in it\n", encoding="utf-8")
    b = prepare_tokens(open_corpus(str(f)), "word", 300, tmp_path / "c", show_progress=False)
    assert sorted(b.built) == ["train", "valid"] and a.splits["train"].path != b.splits["train"].path
    assert len(list((tmp_path / "c" / "tokenizers").iterdir())) == 2


def _build_in_process(args):
    root, path = args
    res = tokenize_corpus(open_corpus(path), WordTokenizer.train([Path(path).read_text(encoding="utf-8")], 300),
                          root, show_progress=False, workers=1)
    return sorted(res.built), res.splits["train"].sha256


def test_concurrent_processes_tokenize_once(tmp_path):
    """Processes that start together (torchrun ranks) build each entry once; the others read it."""
    with mp.get_context("fork").Pool(3) as pool:
        out = pool.map(_build_in_process, [(str(tmp_path), str(SAMPLE_TRAIN))] * 3)
    assert sorted(b for b, _ in out) == [[], [], ["train", "valid"]]
    assert len({sha for _, sha in out}) == 1


def test_vocab_count_is_bounded_and_keeps_the_frequent_words(monkeypatch):
    monkeypatch.setattr(tokmod, "MAX_COUNTED_WORDS", 50)
    common = [f"w{i}" for i in range(10)]
    texts = (" ".join(common * 5 + [f"rare{j}_{k}" for k in range(20)]) for j in range(200))
    seen = []
    orig = tokmod.prune_counts

    def spy(counts: Counter, keep: int = 25) -> None:
        orig(counts, keep)
        seen.append(len(counts))

    monkeypatch.setattr(tokmod, "prune_counts", spy)
    tok = WordTokenizer.train(texts, 14)
    assert seen and max(seen) <= 25
    assert tok.itos[4:] == common


def test_uint32_tokens_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    w = EntryWriter(tmp_path, "k", token_dtype(70000))
    w.add(np.array([2, 69999, 3]), np.array([3]), np.array([1], dtype=np.uint8))
    tf = open_entry(w.commit({}))
    assert tf.tokens.dtype == np.uint32 and tf.tokens.tolist() == [2, 69999, 3] and tf.offsets.tolist() == [0, 3]


def test_jsonl_parquet_and_glob_corpora(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    stories = [f"story {i}: once upon a time there was a little cat number {i}.\nthe end." for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"story": s}) + "\n" for s in stories[:20]), encoding="utf-8")
    pq.write_table(pa.table({"story": stories[20:]}), tmp_path / "b.parquet")
    c = open_corpus(str(tmp_path / "*.*"), text_field="story")
    assert list(c.texts("train")) == stories[:36] and list(c.texts("valid")) == stories[36:]
    res = prepare_tokens(c, "word", 100, tmp_path / "cache", show_progress=False)
    assert res.splits["train"].meta["n_docs"] == 36  # a record is one document, newlines and all
    w = TokenWindows(res.splits["train"], 8)
    assert len(w) > 36 and w.num_targets() > 0


def test_bad_inputs_get_one_line_each(tmp_path):
    def one_line(fn, *words):
        with pytest.raises(ValueError) as e:  # DataError, or the tokenizer's ValueError
            fn()
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    one_line(lambda: open_corpus(str(tmp_path / "nothing-*.txt")), "no file matches")
    (tmp_path / "r.jsonl").write_text('{"text": "fine words here"}\n{"body": "x"}\n', encoding="utf-8")
    one_line(lambda: local_corpus(str(tmp_path / "r.jsonl")), "line 2", "no field 'text'", "body")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    one_line(lambda: local_corpus(str(tmp_path / "bad.jsonl")), "line 2", "not JSON")
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 ok\n".encode() * 3 + "na\u00efve\n".encode("latin-1"))
    one_line(lambda: local_corpus(str(tmp_path / "latin.txt")), "latin.txt", "not UTF-8", "byte 29")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"content": ["a b c d e"]}), tmp_path / "t.parquet")
    one_line(lambda: local_corpus(str(tmp_path / "t.parquet")), "t.parquet", "no column 'text'", "content")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    one_line(lambda: local_corpus(str(tmp_path / "junk.parquet")), "junk.parquet", "not a readable parquet")
    one_line(lambda: open_corpus(str(tmp_path / "missing.txt")), "not found")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    one_line(lambda: prepare_tokens(open_corpus(str(tmp_path / "empty.txt")), "word", 50, tmp_path / "c",
                                    show_progress=False), "no words")


def _hub_layout_repo(root: Path, splits: dict) -> Path:
    """A local dataset repo laid out like Salesforce/wikitext: README configs + one parquet per split."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    cfg = root / "wikitext-2-raw-v1"
    cfg.mkdir(parents=True)
    files = []
    for split, lines in splits.items():
        pq.write_table(pa.table({"text": lines}), cfg / f"{split}-00000-of-00001.parquet")
        files.append(f"  - split: {split}\n    path: wikitext-2-raw-v1/{split}-*")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
                                    + "\n".join(files) + "\n---\n# WikiText (test copy)\n", encoding="utf-8")
    return root


def test_hub_layout_repo_streams_its_own_splits_into_the_same_tokens(tmp_path):
    pytest.importorskip("datasets")
    sp = load_wikitext(WIKITEXT_SAMPLE)
    repo = _hub_layout_repo(tmp_path / "repo", {"train": sp.train, "validation": sp.valid, "test": sp.test})
    hub = hub_corpus(str(repo), "wikitext-2-raw-v1")
    assert hub.splits == ["train", "valid", "test"] and hub.name.endswith(" wikitext-2-raw-v1")
    res = prepare_tokens(hub, "word", 300, tmp_path / "cache", show_progress=False)
    local = prepare_tokens(open_corpus(str(WIKITEXT_SAMPLE)), "word", 300, tmp_path / "cache2", show_progress=False)
    assert tokenizer_hash(res.tokenizer) == tokenizer_hash(local.tokenizer)
    for s in ("train", "valid", "test"):
        assert np.array_equal(np.array(res.splits[s].tokens), np.array(local.splits[s].tokens))
    again = prepare_tokens(hub_corpus(str(repo), "wikitext-2-raw-v1"), "word", 300, tmp_path / "cache",
                           show_progress=False)
    assert again.built == []
    with pytest.raises(DataError, match="no field 'story'"):
        hub_corpus(str(repo), "wikitext-2-raw-v1", text_field="story")
    with pytest.raises(DataError, match="no split 'dev'"):
        hub_corpus(str(repo), "wikitext-2-raw-v1", split="dev")


def test_hub_split_without_validation_holds_out_every_tenth_row(tmp_path):
    pytest.importorskip("datasets")
    rows = [f"row {i} has a few words" for i in range(100)]
    repo = _hub_layout_repo(tmp_path / "repo", {"train": rows})
    c = hub_corpus(str(repo), "wikitext-2-raw-v1")
    valid = list(c.texts("valid"))
    assert valid == rows[9::10] and len(list(c.texts("train"))) == 90


def test_bpe_trains_from_a_stream_once():
    lines = SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()
    reads = []

    def stream():
        for x in lines:
            reads.append(1)
            yield x

    a = BPETokenizer.train(stream(), 300)
    assert len(reads) == len(lines)
    assert tokenizer_hash(a) == tokenizer_hash(BPETokenizer.train(lines, 300))
    ids, lengths = a.encode_flat(["hello world", "", "the cat"])
    assert np.split(ids, np.cumsum(lengths)[:-1])[0].tolist() == a.encode("hello world")
    assert lengths.tolist() == [len(a.encode(t)) for t in ("hello world", "", "the cat")]


def test_word_encode_flat_equals_encode_including_odd_text():
    tok = WordTokenizer.train(["the cat sat on the mat ΣΟΦΟΣ"], 20)
    texts = ["The Cat  sat", "ΣΟΦΟΣ the\tmat", "x\x1cy the", "has \x02 marker", "\ud800half", "the"]
    for batch in (texts, texts[:3], texts[4:]):
        ids, lengths = tok.encode_flat(batch)
        assert lengths.tolist() == [len(tok.encode(t)) for t in batch]
        assert ids.tolist() == [i for t in batch for i in tok.encode(t)]


def test_bpe_encode_flat_equals_the_library_on_text_and_random_unicode():
    import random

    pytest.importorskip("regex")
    lines = SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()
    tok = BPETokenizer.train(lines, 300)
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x2100) if not 0xD800 <= c <= 0xDFFF] + [" "] * 400 + ["<unk>", "'s", "\n"]
    alphabet += list("the cat 12") * 100 + ["\u4e2d", "\U0001f600", "\u0c5c", "\ua7ce"]  # also the library's path
    texts = [x.strip() for x in lines if x.strip()]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    ids, lengths = tok.encode_flat(texts)
    assert ids.tolist() == [i for t in texts for i in tok.encode(t)]
    assert lengths.tolist() == [len(tok.encode(t)) for t in texts]


def test_text_dataset_from_the_cli_flags_to_a_trained_epoch(tmp_path, monkeypatch, tiny, make):
    from newllm_nb.cli import _parser, config_from_args
    from newllm_nb.config import DataConfig, apply_overrides
    from newllm_nb.data import prepare

    monkeypatch.setenv("NEWLLM_CACHE_DIR", str(tmp_path / "cache"))
    args = _parser().parse_args(["train", "--dataset", "text", "--hub-dataset", "Salesforce/wikitext", "--hub-config",
                                 "wikitext-103-raw-v1", "--text-field", "page", "--tokenizer-sample-mb", "50"])
    d = config_from_args(args, 64).data
    assert (d.dataset, d.hub_name, d.hub_config, d.text_field, d.tokenizer_sample_mb, d.path) == \
        ("text", "Salesforce/wikitext", "wikitext-103-raw-v1", "page", 50.0, None)
    with pytest.raises(ValueError, match="hub_name is needed"):
        DataConfig(dataset="text")
    cfg = apply_overrides(tiny(), data__dataset="text", data__path=str(WIKITEXT_SAMPLE / "wiki.*.raw"))
    prepared = prepare(cfg.data, 200)
    assert isinstance(prepared.train, TokenWindows) and prepared.source.startswith("local ")
    assert "wiki.*.raw" in prepared.summary() and prepared.info["tokenized"]
    history = make(apply_overrides(cfg, train__epochs=1), prepared).fit(resume=False)
    assert len(history) == 1 and np.isfinite(history[-1]["val_loss"])
    again = prepare(apply_overrides(cfg, data__mode="stream").data, 200)
    assert isinstance(again.train, TokenStream) and again.info["tokenized"] == []  # the cache, not tokenized again


def test_training_panel_names_a_text_corpus(tmp_path):
    pytest.importorskip("ipywidgets")
    from newllm_nb.notebook.widgets import TrainingPanel

    p = TrainingPanel("original_wikitext")
    p.source.value = "text"
    with pytest.raises(ValueError, match="text corpus"):
        p.config()
    p.corpus.value, p.hub_config.value = "roneneldan/TinyStories", ""
    d = p.config().data
    assert (d.dataset, d.hub_name, d.path, d.hub_config, d.text_field) == ("text", "roneneldan/TinyStories", None,
                                                                            None, "text")
    p.corpus.value, p.text_field.value = str(tmp_path / "*.jsonl"), "body"
    d = p.config().data
    assert (d.dataset, d.path, d.hub_name, d.text_field) == ("text", str(tmp_path / "*.jsonl"), None, "body")
    p.source.value = "auto"
    assert p.config().data.dataset == "wikitext"


def test_corpus_budget_says_before_reading_when_a_corpus_exceeds_the_runtime(tmp_path, monkeypatch, tiny):
    import shutil as sh
    from collections import namedtuple

    from newllm_nb.config import apply_overrides
    from newllm_nb.notebook import live as notebook

    cfg = apply_overrides(tiny(), data__dataset="text", data__hub_name="roneneldan/TinyStories", data__tokenizer="bpe",
                          data__cache_dir=str(tmp_path))
    line = notebook.corpus_budget(cfg)
    assert "2,000 MB" in line and "bpe tokens" in line and "EXCEEDS" not in line
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 10**8, 10**8))
    assert "EXCEEDS this runtime's disk" in notebook.corpus_budget(cfg)
    local = apply_overrides(cfg, data__hub_name=None, data__path=str(SAMPLE_TRAIN))
    assert "0 MB of text" in notebook.corpus_budget(local) or "MB of text" in notebook.corpus_budget(local)
    assert notebook.corpus_budget(apply_overrides(cfg, data__hub_name="someone/unknown")).endswith("as it goes)")

import json
import time

import pytest
import torch

from newllm_nb.config import DataConfig
from newllm_nb.data import prepare
from newllm_nb.data.batching import (
    StreamData,
    WindowData,
    instruction_sequences,
    instruction_stream,
    make_windows,
    wikitext_sequences,
    wikitext_stream,
)
from newllm_nb.data.prompt import instruction_text
from newllm_nb.data.sources import DataError, hub_reachable, load_dolly, load_wikitext, read_jsonl, split_records
from newllm_nb.data.tokenizer import WordTokenizer


def test_windows_stride_half_and_padding_exactly():
    assert make_windows([5, 6, 7], 5) == [[5, 6, 7, 0, 0]]
    assert make_windows(list(range(10, 18)), 4) == [[10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 17]]
    # tail kept: 9 tokens, S=4 -> starts 0, 2, 4 and one more padded window at 6
    ids = list(range(20, 29))
    assert make_windows(ids, 4) == [[20, 21, 22, 23], [22, 23, 24, 25], [24, 25, 26, 27], [26, 27, 28, 0]]


def test_wikitext_lines_under_five_words_are_skipped_and_targets_shift():
    lines = [" = Title = ", " one two three four five six ", " too short here ", ""]
    tok = WordTokenizer.train(lines, 50)
    seqs = wikitext_sequences(lines, tok, 10)
    assert seqs.shape == (1, 10)
    assert seqs[0].tolist() == tok.encode("one two three four five six") + [0, 0]
    data = WindowData(seqs)
    assert data.x[0].tolist() == seqs[0, :-1].tolist()
    assert data.y[0].tolist() == seqs[0, 1:].tolist()


def test_dolly_format_split_and_truncation():
    rec = {"instruction": "Name a bird.", "context": "", "response": "A heron.", "category": "open_qa"}
    assert instruction_text(rec) == "Instruction: Name a bird. Response: A heron."
    rec2 = dict(rec, context="Birds fly.")
    assert instruction_text(rec2) == "Instruction: Name a bird. Context: Birds fly. Response: A heron."
    tok = WordTokenizer.train([instruction_text(rec2)], 50)
    toks, tgt = instruction_sequences([rec2], tok, 6)
    assert toks[0].tolist() == tok.encode(instruction_text(rec2))[:6]
    toks, tgt = instruction_sequences([rec], tok, 12, response_only=True)
    full = tok.encode(instruction_text(rec))
    assert toks[0].tolist() == full + [0] * (12 - len(full))
    n_prompt = len(tok.encode("Instruction: Name a bird. Response:"))  # BOS + prompt words + EOS
    assert tgt[0, : n_prompt - 1].tolist() == [0] * (n_prompt - 1)
    assert tgt[0, n_prompt - 1: len(full)].tolist() == full[n_prompt - 1:]
    records = [{"i": i} for i in range(100)]
    train, valid = split_records(records)
    assert len(train) == 90 and len(valid) == 10 and not {r["i"] for r in train} & {r["i"] for r in valid}
    assert split_records(records) == (train, valid)  # seed 42, deterministic


def test_stream_batches_cover_the_stream_in_order_with_resets():
    tokens = torch.arange(4, 4 + 101)
    resets = torch.zeros(101, dtype=torch.bool)
    resets[52] = True
    data = StreamData(tokens, resets, seq_len=5)
    B = data.streams_for(4)
    batches = list(data.batches(4))
    assert len(batches) == data.num_batches(4)
    assert all(b.x.shape == (B, 5) for b in batches)
    assert not batches[0].carry and all(b.carry for b in batches[1:])
    xs = torch.cat([b.x for b in batches], 1)
    ys = torch.cat([b.y for b in batches], 1)
    n = 100 // B
    for s in range(B):
        row = tokens[s * n: (s + 1) * n]
        assert xs[s, :n].tolist() == row.tolist()
        expect = tokens[s * n + 1: (s + 1) * n + 1].clone()
        expect[expect == 4 + 52] = 0  # the target at a reset is ignored
        assert ys[s, :n].tolist() == expect.tolist()
    rs = torch.cat([b.reset for b in batches], 1)
    assert rs[:, 0].all() and int(rs.sum()) == B + 1


def test_wikitext_stream_resets_at_articles_and_dolly_packing():
    lines = [" = A = ", " a b c d e ", " = = Sec = = ", " f g h ", " = B = ", " i j "]
    tok = WordTokenizer.train(lines, 50)
    ids, resets = wikitext_stream(lines, tok)
    starts = [i for i, r in enumerate(resets.tolist()) if r]
    assert ids[starts].tolist() == [2, 2] and len(starts) == 2
    recs = [{"instruction": "q one", "context": "", "response": "a one"},
            {"instruction": "q two", "context": "", "response": "a two"}]
    tok = WordTokenizer.train([instruction_text(r) for r in recs], 50)
    ids, resets, tgt = instruction_stream(recs, tok, response_only=True)
    assert resets.sum() == 2 and ids[resets].tolist() == [2, 2]
    assert (tgt != 0).sum() == 2 * (len("a one".split()) + 1)  # response words + EOS per example


def test_hub_check_respects_offline_env_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - t0 < 0.1


def test_bundled_samples_load_offline_with_a_message(capsys):
    wt = load_wikitext()
    assert wt.source.startswith("bundled sample") and "training on the bundled sample" in capsys.readouterr().out
    assert sum(len(x.split()) >= 5 for x in wt.train + wt.valid + wt.test) >= 50
    d = load_dolly()
    assert len(d.train) + len(d.valid) >= 200
    assert len({r["category"] for r in d.train + d.valid}) == 8


def test_bad_data_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_wikitext(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_wikitext(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait avec du pain\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_wikitext(tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("a b\nc d\n")
    with pytest.raises(DataError, match=">= 5 words"):
        load_wikitext(tmp_path / "short.txt")
    with pytest.raises(DataError, match="no wiki.train"):
        load_wikitext(tmp_path)


def test_jsonl_broken_lines_are_skipped_and_counted(tmp_path, capsys):
    good = {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}
    lines = [json.dumps(good), "{broken", json.dumps({"instruction": "no response"}), json.dumps(good), "[1,2]"]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines))
    recs, skipped = read_jsonl(p)
    assert len(recs) == 2 and skipped == 3
    printed = capsys.readouterr().out
    assert "skipped 3 malformed line(s)" in printed and "first at line(s) [2, 3, 5]" in printed
    p.write_text("{broken\n" + json.dumps({"instruction": "x"}))
    with pytest.raises(DataError, match="no usable record"):
        read_jsonl(p)
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add.", "input": "1+1", "output": "2"}))
    recs, _ = read_jsonl(alpaca, {"context": "input", "response": "output"})
    assert recs[0]["context"] == "1+1" and recs[0]["response"] == "2" and recs[0]["category"] == "unknown"


def test_prepare_all_modes_on_the_sample():
    for cfg in (DataConfig("wikitext", max_seq_length=16), DataConfig("wikitext", max_seq_length=16, mode="stream"),
                DataConfig("dolly", max_seq_length=32), DataConfig("dolly", max_seq_length=32, mode="packed",
                                                                    response_only_loss=True)):
        p = prepare(cfg, 200)
        assert p.train.num_targets() > 0 and p.valid.num_targets() > 0
        b = next(iter(p.train.batches(8)))
        assert b.x.shape[1] == cfg.max_seq_length - 1 and int(b.x.max()) < p.tokenizer.vocab_size

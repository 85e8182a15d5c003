"""Any instruction dataset through a field mapping, with BPE for a script without spaces (our own
Japanese sample in Alpaca's instruction / input / output schema)."""

from pathlib import Path

import torch

from newllm_nb import NewLLM, preset
from newllm_nb.config import apply_overrides
from newllm_nb.data import prepare
from newllm_nb.data.prompt import instruction_text
from newllm_nb.data.sources import load_instructions
from newllm_nb.train.trainer import Trainer

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "instruct-ja-sample.jsonl"
ALPACA = {"context": "input", "response": "output"}


def test_field_mapping_and_bpe_round_trip():
    rs = load_instructions(SAMPLE, field_map=ALPACA)
    assert len(rs.train) + len(rs.valid) == 48 and rs.train[0]["response"]
    cfg = preset("smoke", data__dataset="instruct", data__path=str(SAMPLE), data__field_map=ALPACA,
                 data__tokenizer="bpe", data__max_seq_length=64, data__max_examples=None)
    p = prepare(cfg.data, 400)
    tok = p.tokenizer
    for rec in rs.valid:
        text = instruction_text(rec)
        ids = tok.encode(text)
        assert 1 not in ids  # byte-level BPE: no UNK
        assert tok.decode(ids) == text
    assert len(tok.encode("灯台は1900年に建てられました。")) < len("灯台は1900年に建てられました。".encode())


def test_training_loss_falls_on_japanese_sample():
    cfg = preset("smoke", data__dataset="instruct", data__path=str(SAMPLE), data__field_map=ALPACA,
                 data__tokenizer="bpe", data__max_seq_length=64, data__max_examples=None, data__mode="packed",
                 model__vocab_size=400, model__embed_dim=32, model__context_dim=32, model__hidden_dim=64,
                 train__epochs=6, train__batch_size=8, train__lr=5e-3)
    p = prepare(cfg.data, 400)
    cfg = apply_overrides(cfg, model__vocab_size=p.tokenizer.vocab_size)
    torch.manual_seed(0)
    hist = Trainer(NewLLM(cfg.model), p.train, p.valid, cfg, p.tokenizer).fit()
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.5
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]

"""Training on real WikiText-2 text (../shared/data/wikitext-2/valid.txt; skipped where absent)."""

import math
from collections import Counter

import torch

from newllm_nb import NewLLM, preset
from newllm_nb.config import PAD_ID, apply_overrides
from newllm_nb.data import prepare
from newllm_nb.train.trainer import Trainer


def unigram_ppl(train_targets: torch.Tensor, valid_targets: torch.Tensor, vocab: int) -> float:
    counts = Counter(train_targets[train_targets != PAD_ID].tolist())
    total = sum(counts.values())
    v = valid_targets[valid_targets != PAD_ID].tolist()
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in v) / len(v)
    return math.exp(nll)


def test_small_model_beats_unigram_by_far_on_real_wikitext(real_wikitext):
    cfg = preset("smoke", model__vocab_size=1000, model__embed_dim=64, model__context_dim=64, model__hidden_dim=128,
                 data__path=str(real_wikitext), data__max_seq_length=33, data__mode="stream", data__max_examples=None,
                 train__batch_size=64, train__lr=3e-3, train__epochs=6, train__optimizer="adamw", train__clip=1.0)
    p = prepare(cfg.data, 1000)
    cfg = apply_overrides(cfg, model__vocab_size=p.tokenizer.vocab_size)
    torch.manual_seed(0)
    t = Trainer(NewLLM(cfg.model), p.train, p.valid, cfg, p.tokenizer)
    hist = t.fit()
    base = unigram_ppl(p.train.targets, p.valid.targets, p.tokenizer.vocab_size)
    best = min(r["val_ppl"] for r in hist)
    print(f"unigram PPL {base:.1f}, New-LLM val PPL {best:.1f}")
    assert best < 0.6 * base

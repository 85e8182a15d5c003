import pytest
import torch

from newllm_nb import NewLLM, preset
from newllm_nb.config import apply_overrides
from newllm_nb.data import prepare
from newllm_nb.experiments.growth import BaseFreeze, expand_context, growth_gap, trainable_masks
from newllm_nb.train.trainer import Trainer

# Zero-initialised new weights leave the logits' direct inputs unchanged, but LayerNorm now averages
# over the larger vector. Measured here (context 16 -> 32, bundled sample): +3.5% validation loss right
# after growth. The stated tolerance is 10% relative.
GROWTH_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def trained():
    cfg = preset("smoke", model__vocab_size=300, model__embed_dim=16, model__context_dim=16, model__hidden_dim=32,
                 data__max_seq_length=16, data__max_examples=60, train__batch_size=16, train__lr=5e-3,
                 train__epochs=4, train__patience=10)
    p = prepare(cfg.data, 300)
    cfg = apply_overrides(cfg, model__vocab_size=p.tokenizer.vocab_size)
    torch.manual_seed(0)
    t = Trainer(NewLLM(cfg.model), p.train, p.valid, cfg, p.tokenizer)
    t.fit()
    return t.model.eval(), p, cfg


def test_shapes_and_old_weights_after_growth(trained):
    model, _, _ = trained
    big = expand_context(model, 24)
    C, E = 16, 16
    assert big.config.context_dim == 24 and big.config.grown_from == 16
    assert big.fnn[0].weight.shape == (32, E + 24) and big.gates.weight.shape == (72, 32)
    assert big.norm.weight.shape == (24,)
    assert torch.equal(big.fnn[0].weight[:, : E + C], model.fnn[0].weight)
    assert big.fnn[0].weight[:, E + C:].abs().sum() == 0
    for j in range(3):
        assert torch.equal(big.gates.weight[j * 24: j * 24 + C], model.gates.weight[j * C:(j + 1) * C])
    assert torch.equal(big.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="new_dim"):
        expand_context(model, 8)


def test_loss_right_after_growth_is_close(trained):
    model, p, _ = trained
    gap = growth_gap(model, expand_context(model, 32), p.valid)
    print(gap)
    assert abs(gap["relative_change"]) < GROWTH_TOLERANCE


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_freeze_base_keeps_old_entries_bit_identical(trained, optimizer):
    model, p, cfg = trained
    big = expand_context(model, 24)
    before = {k: v.detach().clone() for k, v in big.named_parameters()}
    cfg2 = apply_overrides(cfg, model__context_dim=24, model__grown_from=16, train__freeze_base=True,
                           train__epochs=2, train__optimizer=optimizer, train__weight_decay=0.1)
    Trainer(big, p.train, p.valid, cfg2, p.tokenizer, hooks=[BaseFreeze(big)]).fit()
    masks = trainable_masks(big)
    moved_new = False
    for name, v in big.named_parameters():
        m = masks[name]
        assert torch.equal(v.detach()[~m], before[name][~m]), name
        moved_new |= bool((v.detach()[m] != before[name][m]).any())
    assert moved_new


def test_fine_tune_all_moves_old_entries_and_grown_checkpoint_round_trips(trained, tmp_path):
    model, p, cfg = trained
    big = expand_context(model, 24)
    before = big.head.weight.detach().clone()
    cfg2 = apply_overrides(cfg, model__context_dim=24, model__grown_from=16, train__epochs=1)
    t = Trainer(big, p.train, p.valid, cfg2, p.tokenizer, tmp_path)
    t.fit()
    assert not torch.equal(before, big.head.weight)
    from newllm_nb.train.checkpoint import load_model

    again, _, ck = load_model(tmp_path / "best.safetensors")
    assert again.config.grown_from == 16 and again.config.context_dim == 24


def test_freeze_base_resume_keeps_the_checkpoint_base(trained, tmp_path):
    model, p, cfg = trained
    cfg2 = apply_overrides(cfg, model__context_dim=24, model__grown_from=16, train__freeze_base=True,
                           train__epochs=2)

    class Stop(Exception):
        pass

    def stop(rec):
        raise Stop

    big = expand_context(model, 24)
    t = Trainer(big, p.train, p.valid, cfg2, p.tokenizer, tmp_path, callbacks=[stop], hooks=[BaseFreeze(big)])
    with pytest.raises(Stop):
        t.fit()
    base = {k: v.detach().clone() for k, v in big.named_parameters()}
    torch.manual_seed(123)
    fresh = NewLLM(cfg2.model)  # random weights: resume must replace them, base included
    Trainer(fresh, p.train, p.valid, cfg2, p.tokenizer, tmp_path, hooks=[BaseFreeze(fresh)]).fit()
    masks = trainable_masks(fresh)
    for name, v in fresh.named_parameters():
        assert torch.equal(v.detach()[~masks[name]], base[name][~masks[name]]), name


def test_a_tied_model_grows_with_its_shared_head():
    from newllm_nb import ModelConfig

    torch.manual_seed(0)
    m = NewLLM(ModelConfig(vocab_size=60, embed_dim=8, context_dim=8, hidden_dim=16, tie_embeddings=True))
    big = expand_context(m, 12)
    assert big.head._embed[0] is big.embed and torch.equal(big.embed.weight, m.embed.weight)
    assert torch.equal(big.head.proj.weight, m.head.proj.weight) and torch.equal(big.head.bias, m.head.bias)
    ids = torch.randint(0, 60, (2, 1))
    # First token from a zero context: the new (zero) dimensions cannot change its logits.
    torch.testing.assert_close(big.eval()(ids)[0], m.eval()(ids)[0])

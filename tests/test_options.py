"""The New-LLM cell options (ModelConfig fields, all off by default) and the context-memory analysis."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from newllm_nb import ModelConfig, NewLLM
from newllm_nb.config import preset
from newllm_nb.data.tokenizer import WordTokenizer
from newllm_nb.experiments.memory import article_spans, loss_by_position, perturbation_fade, token_losses
from newllm_nb.kernels import reference
from newllm_nb.kernels.recurrence import NewLLMRecurrence
from newllm_nb.models.baselines import LSTMLM
from newllm_nb.models.build import matched_config
from newllm_nb.models.newllm import count_parameters, gate_rank_for
from newllm_nb.train.checkpoint import load_model, save_checkpoint

E, C, H, V = 12, 10, 16, 50
# Options that keep every parameter's shape: the same weights must give another function.
SAME_SHAPES = {
    "read": dict(state_norm="read"),
    "chrono": dict(chrono_init=16.0),
    "residual": dict(num_layers=3, fnn_residual="residual"),
    "slow": dict(slow_forget_bias=3.0),
}
# Options that add or drop parameters, with how many (E, C, H as above).
NEW_SHAPES = {
    "noaffine": (dict(state_norm="noaffine"), -2 * C),
    "none": (dict(state_norm="none"), -2 * C),
    "gate_context": (dict(gate_context=True), 3 * C * C),
    "gate_rank": (dict(gate_rank=4), -H * 3 * C + H * 4 + 4 * 3 * C),
    "gate_context_rank": (dict(gate_context=True, gate_rank=4), -H * 3 * C + (H + C) * 4 + 4 * 3 * C),
    "prenorm": (dict(num_layers=3, fnn_residual="prenorm"), 2 * 2 * H),
}
ALL = {**SAME_SHAPES, **{k: v for k, (v, _) in NEW_SHAPES.items()}}


def small(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, embed_dim=E, context_dim=C, hidden_dim=H, dropout=0.0, **kw)


def perturbed(cfg: ModelConfig, seed: int = 0) -> NewLLM:
    """A model with non-trivial weights (every term of the cell exercised)."""
    torch.manual_seed(seed)
    m = NewLLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_defaults_are_the_original_cell():
    cfg = ModelConfig()
    assert cfg.original_cell
    assert (cfg.state_norm, cfg.chrono_init, cfg.gate_context, cfg.fnn_residual, cfg.gate_rank,
            cfg.slow_forget_bias) == ("layernorm", 0.0, False, "none", 0, 0.0)
    for kw in ALL.values():
        assert not small(**kw).original_cell


@pytest.mark.parametrize("name", sorted(SAME_SHAPES))
def test_each_option_changes_the_function_of_the_same_weights(name):
    kw = SAME_SHAPES[name]
    layers = kw.get("num_layers", 1)
    original_model = perturbed(small(num_layers=layers))
    opt = NewLLM(small(**kw))
    opt.load_state_dict(original_model.state_dict())
    ids = torch.randint(0, V, (3, 12))
    if name == "chrono":  # init only: the same weights are the same function, the initial biases differ
        torch.testing.assert_close(opt(ids)[0], original_model(ids)[0])
        torch.manual_seed(0)
        fresh_opt, fresh_seed = NewLLM(small(**kw)), NewLLM(small())
        assert not torch.equal(fresh_opt.gates.bias, fresh_seed.gates.bias)
        return
    assert (opt(ids)[0] - original_model(ids)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(NEW_SHAPES))
def test_options_with_new_shapes_change_the_function_of_the_shared_weights(name):
    kw, _ = NEW_SHAPES[name]
    original_model = perturbed(small(num_layers=kw.get("num_layers", 1)))
    opt = perturbed(small(**kw), seed=1)
    own = opt.state_dict()
    shared = {k: v for k, v in original_model.state_dict().items() if k in own and own[k].shape == v.shape}
    opt.load_state_dict({**own, **shared})
    ids = torch.randint(0, V, (3, 12))
    assert (opt(ids)[0] - original_model(ids)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(NEW_SHAPES))
def test_parameter_counts_as_documented(name):
    kw, delta = NEW_SHAPES[name]
    base = small(num_layers=kw.get("num_layers", 1))
    assert count_parameters(NewLLM(small(**kw))) - count_parameters(NewLLM(base)) == delta


@pytest.mark.parametrize("name", sorted(SAME_SHAPES))
def test_same_shape_options_keep_the_parameter_count(name):
    kw = SAME_SHAPES[name]
    base = small(num_layers=kw.get("num_layers", 1))
    assert count_parameters(NewLLM(small(**kw))) == count_parameters(NewLLM(base))


@pytest.mark.parametrize("name", sorted(ALL))
def test_gradients_reach_every_parameter(name):
    m = perturbed(small(**ALL[name]))
    ids = torch.randint(0, V, (3, 10))
    logits, c = m(ids, torch.randn(3, C))
    (logits.square().mean() + c.square().mean()).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_whole_loop_recurrence_is_ignored_for_options(name):
    m = perturbed(small(**ALL[name]))
    ids = torch.randint(0, V, (2, 8))
    reset = torch.rand(2, 8) < 0.3
    ref = m(ids, None, reset)
    got = m(ids, None, reset, recurrence=NewLLMRecurrence.apply)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_the_original_cell_still_takes_the_whole_loop_recurrence():
    m = perturbed(small())
    calls = []

    def fake(*args):
        calls.append(1)
        return NewLLMRecurrence.apply(*args)

    m(torch.randint(0, V, (2, 5)), recurrence=fake)
    assert calls == [1]


def test_chrono_and_slow_initial_biases():
    torch.manual_seed(0)
    m = NewLLM(small(chrono_init=16.0))
    b_f, b_i = m.gates.bias.detach()[:C], m.gates.bias.detach()[C: 2 * C]
    assert float(b_f.min()) >= 0 and float(b_f.max()) <= torch.log(torch.tensor(15.0)) + 1e-6
    assert b_f.unique().numel() == C
    torch.testing.assert_close(b_i, -b_f)
    m = NewLLM(small(slow_forget_bias=3.0, forget_bias=1.0))
    assert m.gates.bias[: C // 2].eq(1.0).all() and m.gates.bias[C // 2: C].eq(3.0).all()
    assert m.gates.bias[C + C // 2: 2 * C].eq(-3.0).all()


def test_slow_context_normalises_each_half_on_its_own():
    m = NewLLM(small(slow_forget_bias=3.0))
    s = torch.randn(2, C) * torch.cat([torch.ones(C // 2), 100 * torch.ones(C // 2)])
    z = reference.state_norm(m, s)
    for half in (z[:, : C // 2], z[:, C // 2:]):
        torch.testing.assert_close(half.mean(-1), torch.zeros(2), atol=1e-5, rtol=0)


def test_none_and_read_keep_the_state_unnormalised_but_clamped():
    for norm in ("none", "read"):
        m = perturbed(small(state_norm=norm))
        with torch.no_grad():
            m.gates.bias[2 * C:].fill_(50.0)  # a large candidate: only the clamp bounds the state
        _, c = m(torch.randint(0, V, (2, 6)))
        assert float(c.detach().abs().max()) == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [dict(state_norm="rms"), dict(chrono_init=1.5), dict(fnn_residual="yes"),
                                 dict(gate_rank=-1), dict(slow_forget_bias=2.0, context_dim=9),
                                 dict(gate_context="yes")])
def test_invalid_option_values_are_refused(bad):
    kw = {**dict(vocab_size=V, embed_dim=E, context_dim=C, hidden_dim=H), **bad}
    with pytest.raises(ValueError):
        ModelConfig(**kw)


def test_gate_rank_for_a_wider_context_keeps_the_parameter_count():
    cfg = preset("best_wikitext_10k").model
    r = gate_rank_for(cfg, 512)
    wide = dataclasses.replace(cfg, context_dim=512, gate_rank=r)
    n0, n1 = (count_parameters(NewLLM(c)) for c in (cfg, wide))
    assert abs(n1 - n0) / n0 < 0.001


RECIPES = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "recipes").glob("opt_*.json"))
EQUAL_PARAMS = {"opt_norm_read", "opt_chrono64", "opt_gatectx_r256", "opt_wide512_r127", "opt_slow4",
                "opt_combo_chrono_gctx", "opt_combo_read_chrono_gctx", "opt_combo_read_chrono_gctx_v1000"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_option_recipe_files_build_and_the_equal_parameter_ones_are(path):
    doc = json.loads(path.read_text())
    cfg = preset(doc["base"], **{f"model__{k}": v for k, v in doc["model"].items()}).model
    base = preset(doc["base"]).model
    with torch.device("meta"):
        n, n0 = count_parameters(NewLLM(cfg)), count_parameters(NewLLM(base))
        lstm = count_parameters(LSTMLM(matched_config(base, "lstm")))
    assert cfg != base
    if path.stem in EQUAL_PARAMS:
        assert abs(n - n0) / n0 < 0.001 and abs(n - lstm) / lstm < 0.01


@pytest.mark.parametrize("name", sorted(ALL))
def test_checkpoints_round_trip_with_options(tmp_path, name):
    tok = WordTokenizer.train(["the cat sat on the mat", "a dog ran"], V)
    cfg = preset("smoke", model__vocab_size=tok.vocab_size, model__embed_dim=E, model__context_dim=C,
                 model__hidden_dim=H, **{f"model__{k}": v for k, v in ALL[name].items()})
    m = perturbed(cfg.model).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", m, config=cfg.to_dict(), tokenizer=tok)
    loaded, _, _ = load_model(path)
    assert loaded.config == m.config
    ids = torch.randint(0, tok.vocab_size, (2, 7))
    torch.testing.assert_close(loaded(ids)[0], m(ids)[0])


# -- what the context vector remembers (newllm_nb.experiments.memory) ----------------------------------------------

def _stream(n_articles=3, length=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, V, (n_articles * length,), generator=g)
    resets = torch.zeros(n_articles * length, dtype=torch.bool)
    resets[::length] = True
    return tokens, resets


def test_article_spans():
    _, resets = _stream(3, 20)
    assert article_spans(resets) == [(0, 20), (20, 40), (40, 60)]


def test_loss_by_position_resets_only_change_positions_past_the_reset():
    m = perturbed(small()).eval()
    tokens, resets = _stream()
    carried, reset = token_losses(m, tokens, resets, window=32), token_losses(m, tokens, resets, 16, window=32)
    assert len(carried) == len(reset) == 3 * 89  # every target but each article's first token
    early, late = carried.position < 16, carried.position > 16
    torch.testing.assert_close(torch.tensor(carried.loss[early].values), torch.tensor(reset.loss[early].values))
    assert (carried.loss[late].values - reset.loss[late].values).__abs__().max() > 1e-4
    df = loss_by_position(m, tokens, resets, reset_every=(None, 16), edges=(1, 16, 32, 1000))
    assert set(df.context) == {"carried", "reset every 16"}
    assert df.groupby("context").tokens.sum().eq(3 * 89).all()
    assert torch.allclose(torch.tensor(df.ppl.values), torch.tensor(df.loss.values).exp())


def test_token_losses_do_not_depend_on_the_window():
    m = perturbed(small()).eval()
    tokens, resets = _stream()
    a, b = token_losses(m, tokens, resets, window=7), token_losses(m, tokens, resets, window=200)
    torch.testing.assert_close(torch.tensor(a.loss.values), torch.tensor(b.loss.values), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["newllm", "lstm"])
def test_perturbation_fade(arch):
    torch.manual_seed(0)
    cfg = small()
    m = (NewLLM(cfg) if arch == "newllm" else LSTMLM(matched_config(cfg, "lstm"))).eval()
    tokens, resets = _stream()
    df = perturbation_fade(m, tokens, resets, warmup=8, horizon=20, samples=6)
    assert list(df.distance) == list(range(21))
    assert df.state_diff.iloc[0] > 0 and (df.kl >= -1e-6).all() and (df.rel_diff > 0).all()
    with pytest.raises(ValueError):
        perturbation_fade(m, tokens, resets, warmup=80, horizon=20)


@pytest.mark.parametrize("plus,base,recipe", [("newllm_plus", "best_wikitext", "opt_combo_read_chrono_gctx_v1000"),
                                              ("newllm_plus_10k", "best_wikitext_10k", "opt_combo_read_chrono_gctx")])
def test_plus_presets_are_their_base_recipe_with_the_measured_cell_options(plus, base, recipe):
    """The presets are the recipe files benchmarks/RESULTS.md measured, with the original cell's parameter count."""
    p, b = preset(plus), preset(base)
    doc = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "recipes" / f"{recipe}.json").read_text())
    assert doc["base"] == base and p == preset(base, **{f"model__{k}": v for k, v in doc["model"].items()})
    assert (p.data, p.train) == (b.data, b.train) and not p.model.original_cell and b.model.original_cell
    with torch.device("meta"):
        assert count_parameters(NewLLM(p.model)) == count_parameters(NewLLM(b.model))

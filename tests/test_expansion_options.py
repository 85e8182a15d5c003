"""Context growth with the New-LLM cell options on: every option grows, keeping what expansion promises
for the original cell (exact base copy, first-token logits unchanged, a small loss change right after growth,
a base that freeze-base training leaves bit-identical while the new dimensions learn)."""

import pytest
import torch

from newllm_nb import ModelConfig, NewLLM
from newllm_nb.config import apply_overrides
from newllm_nb.experiments.experiment import run_experiment
from newllm_nb.experiments.growth import expand_context, freeze_hooks, growth_experiment, growth_gap
from newllm_nb.models.build import build_model
from newllm_nb.train.trainer import Trainer

from conftest import make_trainer, tiny_config

OPTIONS = {
    "noaffine": dict(model__state_norm="noaffine"),
    "state-none": dict(model__state_norm="none"),
    "read": dict(model__state_norm="read"),
    "chrono": dict(model__chrono_init=64.0),
    "gate-context": dict(model__gate_context=True),
    "gate-rank": dict(model__gate_rank=8),
    "gate-context-rank": dict(model__gate_context=True, model__gate_rank=8),
    "residual": dict(model__fnn_residual="residual", model__num_layers=2),
    "prenorm": dict(model__fnn_residual="prenorm", model__num_layers=2),
    "slow-forget": dict(model__slow_forget_bias=4.0),
    "context-tanh": dict(model__context_tanh=True),
    "best-candidate": dict(model__state_norm="read", model__chrono_init=64.0, model__gate_context=True,
                           model__gate_rank=256),
}
C0, C1 = 16, 24  # context size before and after growth (tiny_config's context_dim is 16)
# As in test_expansion.py: the relative change of validation loss right after growth stays under 10%.
GROWTH_TOLERANCE = 0.10


def old_positions(cfg: ModelConfig, old_dim: int) -> torch.Tensor:
    """The layout the grown model must have: the base channels first, or, with two halves (fast ; slow),
    first in each half, so every base channel keeps its half's timescale and norm."""
    if cfg.slow_forget_bias:
        return torch.cat([torch.arange(old_dim // 2), cfg.context_dim // 2 + torch.arange(old_dim // 2)])
    return torch.arange(old_dim)


def base_part(name: str, t: torch.Tensor, cfg: ModelConfig, old_dim: int) -> torch.Tensor:
    """The entries of the grown model's parameter ``name`` that must equal the base model's."""
    C, E, H = cfg.context_dim, cfg.embed_dim, cfg.hidden_dim
    pos = old_positions(cfg, old_dim)
    reads_context = torch.cat([torch.arange(H), H + pos])  # columns of [h ; c] when the gates read c
    if name == "fnn.0.weight":
        return t[:, torch.cat([torch.arange(E), E + pos])]
    if name in ("gates.weight", "gates.bias"):
        t = t[torch.cat([j * C + pos for j in range(3)])]
        return t[:, reads_context] if name == "gates.weight" and cfg.gate_context and not cfg.gate_rank else t
    if name == "gate_down.weight" and cfg.gate_context:
        return t[:, reads_context]
    if name in ("norm.weight", "norm.bias"):
        return t[pos]
    return t


def assert_base_kept(base: torch.nn.Module, grown: NewLLM) -> None:
    old = dict(base.named_parameters())
    assert set(old) == {n for n, _ in grown.named_parameters()}
    for name, p in grown.named_parameters():
        assert torch.equal(base_part(name, p.detach(), grown.config, C0), old[name].detach()), name


@pytest.fixture(scope="module")
def trained(tiny_prepared):
    """One briefly trained base model per option (trained once, shared by the tests below)."""
    cache = {}

    def get(option: str):
        if option not in cache:
            cfg = tiny_config(**OPTIONS[option])
            t = make_trainer(cfg, tiny_prepared)
            t.fit()
            cache[option] = (t.model.eval(), t.cfg)
        return cache[option]
    return get


@pytest.mark.parametrize("option", OPTIONS)
def test_growth_copies_the_base_exactly_and_new_weights_start_at_zero(option):
    torch.manual_seed(0)
    base = NewLLM(tiny_config(**OPTIONS[option]).model)
    with torch.no_grad():  # no entry of the base is 0 or 1, so a zero or a LayerNorm gain cannot pass for a copy
        for p in base.parameters():
            p.copy_(torch.randn_like(p).abs() + 1.5)
    grown = expand_context(base, C1)
    assert grown.config.context_dim == C1 and grown.config.grown_from == C0
    assert_base_kept(base, grown)
    # New weight-matrix entries are zero, except the new candidate rows of W_u, which start as a fresh model's
    # (zero rows would leave the new channels identical to one another).
    nonzero = sum(int(p.count_nonzero()) for p in grown.parameters() if p.dim() == 2)
    base_nonzero = sum(p.numel() for p in base.parameters() if p.dim() == 2)
    fresh_candidate_rows = (C1 - C0) * grown.gates.weight.shape[1]
    assert nonzero == base_nonzero + fresh_candidate_rows
    if grown.norm.weight is not None:  # new LayerNorm gains 1 and biases 0, as LayerNorm starts
        new = torch.ones(C1, dtype=torch.bool)
        new[old_positions(grown.config, C0)] = False
        assert torch.equal(grown.norm.weight[new], torch.ones(C1 - C0))
        assert torch.equal(grown.norm.bias[new], torch.zeros(C1 - C0))
    # First token from a zero context: the new dimensions feed nothing yet, so its logits are the base's.
    ids = torch.randint(0, base.config.vocab_size, (3, 6))
    torch.testing.assert_close(grown.eval()(ids[:, :1])[0], base.eval()(ids[:, :1])[0])
    if grown.config.state_norm == "none":  # no norm couples the channels: every position's logits are the base's
        torch.testing.assert_close(grown(ids)[0], base(ids)[0])


def new_gate_biases(model: NewLLM) -> tuple[torch.Tensor, torch.Tensor]:
    C = model.config.context_dim
    new = torch.ones(C, dtype=torch.bool)
    new[old_positions(model.config, C0)] = False
    return model.gates.bias[:C][new].detach(), model.gates.bias[C: 2 * C][new].detach()


def test_new_channels_of_a_chrono_model_get_chrono_timescales():
    torch.manual_seed(0)
    base = NewLLM(tiny_config(model__chrono_init=64.0).model)
    b_f, b_i = new_gate_biases(expand_context(base, C1))
    assert ((b_f >= 0) & (b_f <= torch.log(torch.tensor(63.0)))).all() and len(b_f.unique()) == C1 - C0
    assert torch.equal(b_i, -b_f)


def test_new_channels_of_each_half_get_that_halfs_timescale():
    torch.manual_seed(0)
    base = NewLLM(tiny_config(model__slow_forget_bias=4.0, model__forget_bias=1.0).model)
    b_f, b_i = new_gate_biases(expand_context(base, C1))
    half = (C1 - C0) // 2  # new fast channels, then new slow ones
    assert torch.equal(b_f, torch.tensor([1.0] * half + [4.0] * half))
    assert torch.equal(b_i, torch.tensor([0.0] * half + [-4.0] * half))


@pytest.mark.parametrize("option", OPTIONS)
def test_grown_model_trains_with_frozen_base(option, trained, tiny_prepared):
    base, cfg = trained(option)
    grown = expand_context(base, C1)
    gap = growth_gap(base, grown, tiny_prepared.valid)
    assert abs(gap["relative_change"]) < GROWTH_TOLERANCE, gap
    before = grown.fnn[0].weight.detach().clone()
    cfg2 = apply_overrides(cfg, model__context_dim=C1, model__grown_from=C0, train__freeze_base=True,
                           train__epochs=1, train__optimizer="adamw", train__weight_decay=0.1)
    hooks = freeze_hooks(grown, cfg2)
    assert hooks
    Trainer(grown, tiny_prepared.train, tiny_prepared.valid, cfg2, tiny_prepared.tokenizer, hooks=hooks).fit()
    assert_base_kept(base, grown)
    # The new context entries learn to feed the FNN: their columns in layer 1 left zero.
    new_columns = torch.ones(cfg.model.embed_dim + C1, dtype=torch.bool)
    new_columns[:cfg.model.embed_dim] = False
    new_columns[cfg.model.embed_dim + old_positions(grown.config, C0)] = False
    learned = grown.fnn[0].weight.detach()[:, new_columns]
    assert not torch.equal(learned, before[:, new_columns])
    # ... and they learn different things: each new channel is its own direction, not a copy of the first.
    assert (learned - learned[:, :1]).abs().amax(0)[1:].min() > 0


def test_growth_experiment_runs_the_best_candidate(tiny_prepared, tmp_path):
    cfg = tiny_config(**OPTIONS["best-candidate"], train__epochs=1)
    cfg = apply_overrides(cfg, model__vocab_size=tiny_prepared.tokenizer.vocab_size)
    result = run_experiment(cfg, prepared=tiny_prepared)
    curves, gap = growth_experiment(result, C1, 1, tmp_path)
    assert len(set(curves["variant"])) == 4 and curves["val_ppl"].notna().all()
    assert abs(gap["relative_change"]) < GROWTH_TOLERANCE


def test_what_cannot_be_grown_is_refused_in_one_line(tiny_prepared):
    lstm = build_model(ModelConfig(arch="lstm", vocab_size=50, embed_dim=8, context_dim=8, hidden_dim=8))
    with pytest.raises(ValueError, match=r"^expand_context grows a New-LLM \(arch='newllm'\), not a \w+$"):
        expand_context(lstm, 16)
    slow = NewLLM(tiny_config(model__slow_forget_bias=4.0).model)
    with pytest.raises(ValueError, match=r"^invalid config value context_dim=25: must be even with "
                                         r"slow_forget_bias \(two halves\)$"):
        expand_context(slow, 25)
    with pytest.raises(ValueError, match=r"^invalid new_dim=8: must be an integer larger than context_dim=16$"):
        expand_context(slow, 8)


def test_run_experiment_refuses_to_freeze_the_base_of_a_fresh_model(tiny_prepared, tmp_path):
    cfg = tiny_config(model__context_dim=C1, model__grown_from=C0, train__freeze_base=True, train__epochs=1)
    cfg = apply_overrides(cfg, model__vocab_size=tiny_prepared.tokenizer.vocab_size)
    with pytest.raises(ValueError, match="run_experiment builds a fresh model"):
        run_experiment(cfg, tmp_path / "run", prepared=tiny_prepared)
    assert not (tmp_path / "run").exists()

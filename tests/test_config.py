
import pytest

from newllm_nb.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    original_lr,
    preset,
)

BAD = [
    (ModelConfig, "vocab_size", 0), (ModelConfig, "vocab_size", 2.5), (ModelConfig, "embed_dim", 0),
    (ModelConfig, "context_dim", -3), (ModelConfig, "hidden_dim", 0), (ModelConfig, "num_layers", 0),
    (ModelConfig, "num_layers", 65), (ModelConfig, "dropout", 1.0), (ModelConfig, "dropout", -0.1),
    (ModelConfig, "context_dropout", 1.5), (ModelConfig, "context_tanh", "yes"), (ModelConfig, "init_std", 0.0),
    (ModelConfig, "arch", "gru"), (ModelConfig, "lstm_hidden", -1), (ModelConfig, "lstm_layers", 0),
    (ModelConfig, "tf_dim", -1), (ModelConfig, "tf_layers", 0), (ModelConfig, "tf_heads", 0),
    (ModelConfig, "max_len", 0), (ModelConfig, "tie_embeddings", 1), (ModelConfig, "embed_dropout", 1.0),
    (ModelConfig, "embed_dropout", -0.5), (ModelConfig, "input_dropout", 1.0), (ModelConfig, "output_dropout", -0.2),
    (ModelConfig, "output_dropout", "0.5"), (ModelConfig, "forget_bias", float("inf")),
    (DataConfig, "dataset", "imdb"), (DataConfig, "max_seq_length", 1), (DataConfig, "tokenizer", "char"),
    (DataConfig, "mode", "random"), (DataConfig, "max_examples", 0), (DataConfig, "path", "  "),
    (TrainConfig, "epochs", 0), (TrainConfig, "batch_size", 0), (TrainConfig, "lr", 0.0),
    (TrainConfig, "lr", float("nan")), (TrainConfig, "optimizer", "sgd"), (TrainConfig, "weight_decay", -1.0),
    (TrainConfig, "schedule", "step"), (TrainConfig, "warmup_steps", -1), (TrainConfig, "min_lr_ratio", 2.0),
    (TrainConfig, "clip", 0.0), (TrainConfig, "clip", "auto"), (TrainConfig, "patience", 0),
    (TrainConfig, "min_delta", -1.0), (TrainConfig, "precision", "fp8"), (TrainConfig, "device", "tpu"),
    (TrainConfig, "seed", -1), (TrainConfig, "fast_path", "turbo"), (TrainConfig, "checkpoint_every_minutes", 0.0),
    (TrainConfig, "keep_every", -1), (TrainConfig, "max_nonfinite", 0), (TrainConfig, "ema_decay", 1.0),
    (TrainConfig, "ema_decay", -0.1),
]


@pytest.mark.parametrize("cls,field,value", BAD, ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in BAD])
def test_invalid_value_names_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        cls(**{field: value})


def test_presets_and_overrides():
    w = preset("original_wikitext")
    assert (w.data.max_seq_length, w.train.epochs, w.train.patience, w.model.num_layers) == (64, 150, 30, 4)
    d = preset("original_dolly")
    assert (d.data.max_seq_length, d.train.epochs, d.train.patience, d.model.num_layers) == (128, 100, 20, 1)
    s = preset("smoke", train__epochs=1)
    assert s.train.epochs == 1
    with pytest.raises(ValueError, match="unknown preset"):
        preset("fast")
    with pytest.raises(ValueError, match="num_layers="):
        apply_overrides(w, model__num_layers=0)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        config_from_dict(ModelConfig, {"layers": 3})
    assert RunConfig.from_dict(w.to_dict()) == w


def test_original_lr_rule_and_clip_schedule():
    assert original_lr(2048) == pytest.approx(8e-4)
    assert original_lr(512) == pytest.approx(4e-4)
    assert TrainConfig(batch_size=2048).effective_lr == pytest.approx(8e-4)
    tc = TrainConfig()
    assert [tc.clip_for_epoch(e) for e in (0, 9, 10, 29, 30, 100)] == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]
    assert TrainConfig(clip=0.7).clip_for_epoch(50) == 0.7

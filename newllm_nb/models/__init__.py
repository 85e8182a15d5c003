"""The language models: New-LLM (newllm) and the equal-parameter LSTM and Transformer baselines (baselines).
Exports the model class and ``build_model``, which builds any of them from a ModelConfig."""

from .baselines import LSTMLM, TransformerLM, build_model, matched_config
from .newllm import NewLLM, count_parameters

__all__ = ["NewLLM", "LSTMLM", "TransformerLM", "build_model", "count_parameters", "matched_config"]

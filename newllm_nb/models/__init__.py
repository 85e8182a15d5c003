"""The language models: New-LLM (newllm), the equal-parameter LSTM and Transformer baselines (baselines), and
building any of them from a ModelConfig (build). Exports the classes, ``build_model`` and ``matched_config``."""

from .baselines import LSTMLM, TransformerLM
from .build import build_model, matched_config
from .newllm import NewLLM, count_parameters

__all__ = ["NewLLM", "LSTMLM", "TransformerLM", "build_model", "count_parameters", "matched_config"]

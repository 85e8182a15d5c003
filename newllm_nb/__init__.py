"""newllm_nb: New-LLM (one fixed-size context vector, no attention) for notebooks and scripts."""

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig, is_smoke, preset
from .models.newllm import NewLLM

__all__ = ["NewLLM", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "is_smoke", "preset"]
__version__ = "0.1.0"

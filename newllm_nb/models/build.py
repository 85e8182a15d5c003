"""Any model family from a ModelConfig: build it, count its parameters, size a baseline to match New-LLM, and
detach the state a family carries between truncated-BPTT windows."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from ..config import ARCHS, ModelConfig
from .baselines import LSTMLM, TransformerLM
from .newllm import NewLLM, count_parameters


def build_model(config: ModelConfig) -> nn.Module:
    """The model ``config.arch`` names: New-LLM or one of its baselines."""
    return {"newllm": NewLLM, "lstm": LSTMLM, "transformer": TransformerLM}[config.arch](config)


def config_parameters(config: ModelConfig) -> int:
    """Parameters of the model ``config`` describes (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return count_parameters(build_model(config))


def matched_config(config: ModelConfig, arch: str, target: Optional[int] = None) -> ModelConfig:
    """A baseline ``arch`` config whose parameter count is closest to ``target`` (default: ``config``'s)."""
    target = target or config_parameters(dataclasses.replace(config, arch="newllm"))
    if arch == "newllm":
        return dataclasses.replace(config, arch="newllm")
    if arch == "lstm":
        sizes, field = range(8, 4097, 8), "lstm_hidden"
    elif arch == "transformer":
        step = 2 * config.tf_heads
        sizes, field = range(step, 4097, step), "tf_dim"
    else:
        raise ValueError(f"unknown arch {arch!r}: one of {ARCHS}")

    def make(size: int) -> ModelConfig:
        return dataclasses.replace(config, arch=arch, **{field: size})

    best = min(sizes, key=lambda s: abs(config_parameters(make(s)) - target))
    return make(best)


def detach_state(state):
    """Detach a carried state (tensor, tuple of tensors or None) between truncated-BPTT windows."""
    if state is None:
        return None
    if torch.is_tensor(state):
        return state.detach()
    return tuple(s.detach() for s in state)


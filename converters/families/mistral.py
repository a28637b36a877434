"""Mistral: Llama's layout plus an optional sliding window on every layer."""

from __future__ import annotations

import transformers

from jaxtune.converters.families.base import LLAMA_KEYS, common_fields, common_hf_kwargs
from jaxtune.model.config import ModelConfig

MODEL_TYPE = "mistral"
ARCHITECTURE = "MistralForCausalLM"
KEYS = {k: v for k, v in LLAMA_KEYS.items() if ".bias" not in k}  # Mistral has no biases


def model_config(hf) -> ModelConfig:
    window = getattr(hf, "sliding_window", None)
    windows = (int(window),) * hf.num_hidden_layers if window else None
    return ModelConfig(family=MODEL_TYPE, sliding_windows=windows, **common_fields(hf))


def hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    windows = set(cfg.sliding_windows or (0,))
    if len(windows) != 1:
        raise ValueError(f"Mistral uses one sliding window for every layer, got {sorted(windows)}")
    return transformers.MistralConfig(sliding_window=windows.pop() or None, **common_hf_kwargs(cfg))

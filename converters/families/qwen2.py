"""Qwen2 / Qwen2.5: bias on q/k/v (not o), sliding windows per `layer_types`."""

from __future__ import annotations

import transformers

from jaxtune.converters.families.base import (
    LLAMA_KEYS, common_fields, common_hf_kwargs, windows_from_layer_types,
    window_kwargs,
)
from jaxtune.model.config import ModelConfig

MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"
KEYS = {k: v for k, v in LLAMA_KEYS.items() if not k.endswith(("o_proj.bias", "mlp.gate_proj.bias",
                                                                  "mlp.up_proj.bias", "mlp.down_proj.bias"))}


def model_config(hf) -> ModelConfig:
    return ModelConfig(family=MODEL_TYPE, qkv_bias=True, sliding_windows=windows_from_layer_types(hf),
                       **common_fields(hf))


def hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(**common_hf_kwargs(cfg), **window_kwargs(cfg))


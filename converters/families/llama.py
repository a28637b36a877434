"""Llama 2 / 3 / 3.1 / 3.2: optional biases (`attention_bias` on q/k/v/o, `mlp_bias`), no windows."""

from __future__ import annotations

import transformers

from jaxtune.converters.families.base import LLAMA_KEYS, common_fields, common_hf_kwargs
from jaxtune.model.config import ModelConfig

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
KEYS = LLAMA_KEYS


def model_config(hf) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(family=MODEL_TYPE, qkv_bias=bias, o_bias=bias,
                       mlp_bias=bool(getattr(hf, "mlp_bias", False)), **common_fields(hf))


def hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                                    **common_hf_kwargs(cfg))

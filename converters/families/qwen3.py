"""Qwen3: per-head RMSNorm on q and k before RoPE, explicit head_dim, optional attention bias."""

from __future__ import annotations

import transformers

from jaxtune.converters.families.base import (
    LLAMA_KEYS, common_fields, common_hf_kwargs, windows_from_layer_types,
    window_kwargs,
)
from jaxtune.model.config import ModelConfig

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
KEYS = {
    **{k: v for k, v in LLAMA_KEYS.items() if ".mlp." not in k or not k.endswith(".bias")},
    "model.layers.{}.self_attn.q_norm.weight": "layers/self_attn/q_norm/scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers/self_attn/k_norm/scale",
}


def model_config(hf) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(family=MODEL_TYPE, qkv_bias=bias, o_bias=bias, qk_norm=True,
                       sliding_windows=windows_from_layer_types(hf), **common_fields(hf))


def hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(attention_bias=cfg.qkv_bias, **common_hf_kwargs(cfg),
                                    **window_kwargs(cfg))

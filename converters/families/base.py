"""What the Llama-like families share: the HF key table and the config fields they all have.

Key tables are declarative: HF tensor name (with `{}` for the layer index) → param path. A
family's table lists every tensor the family can have; entries whose param the model config does
not have (a bias when `attention_bias` is false) are dropped before matching, so an unexpected
tensor in a checkpoint is still an error.
"""

from __future__ import annotations

import math

from jaxtune.errors import ConversionError
from jaxtune.model.config import ModelConfig, RopeConfig

LLAMA_KEYS: dict[str, str] = {
    "model.embed_tokens.weight": "embed_tokens/embedding",
    "model.layers.{}.input_layernorm.weight": "layers/input_layernorm/scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers/self_attn/q_proj/kernel",
    "model.layers.{}.self_attn.k_proj.weight": "layers/self_attn/k_proj/kernel",
    "model.layers.{}.self_attn.v_proj.weight": "layers/self_attn/v_proj/kernel",
    "model.layers.{}.self_attn.o_proj.weight": "layers/self_attn/o_proj/kernel",
    "model.layers.{}.self_attn.q_proj.bias": "layers/self_attn/q_proj/bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers/self_attn/k_proj/bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers/self_attn/v_proj/bias",
    "model.layers.{}.self_attn.o_proj.bias": "layers/self_attn/o_proj/bias",
    "model.layers.{}.post_attention_layernorm.weight": "layers/post_attention_layernorm/scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers/mlp/gate_proj/kernel",
    "model.layers.{}.mlp.up_proj.weight": "layers/mlp/up_proj/kernel",
    "model.layers.{}.mlp.down_proj.weight": "layers/mlp/down_proj/kernel",
    "model.layers.{}.mlp.gate_proj.bias": "layers/mlp/gate_proj/bias",
    "model.layers.{}.mlp.up_proj.bias": "layers/mlp/up_proj/bias",
    "model.layers.{}.mlp.down_proj.bias": "layers/mlp/down_proj/bias",
    "model.norm.weight": "norm/scale",
    "lm_head.weight": "lm_head/kernel",
}

_ROPE_FIELDS = {  # HF rope_parameters key → RopeConfig field
    "rope_theta": "theta", "factor": "factor", "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position_embeddings": "original_max_position_embeddings",
    "beta_fast": "beta_fast", "beta_slow": "beta_slow", "attention_factor": "attention_factor",
    "truncate": "truncate",
}


def rope_from_hf(hf) -> RopeConfig:
    """RopeConfig from a transformers config's standardised `rope_parameters`."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ConversionError(
            f"config.json: rope type {rope_type!r} is not supported; supported: default, linear, llama3, yarn")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("config.json: partial_rotary_factor != 1 is not supported")
    fields = {ours: params[theirs] for theirs, ours in _ROPE_FIELDS.items() if params.get(theirs) is not None}
    if rope_type in ("llama3", "yarn"):
        fields.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
    if rope_type == "yarn":
        if fields.get("factor") is None:
            fields["factor"] = hf.max_position_embeddings / fields["original_max_position_embeddings"]
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if fields.get("attention_factor") is None and mscale and mscale_all_dim:
            fields["attention_factor"] = (_yarn_gain(fields["factor"], mscale)
                                          / _yarn_gain(fields["factor"], mscale_all_dim))
    return RopeConfig(type=rope_type, **fields)


def _yarn_gain(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_to_hf(rope: RopeConfig) -> dict:
    """The HF `rope_parameters` dict for `rope`."""
    out = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type == "linear":
        out["factor"] = rope.factor
    elif rope.type == "llama3":
        out.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                   high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    elif rope.type == "yarn":
        out.update(factor=rope.factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                   original_max_position_embeddings=rope.original_max_position_embeddings,
                   truncate=rope.truncate)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    return out


def windows_from_layer_types(hf) -> tuple[int, ...] | None:
    """Per-layer sliding windows from `layer_types` (Qwen2/Qwen3 style), or None if all full."""
    layer_types = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    if not layer_types or not window or "sliding_attention" not in layer_types:
        return None
    return tuple(window if t == "sliding_attention" else 0 for t in layer_types)


def common_fields(hf) -> dict:
    """ModelConfig fields every Llama-like transformers config carries."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps, rope=rope_from_hf(hf),
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        hidden_act=hf.hidden_act, initializer_range=getattr(hf, "initializer_range", 0.02),
    )


def common_hf_kwargs(cfg: ModelConfig) -> dict:
    """transformers config kwargs for the fields of `common_fields`."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope_to_hf(cfg.rope), max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act=cfg.hidden_act,
        initializer_range=cfg.initializer_range,
    )


def window_kwargs(cfg: ModelConfig) -> dict:
    """Qwen-style transformers kwargs (`use_sliding_window`, `layer_types`) for cfg's windows."""
    if not cfg.has_sliding_window:
        return {}
    return dict(use_sliding_window=True, sliding_window=max(cfg.sliding_windows),
                layer_types=["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows])

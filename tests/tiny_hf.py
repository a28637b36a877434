"""Tiny random HF checkpoints built with transformers + torch, for parity and converter tests.

Every weight is random, norms and biases included (an all-ones norm or zero bias would hide a
converter that drops or misplaces them).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)

# name → (config class, overrides of BASE). Covers each family and each feature the model has.
CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama-mqa-tied": (transformers.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-bias": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "llama-rope-linear": (transformers.LlamaConfig,
                          dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "llama3-rope": (transformers.LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
    "llama-rope-yarn": (transformers.LlamaConfig, dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2-window": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=4,
                                                    max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, num_attention_heads=6, num_key_value_heads=3)),
    "qwen3-bias-yarn": (transformers.Qwen3Config, dict(head_dim=24, attention_bias=True, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "rope_theta": 1000000.0,
        "beta_fast": 16.0, "beta_slow": 2.0})),
}


def make_config(case: str) -> transformers.PretrainedConfig:
    cls, overrides = CASES[case]
    return cls(**{**BASE, **overrides})


def make_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A float32 AutoModelForCausalLM with every parameter random."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(case), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.float().eval()


def save_model(case: str, folder: str, seed: int = 0) -> torch.nn.Module:
    model = make_model(case, seed)
    model.save_pretrained(folder)
    return model


def torch_logits(model: torch.nn.Module, ids) -> "np.ndarray":
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()

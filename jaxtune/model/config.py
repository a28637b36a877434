"""The architecture of a decoder-only model, independent of where its weights came from.

Llama, Mistral, Qwen2 and Qwen3 share one block; what differs between them is data here
(biases, per-head q/k norms, sliding windows, RoPE scaling), set by the family's converter in
`jaxtune.converters.families`. The config is frozen and hashable so it can be a static jit
argument.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

RopeType = Literal["default", "linear", "llama3", "yarn"]
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding and its long-context scaling (HF `rope_parameters`)."""

    theta: float = 10000.0  # base of the inverse frequencies
    type: RopeType = "default"  # scaling method
    factor: float = 1.0  # context extension factor (linear, llama3, yarn)
    # llama3: wavelengths longer than original/low_freq_factor are scaled by 1/factor,
    # shorter than original/high_freq_factor are kept, and those between are blended.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None  # context the model was pre-trained on
    # yarn: the ramp between interpolated and extrapolated dimensions, and the cos/sin gain.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1*ln(factor)+1 as in the YaRN paper
    truncate: bool = True  # yarn: round the ramp bounds to whole dimensions (HF default)

    def __post_init__(self):
        if self.type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(
                f"rope type {self.type!r} is not supported; supported: default, linear, llama3, yarn"
            )
        if self.type != "default" and self.factor <= 0:
            raise ValueError(f"rope factor must be > 0 for rope type {self.type!r}, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and features of one decoder-only transformer."""

    family: str  # "llama", "mistral", "qwen2" or "qwen3": which converter reads/writes it
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F, the MLP width
    num_layers: int  # L, stacked on the leading axis of every layer param
    num_heads: int  # H, query heads
    num_kv_heads: int  # KH, key/value heads; H % KH == 0 (GQA; KH == 1 is MQA)
    head_dim: int  # per-head width; not always D // H (Qwen3)
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # Per-layer sliding window (keys with q_idx - k_idx < window are visible); 0 = full attention.
    # None means every layer attends fully.
    sliding_windows: tuple[int, ...] | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02  # std of the normal init of random weights

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model config {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}"
            )

    @property
    def has_sliding_window(self) -> bool:
        return self.sliding_windows is not None and any(w > 0 for w in self.sliding_windows)

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        from jaxtune.model.params import param_specs  # local: params imports this module
        import math

        return sum(math.prod(s.shape) for s in param_specs(self).values())

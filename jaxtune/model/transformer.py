"""The decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) as pure functions of params.

Pre-norm blocks: RMSNorm → attention (RoPE, GQA, optional q/k bias and per-head q/k norm,
optional sliding window) → residual → RMSNorm → gated MLP → residual. The stacked layer params
are run with `lax.scan`, so compile time does not grow with depth. Every projection goes through
`linear`, so LoRA and NF4 leaves work without this file knowing about them.

Einsum letters: b batch, t/s query/key length, d embed, n query heads, k kv heads, h head_dim,
f mlp, v vocab.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtune.model.attention import self_attention
from jaxtune.model.config import ModelConfig
from jaxtune.model.layer_list import has_split_layers, per_layer
from jaxtune.model.linear import dense, linear
from jaxtune.model.mlp import gated_mlp
from jaxtune.model.norm import residual_rms_norm, rms_norm
from jaxtune.model.qkv import qkv_projection
from jaxtune.model.rope import apply_rope, rope_cos_sin
from jaxtune.sharding import constrain

# Names of the attention's residuals (`jax.ad_checkpoint.checkpoint_name`) that a remat policy
# can keep: the layer names RoPE'd q, k and v; our flash kernel names its output and log-sum-exp
# inside its custom_vjp (naming the output here too would save a second copy of it).
ATTENTION_RESIDUALS = ("attention_q", "attention_k", "attention_v", "attention_out", "attention_lse")

# Rematerialisation policies for the scanned layer (gradient checkpointing), by their
# `jax.checkpoint_policies` names. "everything_saveable" (the default) means no remat at all.
# "save_attention" keeps the attention residuals above (≈ 2.5 GiB at Llama-3-8B, 4096 tokens):
# with the Pallas kernel the backward then recomputes neither the attention forward nor the q/k/v
# projections (frozen bases need no inputs for their backward), only norms, o_proj and the MLP.
# "save_attention_block" also keeps the residual stream after the attention block (one [B, T, D]
# array more per layer, 1 GiB at 8B): the backward then skips o_proj too.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS),
    "save_attention_block": jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS,
                                                                            "attention_block_out"),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical names of activation dimensions (mapped to mesh axes by jaxtune.sharding rules).
RESIDUAL = ("act_batch", "act_length", "act_embed")
HEADS = ("act_batch", "act_length", "act_heads", None)
KV_HEADS = ("act_batch", "act_length", "act_kv_heads", None)


def _bias(module: dict) -> jax.Array | None:
    return module.get("bias")


def decoder_layer(cfg: ModelConfig, dtype, h_btd: jax.Array, layer: dict, window: jax.Array,
                  cos_bth: jax.Array, sin_bth: jax.Array, attend: Callable, attend_state=None):
    """One pre-norm block on the residual stream `[B, T, D]` (in `dtype`).

    `attend(q, k, v, window, attend_state) -> (out, new_attend_state)` does the attention proper:
    over the packed rows themselves when training, over a KV cache when decoding.
    Returns `(h_btd, new_attend_state)`.
    """
    attn, mlp = layer["self_attn"], layer["mlp"]
    h_btd, x_btd = residual_rms_norm(h_btd, layer["input_layernorm"]["scale"], cfg.rms_norm_eps, RESIDUAL)
    q_btnh, k_btkh, v_btkh = qkv_projection(x_btd, attn, cfg, dtype)
    if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim of each head, before RoPE
        q_btnh = rms_norm(q_btnh, attn["q_norm"]["scale"], cfg.rms_norm_eps)
        k_btkh = rms_norm(k_btkh, attn["k_norm"]["scale"], cfg.rms_norm_eps)
    q_btnh = checkpoint_name(constrain(apply_rope(q_btnh, cos_bth, sin_bth), HEADS), "attention_q")
    k_btkh = checkpoint_name(constrain(apply_rope(k_btkh, cos_bth, sin_bth), KV_HEADS), "attention_k")
    v_btkh = checkpoint_name(constrain(v_btkh, KV_HEADS), "attention_v")
    o_btnh, attend_state = attend(q_btnh, k_btkh, v_btkh, window, attend_state)
    h_btd = linear(o_btnh, attn["o_proj"]["kernel"], "btnh,nhd->btd", dtype, _bias(attn["o_proj"]), residual=h_btd)
    h_btd = checkpoint_name(constrain(h_btd, RESIDUAL), "attention_block_out")

    h_btd, x_btd = residual_rms_norm(h_btd, layer["post_attention_layernorm"]["scale"], cfg.rms_norm_eps, RESIDUAL)
    h_btd = gated_mlp(x_btd, mlp, cfg.hidden_act, dtype, residual=h_btd)
    return constrain(h_btd, RESIDUAL), attend_state


def hidden_states(params: dict, cfg: ModelConfig, input_ids: jax.Array, *,
                  segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                  dtype=jnp.float32, attention: str = "xla", remat: str | None = None,
                  scan_unroll: int = 1) -> jax.Array:
    """Final normed hidden states `[B, T, D]` in `dtype` for token ids `[B, T]`.

    `segment_ids` `[B, T]` int32 keeps packed sequences apart (None: one sequence per row, right
    padding allowed; attention then runs without a segment mask);
    `positions` `[B, T]` are the RoPE positions (default: 0..T-1, restart per packed sequence
    is the data pipeline's job). `remat` names a policy in REMAT_POLICIES for the scanned layer;
    `scan_unroll` layers run per iteration of the layer loop (`lax.scan`'s unroll); the number of
    layers (or more) means no loop, and then `params["layers"]` may hold frozen leaves already split
    per layer (`jaxtune.model.layer_list.split_layers`).
    """
    B, T = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h_btd = constrain(jnp.take(params["embed_tokens"]["embedding"], input_ids, axis=0).astype(dtype), RESIDUAL)
    cos_bth, sin_bth = rope_cos_sin(cfg.rope, cfg.head_dim, positions)
    windows_l = jnp.asarray(cfg.sliding_windows or (0,) * cfg.num_layers, jnp.int32)

    if attention == "ring":  # ring attention needs the window as a Python int
        windows = set(cfg.sliding_windows or (0,))
        if len(windows) > 1:
            raise ValueError(f"ring attention needs one sliding window for all layers, got {sorted(windows)}")
        static_window = windows.pop()

    # Without sliding windows the window is a static 0, not the scanned per-layer value: a traced
    # window makes our flash kernels carry window masks and rules out the Hopper forward.
    def attend(q_btnh, k_btkh, v_btkh, window, _):
        if attention == "ring":
            window = static_window
        elif not cfg.has_sliding_window:
            window = 0
        return self_attention(q_btnh, k_btkh, v_btkh, segment_ids, window=window, backend=attention), None

    def body(h, layer_and_window):
        layer, window = layer_and_window
        h, _ = decoder_layer(cfg, dtype, h, layer, window, cos_bth, sin_bth, attend)
        return h, None

    if remat is not None and remat != "everything_saveable":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose from everything_saveable, "
                             f"{', '.join(REMAT_POLICIES)}")
        # Inside a rolled scan XLA cannot merge the backward's recomputation with the forward, so
        # the CSE barriers are only needed when layers are unrolled: without them XLA folded the
        # recompute back into the forward (8B LoRA step: 38 GiB instead of the loop's 20). Unrolled,
        # frozen weights should come split per layer (layer_list.py), or each layer's weight copy
        # lives from its forward to its backward (33 GiB instead of 20).
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=scan_unroll > 1)
    if scan_unroll >= cfg.num_layers:  # no loop: each layer's params as their own arrays
        for i, layer in enumerate(per_layer(params["layers"], cfg.num_layers)):
            h_btd, _ = body(h_btd, (layer, windows_l[i]))
    elif has_split_layers(params):
        raise ValueError("layer params split per layer (jaxtune.model.layer_list.split_layers) need "
                         f"the unrolled layer loop: scan_unroll={scan_unroll} < {cfg.num_layers} layers")
    else:
        h_btd, _ = jax.lax.scan(body, h_btd, (params["layers"], windows_l), unroll=scan_unroll)
    return residual_rms_norm(h_btd, params["norm"]["scale"], cfg.rms_norm_eps, RESIDUAL)[1]


def lm_head_kernel(params: dict, cfg: ModelConfig) -> jax.Array:
    """The `[D, V]` output projection: lm_head, or the embedding transposed when tied."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def logits_from_hidden(params: dict, cfg: ModelConfig, h_btd: jax.Array) -> jax.Array:
    """float32 logits `[B, T, V]` from final hidden states (operands in h's dtype)."""
    return dense(h_btd, lm_head_kernel(params, cfg), "btd,dv->btv", h_btd.dtype)


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, *,
            segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
            dtype=jnp.float32, attention: str = "xla", remat: str | None = None) -> jax.Array:
    """float32 logits `[B, T, V]` for token ids `[B, T]` (see `hidden_states` for the arguments)."""
    h_btd = hidden_states(params, cfg, input_ids, segment_ids=segment_ids, positions=positions,
                          dtype=dtype, attention=attention, remat=remat)
    return logits_from_hidden(params, cfg, h_btd)

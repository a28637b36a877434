"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token per step.

The cache holds every layer's keys and values, `[L, B, max_len, KH, hd]`, stacked like the layer
params so the same `lax.scan` runs the layers while threading each layer's cache slice through.
Each step attends over the cache up to the current position (and within the sliding window).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.model.attention import xla_attention
from jaxtune.model.config import ModelConfig
from jaxtune.model.rope import rope_cos_sin
from jaxtune.model.transformer import decoder_layer, logits_from_hidden, rms_norm


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def decode_step(params: dict, cfg: ModelConfig, ids_bt: jax.Array, cache: dict, index: jax.Array,
                dtype) -> tuple[jax.Array, dict]:
    """Run tokens `[B, T]` at positions index..index+T-1; returns (last-position logits `[B, V]`
    in float32, updated cache)."""
    B, T = ids_bt.shape
    S = cache["k"].shape[2]
    positions_bt = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
    cos_bth, sin_bth = rope_cos_sin(cfg.rope, cfg.head_dim, positions_bt)
    h_btd = jnp.take(params["embed_tokens"]["embedding"], ids_bt, axis=0).astype(dtype)
    q_pos_t = index + jnp.arange(T)
    k_pos_s = jnp.arange(S)
    causal_ts = k_pos_s[None, :] <= q_pos_t[:, None]

    def attend(q_btnh, k_btkh, v_btkh, window, layer_cache):
        k_cache = jax.lax.dynamic_update_slice(layer_cache["k"], k_btkh.astype(layer_cache["k"].dtype),
                                               (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(layer_cache["v"], v_btkh.astype(layer_cache["v"].dtype),
                                               (0, index, 0, 0))
        in_window_ts = (window <= 0) | (q_pos_t[:, None] - k_pos_s[None, :] < window)
        mask_bts = jnp.broadcast_to(causal_ts & in_window_ts, (B, T, S))
        out = xla_attention(q_btnh, k_cache.astype(q_btnh.dtype), v_cache.astype(q_btnh.dtype), mask_bts,
                            q_btnh.shape[-1] ** -0.5)
        return out, {"k": k_cache, "v": v_cache}

    def body(h, xs):
        layer, window, layer_cache = xs
        return decoder_layer(cfg, dtype, h, layer, window, cos_bth, sin_bth, attend, layer_cache)

    windows_l = jnp.asarray(cfg.sliding_windows or (0,) * cfg.num_layers, jnp.int32)
    h_btd, cache = jax.lax.scan(body, h_btd, (params["layers"], windows_l, cache))
    h_btd = rms_norm(h_btd[:, -1:], params["norm"]["scale"], cfg.rms_norm_eps)
    return logits_from_hidden(params, cfg, h_btd)[:, 0], cache


def sample(logits_bv: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature is 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / temperature
    if top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        # the smallest logit still inside the nucleus (the first token always is)
        cutoff_index_b = jnp.sum(cumulative_bv - jax.nn.softmax(sorted_bv, axis=-1) < top_p, axis=-1) - 1
        cutoff_b = jnp.take_along_axis(sorted_bv, cutoff_index_b[:, None], axis=-1)
        logits_bv = jnp.where(logits_bv < cutoff_b, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "temperature", "top_p"))
def _step(params, cfg, ids_bt, cache, index, rng, dtype, temperature, top_p):
    logits_bv, cache = decode_step(params, cfg, ids_bt, cache, index, dtype)
    return sample(logits_bv, rng, temperature, top_p), cache


def generate(params: dict, cfg: ModelConfig, prompt_ids: np.ndarray, *, max_new_tokens: int,
             eos_ids: tuple[int, ...] = (), temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, dtype=jnp.float32):
    """Yield each new token id (int) for one prompt `[P]` until EOS or `max_new_tokens`."""
    prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
    cache = init_cache(cfg, 1, prompt.shape[1] + max_new_tokens, dtype)
    rng = jax.random.key(seed)
    token, cache = _step(params, cfg, prompt, cache, jnp.int32(0), jax.random.fold_in(rng, 0),
                         jnp.dtype(dtype), temperature, top_p)
    index = prompt.shape[1]
    for i in range(max_new_tokens):
        value = int(token[0])
        yield value
        if value in eos_ids or i == max_new_tokens - 1:
            return
        token, cache = _step(params, cfg, token[:, None], cache, jnp.int32(index), jax.random.fold_in(rng, i + 1),
                             jnp.dtype(dtype), temperature, top_p)
        index += 1

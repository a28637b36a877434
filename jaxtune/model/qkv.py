"""The attention's input projections: q, k and v from one matmul over a kernel grouped by kv head.

Three einsums over the same x are three matmuls forward and three backward. XLA merges the
forward ones by itself (one `[tokens, (H + 2·KH)·hd]` GEMM) but not their input gradients
`dq@Wqᵀ + dk@Wkᵀ + dv@Wvᵀ`: those ran as three GEMMs accumulating into dx, each adapter added its
own `dxa@Aᵀ` pass over dx, and RoPE's backward wrote dq and dk on their own (on the 1B LoRA step,
≈ 280 µs per layer for what one GEMM of the forward's size does in 140). Here the kernels are
concatenated into one, `[D, KH, (G + 2)·hd]`: for each kv head the columns of its G query heads,
then its k and its v columns. Autodiff then gives one input-gradient GEMM, fed by one array that
the split's transpose (a concatenation) forms, with RoPE's backward fused into it; with LoRA, one
`dxa@Aᵀ` for the three adapters (`concat_outputs` on LoRA leaves: A side by side, B block-diagonal).

Grouping by kv head rather than `[q | k | v]` keeps a tensor-parallel split over kv heads (and the
query heads that follow them) local: each device's shard of the grouped kernel is the grouping of
its own shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.model.config import ModelConfig
from jaxtune.model.linear import concat_outputs, linear
from jaxtune.sharding import constrain

KV_GROUPED = ("act_batch", "act_length", "act_kv_heads", None)  # logical axes of the [B, T, KH, (G+2)·hd] output

# False: every projection on its own (the form autodiff was measured against; comparisons, tests).
GROUPED = True


def qkv_projection(x_btd: jax.Array, attn: dict, cfg: ModelConfig, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q `[B, T, H, hd]`, k and v `[B, T, KH, hd]` in `dtype` from the normed input `x_btd`.

    One matmul when the three kernels' leaf type can be concatenated (`concat_outputs`) and the
    biases are all present or all absent; otherwise one `linear` per projection."""
    names = ("q_proj", "k_proj", "v_proj")
    kernels = [attn[n]["kernel"] for n in names]
    biases = [attn[n].get("bias") for n in names]
    H, KH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // KH
    out_shapes = [(KH, G * hd), (KH, hd), (KH, hd)]  # per kv head: its G query heads, its k, its v
    grouped = None
    if GROUPED and len({b is None for b in biases}) == 1:
        grouped = concat_outputs(kernels, 1, out_shapes)
    if grouped is None:
        return tuple(linear(x_btd, w, spec, dtype, b) for w, b, spec in
                     zip(kernels, biases, ("btd,dnh->btnh", "btd,dkh->btkh", "btd,dkh->btkh")))
    bias = None
    if biases[0] is not None:
        bias = jnp.concatenate([b.reshape(s) for b, s in zip(biases, out_shapes)], axis=-1)
    out_btkc = constrain(linear(x_btd, grouped, "btd,dkc->btkc", dtype, bias), KV_GROUPED)
    q_btkc, k_btkh, v_btkh = jnp.split(out_btkc, [G * hd, (G + 1) * hd], axis=-1)
    B, T = x_btd.shape[:2]
    return q_btkc.reshape(B, T, H, hd), k_btkh, v_btkh

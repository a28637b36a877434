"""Causal self-attention over packed rows: the masking rules and the XLA backend.

A token at index q sees a key at index k when k <= q, both carry the same segment id (packed
sequences never see each other), and, for sliding-window layers, q - k < window. The plain-XLA
path here materialises the `[B, KH, G, T, S]` scores; the Pallas flash kernel
(`jaxtune.kernels.flash_attention`) applies the same rules blockwise without doing so, and cuDNN
(fastest, but without segment ids) serves unpacked rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def attention_mask(segment_ids_bt: jax.Array, window: jax.Array | int = 0) -> jax.Array:
    """Boolean `[B, T, S]`: may query t see key s. `window` <= 0 means no sliding window."""
    T = segment_ids_bt.shape[1]
    q_idx = jnp.arange(T)[:, None]
    k_idx = jnp.arange(T)[None, :]
    visible_ts = k_idx <= q_idx
    window = jnp.asarray(window)
    visible_ts &= (window <= 0) | (q_idx - k_idx < window)
    same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return same_segment_bts & visible_ts[None]


def xla_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array,
                  sm_scale: float) -> jax.Array:
    """Softmax attention in float32 with grouped K/V heads (no repeat in memory).

    q `[B, T, H, hd]`, k/v `[B, S, KH, hd]`, H = KH * G; returns `[B, T, H, hd]` in q's dtype.
    """
    B, T, H, hd = q_btnh.shape
    KH = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(B, T, KH, H // KH, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    # A finite fill keeps fully masked rows (only padding can have them) free of NaN.
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh, preferred_element_type=jnp.float32)
    return out_btkgh.reshape(B, T, H, hd).astype(q_btnh.dtype)


def self_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, segment_ids_bt: jax.Array | None,
                   *, window: jax.Array | int = 0, backend: str = "xla") -> jax.Array:
    """Causal, segment-masked attention by the chosen backend. Returns `[B, T, H, hd]`.

    `segment_ids_bt` None: one sequence per row (right padding included: no real token attends to
    a later position), so no segment mask at all; our flash kernel then may take its Hopper
    forward, which has none."""
    sm_scale = q_btnh.shape[-1] ** -0.5
    if backend == "xla":
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones(q_btnh.shape[:2], jnp.int32)
        return xla_attention(q_btnh, k_btkh, v_btkh, attention_mask(segment_ids_bt, window), sm_scale)
    if backend == "cudnn":
        # cuDNN's fused kernel knows causal masks, not segment ids: exact only for rows holding one
        # sequence each (right padding is harmless: no real token attends to a later position).
        # The trainer picks it only when sample_packing is off and no layer has a sliding window.
        return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, scale=sm_scale, is_causal=True,
                                            implementation="cudnn")
    if backend == "pallas":
        return _flash_per_shard(q_btnh, k_btkh, v_btkh, segment_ids_bt, window, sm_scale)
    if backend == "ring":
        # Context parallelism: the length axis is sharded over the mesh's `sequence` axis in the
        # zigzag layout (the trainer permutes the batch), K/V travel around the ring. The window
        # must be static here (one size for every layer, or none).
        from jaxtune.kernels.ring_attention import ring_attention
        from jaxtune.sharding import active_mesh

        mesh = active_mesh()
        if mesh is None:
            raise ValueError("attention backend 'ring' needs a mesh (run inside jaxtune.sharding.activation_sharding)")
        return ring_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, mesh=mesh, causal=True, sm_scale=sm_scale,
                              window=window if isinstance(window, int) and window > 0 else None,
                              interpret=jax.default_backend() == "cpu", layout="zigzag")
    raise ValueError(f"attention backend {backend!r} is not available; available: xla, cudnn, pallas, ring")


def _flash_per_shard(q_btnh, k_btkh, v_btkh, segment_ids_bt, window, sm_scale):
    """Our flash kernel (segment ids, per-layer sliding windows, blockwise), each device on its own
    rows and heads. On CPU it runs in Pallas interpret mode (tests), on GPU lowered through Triton.

    A `pallas_call` has no sharding rule: left to the partitioner, q/k/v would be gathered onto
    every device and each would compute the whole attention. Rows and heads are independent, so
    under a mesh the kernel runs in `shard_map` over the axes the activation rules give the batch
    (data, fsdp) and kv heads (tensor); q's heads follow k's, keeping every GQA group on one device.
    """
    from jaxtune.kernels.flash_attention import flash_attention
    from jaxtune.sharding import per_shard, split_spec

    interpret = jax.default_backend() == "cpu"
    static_window = isinstance(window, int)

    def attend(q, k, v, seg, win):
        return flash_attention(q, k, v, segment_ids=seg, causal=True, sm_scale=sm_scale,
                               window=window if static_window else win, interpret=interpret)

    win = jnp.int32(0) if static_window else jnp.asarray(window, jnp.int32)
    kv_spec = split_spec(("act_batch", None, "act_kv_heads", None), k_btkh.shape)
    if kv_spec is None:
        return attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, win)
    batch_axes, _, head_axes, _ = kv_spec
    x_spec = P(batch_axes, None, head_axes, None)
    seg_spec = None if segment_ids_bt is None else P(batch_axes, None)
    return per_shard(attend, (x_spec, x_spec, x_spec, seg_spec, P()), x_spec)(q_btnh, k_btkh, v_btkh,
                                                                               segment_ids_bt, win)

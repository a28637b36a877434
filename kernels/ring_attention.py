"""Ring attention: exact attention over a sequence sharded across the `sequence` mesh axis.

Each device keeps its query shard; K/V (and their segment ids) travel around the ring with
`lax.ppermute`, one hop per step, so after `N - 1` hops every query shard has met every kv shard
(Liu et al. 2023, "Ring Attention with Blockwise Transformers"). Every step runs the flash kernel
(`flash_attention(..., return_lse=True)`) on the local query block against the visiting kv block,
and partial results merge by log-sum-exp with a running max (the online softmax of
FlashAttention-2 §3.1, applied across blocks). The merge accumulates in fp32.

The backward is plain autodiff through the loop: the kernel's vjp takes the lse cotangent, and
the transpose of `ppermute` is the reverse `ppermute`, so dK/dV travel back around the ring.

Layouts (`layout=`):
  * "contiguous": device `i` holds chunk `i` of `N` equal chunks. Causal work is unbalanced:
    device `N-1` attends to `N` kv shards, device 0 to one.
  * "zigzag": the sequence is cut into `2N` chunks and device `i` holds chunks `i` and `2N-1-i`
    (the load-balanced layout of Llama 3's context parallelism), so every device does the same
    causal work at every step. Inputs must already be in that order: permute tokens, labels,
    positions and segment ids with `x[:, zigzag_permutation(S, N)]` before sharding and un-permute
    per-token outputs with `zigzag_inverse_permutation`. The two local chunks are handled as two
    query sub-blocks, each with its own global offset (the kernel takes one offset per block).

Skipping work (causal, no window): at step 0 the local shard runs with the causal mask; at later
steps every visible chunk pair lies wholly below the diagonal, so a `lax.cond` on the kv shard's
source picks the pairs that run, unmasked: contiguous runs the whole shard or nothing; zigzag
runs both query chunks against kv chunk `src` (src < me) or query chunk `2N-1-me` against the
whole shard (src > me), i.e. half of the chunk pairs on every device at every step. With a
sliding window every (query chunk, kv chunk) pair runs with its global offsets (pairs wholly in
the causal future are skipped by `lax.cond`; the kernel's own schedule skips blocks outside the
window).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jaxtune.kernels.flash_attention import flash_attention

__all__ = ["ring_attention", "zigzag_inverse_permutation", "zigzag_permutation"]

_LAYOUTS = ("zigzag", "contiguous")


def zigzag_permutation(seq_len: int, n: int) -> np.ndarray:
    """Indices `perm` [seq_len] such that `x[:, perm]`, sharded contiguously over `n` devices,
    gives device `i` the chunks `i` and `2n-1-i` of `2n` equal chunks."""
    if seq_len % (2 * n):
        raise ValueError(f"zigzag needs seq_len divisible by 2*n; got {seq_len=}, {n=}")
    c = seq_len // (2 * n)
    chunks = np.arange(seq_len).reshape(2 * n, c)
    order = np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)
    return chunks[order].reshape(-1)


def zigzag_inverse_permutation(seq_len: int, n: int) -> np.ndarray:
    """Inverse of `zigzag_permutation`: `y[:, inv]` restores the natural order of a zigzag `y`."""
    return np.argsort(zigzag_permutation(seq_len, n))


def _merge(parts):
    """Log-sum-exp merge of `(out [B,S,H,D] f32, lse [B,H,S])` pairs. Rows empty in every part
    stay out 0, lse -inf, with finite gradients (`jnp.logaddexp(-inf, -inf)` has a NaN one). The
    max is a stop_gradient: the merged result does not depend on it mathematically."""
    if len(parts) == 1:
        return parts[0]
    lse_all = jnp.stack([l for _, l in parts])  # [n, B, H, S]
    empty = jnp.isneginf(lse_all)
    m = lax.stop_gradient(jnp.max(lse_all, axis=0))
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    wgt = jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, 0.0, lse_all) - m))
    tot = jnp.sum(wgt, axis=0)
    none = tot == 0.0
    tot_safe = jnp.where(none, 1.0, tot)
    wgt = wgt / tot_safe
    out = sum(o * wi.transpose(0, 2, 1)[..., None] for (o, _), wi in zip(parts, wgt))
    lse = jnp.where(none, -jnp.inf, m + jnp.log(tot_safe))
    return out, lse


def _local_ring(
    q, k, v, seg, *, n, axis_name, layout, causal, sm_scale, window, block_sizes, interpret
):
    """Per-device body under shard_map. q [b, Sl, h, D]; k, v [b, Sl, kh, D]; seg [b, Sl] or None."""
    me = lax.axis_index(axis_name)
    nsub = 2 if layout == "zigzag" else 1
    c = q.shape[1] // nsub  # tokens per sub-block (chunk)

    def chunk_ids(dev):  # global chunk index of each local sub-block of device `dev`
        return (dev,) if nsub == 1 else (dev, 2 * n - 1 - dev)

    def split(x):
        return [x[:, a * c : (a + 1) * c] for a in range(nsub)]

    qs = split(q)
    q_segs = split(seg) if seg is not None else [None] * nsub

    def call(qa, qseg, kb, vb, kvseg, causal_, q_off=0, kv_off=0):
        o, lse = flash_attention(
            qa,
            kb,
            vb,
            segment_ids=qseg,
            kv_segment_ids=kvseg if qseg is not None else None,
            causal=causal_,
            sm_scale=sm_scale,
            block_sizes=block_sizes,
            interpret=interpret,
            return_lse=True,
            q_offset=q_off,
            kv_offset=kv_off,
            window=window,
        )
        return o.astype(jnp.float32), lse

    def empty(qa):
        b, s, h, _ = qa.shape
        return jnp.zeros(qa.shape, jnp.float32), jnp.full((b, h, s), -jnp.inf, jnp.float32)

    def cat(parts):
        return jnp.concatenate([o for o, _ in parts], axis=1), jnp.concatenate(
            [l for _, l in parts], axis=2
        )

    def pairwise(k, v, kv_seg, src):
        """Any mask: every (query chunk, kv chunk) pair with its global offsets; pairs entirely in
        the causal future are skipped (equal chunk sizes: iff the kv chunk index is larger)."""
        ks, vs = split(k), split(v)
        kv_segs = split(kv_seg) if kv_seg is not None else [None] * nsub
        outs = []
        for a, q_chunk in enumerate(chunk_ids(me)):
            parts = []
            for b, kv_chunk in enumerate(chunk_ids(src)):
                compute = functools.partial(
                    call,
                    qs[a],
                    q_segs[a],
                    ks[b],
                    vs[b],
                    kv_segs[b],
                    causal,
                    q_chunk * c,
                    kv_chunk * c,
                )
                if causal:
                    parts.append(
                        lax.cond(kv_chunk > q_chunk, functools.partial(empty, qs[a]), compute)
                    )
                else:
                    parts.append(compute())
            outs.append(_merge(parts))
        return cat(outs)

    def own(k, v, kv_seg):
        """Step 0, causal, no window: the local kv shard. Equal offsets cancel in the causal
        mask, so none are passed."""
        if nsub == 1:
            return call(q, seg, k, v, kv_seg, True)
        ks, vs = split(k), split(v)
        kv_segs = split(kv_seg) if kv_seg is not None else [None] * nsub
        # chunk `me` sees itself (diagonal); chunk `2N-1-me` sees chunk `me` fully and itself.
        o0 = call(qs[0], q_segs[0], ks[0], vs[0], kv_segs[0], True)
        o1 = _merge(
            [
                call(qs[1], q_segs[1], ks[0], vs[0], kv_segs[0], False),
                call(qs[1], q_segs[1], ks[1], vs[1], kv_segs[1], True),
            ]
        )
        return cat([o0, o1])

    def other(k, v, kv_seg, src):
        """Steps 1.., causal, no window: kv shard `src != me`. Every visible pair is fully below
        the diagonal, so no causal mask is needed, only the choice of which pairs run."""
        if nsub == 1:  # contiguous: all of it from the past, or all of it in the future
            return lax.cond(src < me, lambda: call(q, seg, k, v, kv_seg, False), lambda: empty(q))

        def past():  # both query chunks see kv chunk `src` (< me); chunk 2N-1-src is future
            kseg0 = kv_seg[:, :c] if kv_seg is not None else None
            return call(q, seg, k[:, :c], v[:, :c], kseg0, False)

        def future():  # only query chunk 2N-1-me sees anything: all of shard src
            return cat([empty(qs[0]), call(qs[1], q_segs[1], k, v, kv_seg, False)])

        return lax.cond(src < me, past, future)

    def step(acc, k, v, kv_seg, src, first):
        """Merge the contributions of kv shard `src` (held now as k, v, kv_seg) into acc."""
        if window is not None:
            part = pairwise(k, v, kv_seg, src)
        elif not causal:
            part = call(q, seg, k, v, kv_seg, False)
        elif first:
            part = own(k, v, kv_seg)
        else:
            part = other(k, v, kv_seg, src)
        return part if acc is None else _merge([acc, part])

    # Device d sends to d+1, so after t hops device `me` holds the kv shard of `me - t`. Each
    # step sends the shard it is about to use, so the hop has no data dependence on that step's
    # kernels and XLA can overlap the two; the last step's send is one hop that goes unused.
    if n == 1:
        return step(None, k, v, seg, me, True)[0].astype(q.dtype)
    perm = [(d, (d + 1) % n) for d in range(n)]

    def send(kv):
        return [None if x is None else lax.ppermute(x, axis_name, perm) for x in kv]

    kv = (k, v, seg)
    nxt = send(kv)
    acc = step(None, *kv, me, True)

    def body(carry, t):
        acc, kv = carry
        nxt = send(kv)
        return (step(acc, *kv, (me - t) % n, False), nxt), None

    (acc, _), _ = lax.scan(body, (acc, nxt), jnp.arange(1, n, dtype=jnp.int32))
    return acc[0].astype(q.dtype)


def ring_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    mesh,
    axis_name="sequence",
    batch_axes=("data", "fsdp"),
    head_axis="tensor",
    causal=True,
    sm_scale=None,
    window=None,
    interpret=False,
    layout="zigzag",
    block_sizes=None,
):
    """Exact attention over a sequence sharded on `mesh[axis_name]`, by ring passes of K/V.

    Args:
      q: `[B, S, H, D]`; k, v: `[B, S, KH, D]` (GQA: `H % KH == 0`), global arrays whose length
        dim is sharded over `axis_name`, batch over `batch_axes` and heads over `head_axis` (mesh
        axes that are absent or of size 1 are ignored).
      segment_ids: int32 `[B, S]` or None (packed sequences; segments may cross shard borders).
      mesh: the `jax.sharding.Mesh`.
      causal, sm_scale, window, interpret, block_sizes: as in `flash_attention`; `window` is a
        static int or None.
      layout: "zigzag" (inputs in `zigzag_permutation` order; balanced causal work) or
        "contiguous" (natural order, device `i` holds chunk `i`).

    Returns:
      out `[B, S, H, D]` in q's dtype, sharded like q, in the same token order as the inputs.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout=}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B,S,H,D], k = v [B,S,KH,D]; got {q.shape=}, {k.shape=}, {v.shape=}"
        )
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q and k/v must share B, S, D with H % KH == 0; got {q.shape=}, {k.shape=}"
        )
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [B, S]; got {segment_ids.shape=} for {q.shape=}")
    if isinstance(window, int) and window <= 0:
        window = None  # as in flash_attention: no window
    if window is not None and not isinstance(window, int):
        raise ValueError(f"window must be a static int or None under ring attention; got {window=}")
    if axis_name not in mesh.shape:
        raise ValueError(f"{axis_name=} is not a mesh axis; mesh axes are {tuple(mesh.shape)}")
    n = mesh.shape[axis_name]
    b, s = q.shape[:2]
    kh = k.shape[2]
    pieces = 2 * n if layout == "zigzag" else n
    if s % pieces:
        raise ValueError(
            f"{layout} layout over {axis_name}={n} needs S % {pieces} == 0; got {q.shape=}"
        )
    batch = tuple(a for a in batch_axes if a in mesh.shape and mesh.shape[a] > 1)
    nb = int(np.prod([mesh.shape[a] for a in batch]))
    if b % nb:
        raise ValueError(f"batch {b} not divisible by {batch}={nb}; got {q.shape=}")
    head = head_axis if head_axis in mesh.shape and mesh.shape[head_axis] > 1 else None
    if head is not None and kh % mesh.shape[head]:
        raise ValueError(f"kv heads must divide over {head}={mesh.shape[head]}; got {k.shape=}")

    bspec = batch if batch else None
    x_spec = P(bspec, axis_name, head, None)
    seg_spec = P(bspec, axis_name)
    body = functools.partial(
        _local_ring,
        n=n,
        axis_name=axis_name,
        layout=layout,
        causal=causal,
        sm_scale=sm_scale,
        window=window,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    if segment_ids is None:
        fn = lambda q, k, v: body(q, k, v, None)
        in_specs, args = (x_spec, x_spec, x_spec), (q, k, v)
    else:
        fn = body
        in_specs, args = (
            (x_spec, x_spec, x_spec, seg_spec),
            (q, k, v, segment_ids.astype(jnp.int32)),
        )
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=x_spec, check_vma=False)(*args)

"""Flash attention in Pallas (Triton lowering): forward and backward, causal, packed segments, GQA.

Layout is the model's: q `[B, Sq, H, D]`, k and v `[B, Skv, KH, D]` with `H % KH == 0`; query head
`h` reads kv head `h // (H // KH)` through the BlockSpec index map, so K/V are never repeated in
memory. Softmax runs in base 2 (`exp2(x·log2e)`, FlashAttention-2 §3.1) with fp32 accumulation;
the log-sum-exp returned to callers is in natural log.

The backward follows FlashAttention-2 §3.2 with the two loops split into two kernels: one program
per kv block accumulates dK and dV over query blocks (by default one program per query head, its
partials summed over each kv head's group afterwards; `dkv_per_query_head=False` loops over the
group instead), another per query block accumulates dQ. Both recompute P from the saved
log-sum-exp: no O(S²) memory. The dQ kernel runs first and also writes FlashAttention-2's
D = rowsum(O∘dO), which the dK/dV kernel reads.

Which blocks each program visits is decided before the launch (`_schedule`): causal, sliding-window
and segment masks turn into loop bounds, so fully masked blocks cost nothing (FlashAttention-2
§3.1, "causal masking"), and blocks where every query sees every key (below the diagonal, inside
one packed segment) run a loop without any mask arithmetic; only the blocks on a mask's edge pay
for it. Packed rows therefore run faster than one unpacked row of the same length.

Ring attention runs this kernel on one (query block, kv block) pair of a longer sequence:
`q_offset`/`kv_offset` are the blocks' global start positions for the causal mask,
`segment_ids`/`kv_segment_ids` the two blocks' segment ids, and `return_lse=True` gives the
log-sum-exp to merge partial results. A query that sees no key gets output 0 and lse = -inf
(never NaN), and the backward accepts a cotangent for the lse, so `jax.grad` through a
log-sum-exp merge is exact (see `flash_attention`'s docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "supports"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Running max starts finite: a row that has seen only masked (-inf) logits then gets
# p = exp2(-inf - m) = 0 and l = 0 instead of exp2(-inf + inf) = NaN.
_M_INIT = -1e30
_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1
# Padded positions get segment ids no real token can match (q pads and kv pads differ, so
# padded queries see nothing either). Real segment ids must lie strictly between them.
_Q_PAD_SEGMENT = _INT_MIN
_KV_PAD_SEGMENT = _INT_MIN + 1
_MIN_BLOCK = 16  # smallest tile Triton's tensor-core dot accepts


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and Triton launch parameters for the three kernels.

    `block_q`/`block_kv`: forward tile (queries per program, keys per loop step).
    `block_q_dkv`/`block_kv_dkv`: dK/dV kernel (queries per step, keys per program).
    `block_q_dq`/`block_kv_dq`: dQ kernel (queries per program, keys per step).
    All must be powers of two >= 16; they shrink automatically for short sequences.
    `dkv_per_query_head` (GQA/MQA only): one dK/dV program per *query* head, writing partials
    (float32 with `dkv_partials_f32`, else in the inputs' dtype) that are summed over each kv
    head's group afterwards, instead of one program per kv head looping over its group. G times
    the programs, each G times shorter (better balance when B·KH·Skv/block_kv is small against
    the GPU's SMs), for an extra [B, Skv, H, D] write and read of dK and dV. On an H200
    (RESULTS.md, 2026-11-30) fwd+bwd went 1.27 → 1.04 ms at the 1B training shape (B4 S2048
    H32/KH8 D64) and 1.69 → 1.54 ms at the 8B one (B1 S4096 H32/KH8 D128), and was level at B4
    S4096 H32/KH8 D128, so it is on by default; no effect without GQA.
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 128
    block_kv_dq: int = 64
    num_warps_fwd: int = 8
    num_stages_fwd: int = 3
    num_warps_dkv: int = 4
    num_stages_dkv: int = 2
    num_warps_dq: int = 8
    num_stages_dq: int = 3
    dkv_per_query_head: bool = True
    # The per-query-head partials in float32 (True) or in the inputs' dtype, as FlashAttention-2
    # does for GQA: half the partials' traffic, each partial rounded once before the float32 sum.
    # On an H200 fwd+bwd 0.914 -> 0.867 ms at the 1B shape, level at the 8B one (1.301 / 1.311),
    # grads as close to ours-in-float32 as cuDNN's are (2.7e-3 relative; RESULTS.md, tenth round).
    dkv_partials_f32: bool = False
    # Grid order of the two backward kernels: heads along the fastest axis (the programs in flight
    # work on the same query/key block of neighbouring heads: equal work under a causal mask, the
    # same K/V with GQA) rather than blocks. On an H200 fwd+bwd went 1.014 -> 0.949 ms at the 1B
    # shape and 1.382 -> 1.343 ms at the 8B one, within ±0.6% at B4 S4096 (RESULTS.md, fifth session).
    bwd_heads_fastest: bool = True
    # The same for the Triton forward (packed rows, ring attention); not yet measured, so off.
    fwd_heads_fastest: bool = False
    # The forward kernel: "triton" (Pallas on Triton, every feature), "mosaic" (the Hopper forward
    # in flash_attention_mosaic.py: 0.96-0.97 ms against Triton's 1.38 and cuDNN's 1.02 at B4 S4096
    # H32 D128 causal on an H200; no segment ids, windows or offsets, lengths a multiple of 128,
    # head_dim 64 or 128, 16-bit) or "auto": Mosaic on a Hopper GPU where the call fits it, Triton
    # otherwise (and always in interpret mode). The backward is Triton either way.
    forward: str = "auto"

    def __post_init__(self):
        if self.forward not in ("auto", "triton", "mosaic"):
            raise ValueError(f"BlockSizes.forward={self.forward!r} must be 'auto', 'triton' or 'mosaic'")
        for name in (
            "block_q",
            "block_kv",
            "block_q_dkv",
            "block_kv_dkv",
            "block_q_dq",
            "block_kv_dq",
        ):
            b = getattr(self, name)
            if b < _MIN_BLOCK or b & (b - 1):
                raise ValueError(f"BlockSizes.{name}={b} must be a power of two >= {_MIN_BLOCK}")

    @classmethod
    def tiles(cls, block_q: int, block_kv: int, num_warps: int = 4) -> BlockSizes:
        """One (queries, keys) tile for all three kernels: the forward and dQ passes walk keys
        under a query tile, the dK/dV pass walks queries under a key tile, so it swaps the two."""
        return cls(block_q=block_q, block_kv=block_kv, block_q_dkv=block_kv, block_kv_dkv=block_q,
                   block_q_dq=block_q, block_kv_dq=block_kv, num_warps_fwd=num_warps,
                   num_warps_dkv=num_warps, num_warps_dq=num_warps)

    @classmethod
    def get_default(cls, head_dim: int = 128, dtype=jnp.bfloat16) -> BlockSizes:
        """Tiles measured fastest on an H100 (`benchmarks/attention.py --sweep`, RESULTS.md)."""
        if jnp.dtype(dtype) == jnp.float32:
            # fp32 runs exact IEEE dots (no tensor cores): twice the bytes per tile, smaller tiles.
            return cls(
                block_q=64,
                block_kv=32,
                block_q_dkv=32,
                block_kv_dkv=64,
                block_q_dq=64,
                block_kv_dq=32,
                num_warps_fwd=4,
                num_stages_fwd=2,
                num_warps_dkv=4,
                num_stages_dkv=2,
                num_warps_dq=4,
                num_stages_dq=2,
            )
        if head_dim <= 64:
            return cls(
                block_q=64,
                block_kv=64,
                block_q_dkv=32,
                block_kv_dkv=128,
                block_q_dq=64,
                block_kv_dq=64,
                num_warps_fwd=4,
                num_stages_fwd=3,
                num_warps_dkv=4,
                num_stages_dkv=3,
                num_warps_dq=4,
                num_stages_dq=2,
            )
        if head_dim <= 128:
            return cls()
        # 128 < D <= 256: the accumulators double, so tiles halve (not yet run on a GPU; correct in
        # interpret mode, its speed unmeasured).
        return cls(
            block_q=64,
            block_kv=64,
            block_q_dkv=32,
            block_kv_dkv=64,
            block_q_dq=64,
            block_kv_dq=32,
            num_warps_fwd=4,
            num_stages_fwd=2,
            num_warps_dkv=4,
            num_stages_dkv=2,
            num_warps_dq=4,
            num_stages_dq=2,
        )

    def _clamped(self, sq: int, skv: int) -> BlockSizes:
        """Shrink tiles to the (power-of-two rounded) sequence lengths of a short input."""
        cap_q = max(_MIN_BLOCK, pl.next_power_of_2(sq))
        cap_kv = max(_MIN_BLOCK, pl.next_power_of_2(skv))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, cap_q),
            block_kv=min(self.block_kv, cap_kv),
            block_q_dkv=min(self.block_q_dkv, cap_q),
            block_kv_dkv=min(self.block_kv_dkv, cap_kv),
            block_q_dq=min(self.block_q_dq, cap_q),
            block_kv_dq=min(self.block_kv_dq, cap_kv),
        )


def supports(q_shape, k_shape, dtype, *, head_dim_max: int = 256) -> bool:
    """Whether `flash_attention` handles these shapes/dtype (for the model's `attention: auto`).

    Features (segment ids, causal, sliding window, ring offsets, return_lse, any length) are
    always supported; only the head dim and dtype limit the kernel. The device must be a CUDA GPU
    (sm80+; tuned on H100) or, with `interpret=True`, anything.
    """
    return (
        len(q_shape) == 4
        and len(k_shape) == 4
        and q_shape[-1] <= head_dim_max
        and q_shape[2] % k_shape[2] == 0
        and jnp.dtype(dtype)
        in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
    )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _dot(a, b, *, trans_b=False):
    """a @ b (or a @ b.T) accumulated in fp32.

    fp32 inputs get exact IEEE products (Triton would otherwise use tf32); 16-bit inputs take the
    tensor cores directly.
    """
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _ex2_approx(x):
    """2**x on the special-function unit (PTX ex2.approx.ftz.f32, one instruction, ~2 ulp,
    subnormal results flushed to 0: far below what a softmax weight resolves); jnp.exp2 lowers
    to libdevice's __nv_exp2f, which adds subnormal handling around the same instruction."""
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
    )
    return y


def _exp2_for(st, dtype):
    """The softmax's exp2: the one-instruction approximation in compiled 16-bit kernels (on an
    H200 it took the B4 S4096 H32 D128 causal fwd+bwd from 5.34-5.44 to 5.26-5.28 ms and the 1B
    training shape from 1.005 to 0.951 ms, RESULTS.md 2026-11-30, with the same error against cuDNN);
    jnp.exp2 for fp32 inputs (the exact path) and in interpret mode (no inline PTX on CPU)."""
    return jnp.exp2 if st.interpret or dtype == jnp.float32 else _ex2_approx


def _visible(rows_q, cols_kv, bounds, q_seg, kv_seg, *, flags, kv_major=False):
    """[len(rows_q), len(cols_kv)] bool (transposed if `kv_major`): may query r see key c?

    `rows_q`/`cols_kv` are block-local positions; `bounds.delta = q_offset - kv_offset` puts them
    on one global axis for the causal and sliding-window tests.
    """
    if kv_major:  # built transposed directly: transposing the tile would cost a shuffle
        q_ax, kv_ax = (None, slice(None)), (slice(None), None)
    else:
        q_ax, kv_ax = (slice(None), None), (None, slice(None))
    dist = (rows_q[q_ax] + bounds.delta) - cols_kv[kv_ax]  # global q position - k position
    mask = None
    if flags.causal:
        mask = dist >= 0
    if flags.windowed:
        win = dist < bounds.window
        mask = win if mask is None else jnp.logical_and(mask, win)
    if flags.segmented:
        seg = q_seg[q_ax] == kv_seg[kv_ax]
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


@dataclasses.dataclass(frozen=True)
class _Flags:
    causal: bool
    segmented: bool
    windowed: bool

    @property
    def masked(self) -> bool:
        return self.causal or self.segmented or self.windowed


@dataclasses.dataclass(frozen=True)
class _Bounds:
    lo: jax.Array
    full_lo: jax.Array
    full_hi: jax.Array
    hi: jax.Array
    delta: jax.Array
    window: jax.Array


def _read_bounds(ref) -> _Bounds:
    return _Bounds(*(ref[c] for c in range(6)))


def _block_loops(bd: _Bounds, body, carry, flags: _Flags):
    """Runs `body(j, carry, masked)` over the program's blocks j in [lo, hi).

    Blocks [full_lo, full_hi) need no mask and run in their own loop without any mask arithmetic
    (FlashAttention-2 §3.1: only blocks on the diagonal pay for causal masking); the rest of the
    range (the diagonal, the sliding window's far edge, segment boundaries) is masked.
    """
    if not flags.masked:
        return lax.fori_loop(bd.lo, bd.hi, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(bd.lo, bd.full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(bd.full_lo, bd.full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(bd.full_hi, bd.hi, functools.partial(body, masked=True), carry)


def _fwd_kernel(
    bounds_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    o_ref,
    lse_ref,
    *,
    exp2,
    scale_log2,
    block_q,
    block_kv,
    flags,
    num_q_blocks,
    reverse,
    block_axis,
):
    # Causal programs are issued heaviest first (reversed query blocks) to shorten the tail.
    i = num_q_blocks - 1 - pl.program_id(block_axis) if reverse else pl.program_id(block_axis)
    bd = _read_bounds(bounds_ref)
    q = q_ref[...]
    q_seg = qseg_ref[...] if flags.segmented else None
    rows = i * block_q + jnp.arange(block_q)

    def body(j, carry, masked):
        acc, m, l = carry
        start = j * block_kv
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s = _dot(q, k, trans_b=True)  # [block_q, block_kv], fp32
        if masked:
            kv_seg = kvseg_ref[pl.ds(start, block_kv)] if flags.segmented else None
            vis = _visible(rows, start + jnp.arange(block_kv), bd, q_seg, kv_seg, flags=flags)
            s = jnp.where(vis, s, -jnp.inf)
        # Online softmax with the scale folded into one FMA per logit (FlashAttention-2 §3.1).
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale_log2)
        p = exp2(s * scale_log2 - m_new[:, None])
        alpha = exp2(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    head_dim = q.shape[-1]
    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), _M_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = _block_loops(bd, body, carry, flags)
    # Normalise once at the end (FlashAttention-2 §3.1, "unscaled output"); l == 0 means the
    # row saw no key: output 0, lse -inf.
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))


def _dkv_kernel(
    bounds_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    kvseg_ref,
    dk_ref,
    dv_ref,
    *,
    exp2,
    scale_log2,
    sm_scale,
    block_q,
    block_kv,
    flags,
    group,
    block_axis,
):
    j = pl.program_id(block_axis)
    bd = _read_bounds(bounds_ref)
    k = k_ref[...]
    v = v_ref[...]
    kv_seg = kvseg_ref[...] if flags.segmented else None
    cols = j * block_kv + jnp.arange(block_kv)

    def body(i, carry, masked, g):
        dk, dv = carry
        start = i * block_q
        q = q_ref[pl.ds(start, block_q), g, :]
        do = do_ref[pl.ds(start, block_q), g, :]
        lse = lse_ref[g, pl.ds(start, block_q)]
        di = delta_ref[g, pl.ds(start, block_q)]
        # Transposed tile [block_kv, block_q]: dV and dK then come out as plain products.
        t = _dot(k, q, trans_b=True) * scale_log2 - lse[None, :]
        if masked:
            q_seg = qseg_ref[pl.ds(start, block_q)] if flags.segmented else None
            vis_t = _visible(
                start + jnp.arange(block_q), cols, bd, q_seg, kv_seg, flags=flags, kv_major=True
            )
            t = jnp.where(vis_t, t, -jnp.inf)
        p_t = exp2(t)
        dv = dv + _dot(p_t.astype(do.dtype), do)
        dp_t = _dot(v, do, trans_b=True)
        ds_t = p_t * (dp_t - di[None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

    def head(g, carry):
        # The `group` query heads that share this kv head accumulate into the same dK/dV (GQA).
        return _block_loops(bd, functools.partial(body, g=g), carry, flags)

    head_dim = k.shape[-1]
    zeros = jnp.zeros((block_kv, head_dim), jnp.float32)
    if group == 1:
        dk, dv = head(0, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    bounds_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    o_ref,
    lse_ref,
    dlse_ref,
    qseg_ref,
    kvseg_ref,
    dq_ref,
    delta_ref,
    *,
    exp2,
    scale_log2,
    sm_scale,
    block_q,
    block_kv,
    flags,
    num_q_blocks,
    reverse,
    block_axis,
):
    i = num_q_blocks - 1 - pl.program_id(block_axis) if reverse else pl.program_id(block_axis)
    bd = _read_bounds(bounds_ref)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    # FlashAttention-2's D = rowsum(O∘dO), here where dO is loaded anyway, rather than in a pass
    # of its own over O and dO before the two kernels (0.5 ms of the 1B LoRA step). lse2 is in
    # base 2, lse = lse2·ln2, so the natural lse's cotangent dlse2/ln2 folds in:
    # dS = P∘(dP − (D − dlse)). Rows that saw no key (lse = -inf) have P = 0: their lse is made
    # finite and their D zero, so a NaN lse cotangent from a careless merge cannot leak into dq/dk/dv.
    empty = lse == -jnp.inf
    lse = jnp.where(empty, 0.0, lse)
    di = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    di = jnp.where(empty, 0.0, di - dlse_ref[...] * (1.0 / _LN2))
    delta_ref[...] = di
    q_seg = qseg_ref[...] if flags.segmented else None
    rows = i * block_q + jnp.arange(block_q)

    def body(j, dq, masked):
        start = j * block_kv
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        t = _dot(q, k, trans_b=True) * scale_log2 - lse[:, None]
        if masked:
            kv_seg = kvseg_ref[pl.ds(start, block_kv)] if flags.segmented else None
            vis = _visible(rows, start + jnp.arange(block_kv), bd, q_seg, kv_seg, flags=flags)
            t = jnp.where(vis, t, -jnp.inf)
        p = exp2(t)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - di[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _block_loops(bd, body, dq, flags)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------
# Block schedule: which blocks each program visits (computed with XLA before the launch)
# --------------------------------------------------------------------------------------------

_BOUNDS_COLS = 8  # lo, full_lo, full_hi, hi, delta, window, 2 unused (a power-of-two row)


def _segment_summary(seg, block, pad_value):
    """Per block [B, n]: min and max segment id of its real tokens, and whether every token
    (padding included) carries one id (then a same-id block pair needs no segment mask)."""
    b, s = seg.shape
    blocks = seg.reshape(b, s // block, block)
    real = blocks != pad_value
    lo = jnp.min(jnp.where(real, blocks, _INT_MAX), axis=-1)
    hi = jnp.max(jnp.where(real, blocks, _INT_MIN), axis=-1)
    uniform = jnp.all(blocks == blocks[..., :1], axis=-1) & real[..., 0]
    return lo, hi, uniform


def _schedule(
    *, batch, sq, skv, block_q, block_kv, delta, window, flags, q_seg, kv_seg, rows_are_q
):
    """int32 [B, n_rows, 8] = (lo, full_lo, full_hi, hi, delta, window, 0, 0) per program row.

    A program row is a query block (forward, dQ) or a kv block (dK/dV); it visits column blocks
    [lo, hi): block pairs with no visible (query, key) pair are dropped from both ends, so causal,
    sliding-window and packed-segment sparsity cost nothing (loop bounds, not masks). Inside,
    [full_lo, full_hi) are pairs where every query sees every key; they run without masks. Segment
    ids are compared per block as [min, max] intervals, so any id order is correct; sorted
    (packed) ids also make the bounds tight. `window` here is already > 0 (INT_MAX = none).
    """
    nq, nk = sq // block_q, skv // block_kv
    qi = jnp.arange(nq, dtype=jnp.int32)[:, None]
    kj = jnp.arange(nk, dtype=jnp.int32)[None, :]
    # Global q - k distance over a block pair spans [dist_min, dist_max].
    dist_min = qi * block_q + delta - (kj * block_kv + block_kv - 1)
    dist_max = qi * block_q + block_q - 1 + delta - kj * block_kv
    need = jnp.ones((nq, nk), bool)
    full = jnp.ones((nq, nk), bool)
    if flags.causal:
        need &= dist_max >= 0
        full &= dist_min >= 0
    if flags.windowed:
        need &= dist_min < window
        full &= dist_max < window
    need = jnp.broadcast_to(need, (batch, nq, nk))
    full = jnp.broadcast_to(full, (batch, nq, nk))
    if flags.segmented:
        q_lo, q_hi, q_uni = _segment_summary(q_seg, block_q, _Q_PAD_SEGMENT)
        k_lo, k_hi, k_uni = _segment_summary(kv_seg, block_kv, _KV_PAD_SEGMENT)
        need &= (k_lo[:, None, :] <= q_hi[:, :, None]) & (q_lo[:, :, None] <= k_hi[:, None, :])
        full &= q_uni[:, :, None] & k_uni[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :])
    if not rows_are_q:
        need, full = need.transpose(0, 2, 1), full.transpose(0, 2, 1)
    full &= need
    n = need.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)

    def first(x):
        return jnp.where(x.any(-1), jnp.min(jnp.where(x, idx, n), -1), 0)

    def last_plus_one(x):
        return jnp.where(x.any(-1), jnp.max(jnp.where(x, idx, -1), -1) + 1, 0)

    lo, hi = first(need), last_plus_one(need)
    full_lo, full_hi = first(full), last_plus_one(full)
    # The unmasked loop must cover only full pairs. Causal and window geometry make the full
    # pairs one contiguous run; unsorted segment ids may not, and then the row is all masked.
    has_full_run = (full_hi > full_lo) & (jnp.sum(full, -1) == full_hi - full_lo)
    full_lo = jnp.where(has_full_run, full_lo, hi)
    full_hi = jnp.where(has_full_run, full_hi, hi)
    cols = [
        lo,
        full_lo,
        full_hi,
        hi,
        jnp.broadcast_to(delta, lo.shape),
        jnp.broadcast_to(window, lo.shape),
    ]
    cols += [jnp.zeros_like(lo)] * (_BOUNDS_COLS - len(cols))
    return jnp.stack(cols, -1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (all sequences already padded to a multiple of every block)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    sm_scale: float
    flags: _Flags
    blocks: BlockSizes
    interpret: bool


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _ordered(heads_fastest: bool, grid, in_specs, out_specs) -> dict:
    """pallas_call's grid and specs, written for a (blocks, heads, batch) grid; with
    `heads_fastest` the grid runs (heads, blocks, batch) and each index map is called with its
    arguments put back in the written order."""
    if not heads_fastest:
        return dict(grid=grid, in_specs=in_specs, out_specs=out_specs)

    def swap(spec):
        if spec is None:
            return None
        f = spec.index_map
        return dataclasses.replace(spec, index_map=lambda hh, i, bb: f(i, hh, bb))

    outs = [swap(o) for o in out_specs] if isinstance(out_specs, list) else swap(out_specs)
    return dict(grid=(grid[1], grid[0], grid[2]), in_specs=[swap(x) for x in in_specs], out_specs=outs)


def _bounds_spec(index_map):
    return pl.BlockSpec((None, None, _BOUNDS_COLS), index_map)


@dataclasses.dataclass(frozen=True)
class _QueryBlocks:
    """The grid of a kernel with one program per (query block, head, batch) that walks kv blocks
    (the forward and dQ): the block schedule and the block specs, with index maps `(i, hh, bb)`.
    Under a causal mask query blocks run last to first (`reverse`): the heaviest programs start
    first."""

    bounds: jax.Array
    count: int  # query blocks
    reverse: bool
    bounds_spec: pl.BlockSpec
    q_block: pl.BlockSpec  # [block_q, D] of one head, for [B, Sq, H, D] arrays
    rows: pl.BlockSpec  # [block_q] of one head, for [B, H, Sq] arrays
    kv_head: pl.BlockSpec  # all of the head's kv head, for [B, Skv, KH, D] arrays
    segment_specs: tuple  # (q's, kv's) segment ids, or (None, None) unsegmented


def _query_blocks(q, k, q_seg, kv_seg, pos, st: _Static, bq: int, bk: int) -> _QueryBlocks:
    b, sq, h, d = q.shape
    _, skv, kh, _ = k.shape
    group, nq, reverse = h // kh, sq // bq, st.flags.causal
    bounds = _schedule(batch=b, sq=sq, skv=skv, block_q=bq, block_kv=bk, delta=pos[0], window=pos[1],
                       flags=st.flags, q_seg=q_seg, kv_seg=kv_seg, rows_are_q=True)
    qi = (lambda i: nq - 1 - i) if reverse else (lambda i: i)
    segments = (pl.BlockSpec((None, bq), lambda i, hh, bb: (bb, qi(i))),
                pl.BlockSpec((None, skv), lambda i, hh, bb: (bb, 0))) if st.flags.segmented else (None, None)
    return _QueryBlocks(
        bounds=bounds, count=nq, reverse=reverse,
        bounds_spec=_bounds_spec(lambda i, hh, bb: (bb, qi(i), 0)),
        q_block=pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, qi(i), hh, 0)),
        rows=pl.BlockSpec((None, None, bq), lambda i, hh, bb: (bb, hh, qi(i))),
        kv_head=pl.BlockSpec((None, skv, None, d), lambda i, hh, bb: (bb, 0, hh // group, 0)),
        segment_specs=segments)


def _fwd_call(q, k, v, q_seg, kv_seg, pos, st: _Static):
    """out [B, Sq, H, D] and base-2 lse [B, H, Sq]: one program per (query block, head, batch).

    `pos` = int32 [q_offset - kv_offset, window]. Query blocks run along the grid's fastest axis,
    so the programs in flight share their head's K/V in L2 (`BlockSizes.fwd_heads_fastest`: heads
    instead, as the Mosaic forward and the backward kernels do).
    """
    if st.blocks.forward == "mosaic":  # flash_attention resolved "auto" and checked the case fits
        from jaxtune.kernels.flash_attention_mosaic import mosaic_forward

        return mosaic_forward(q, k, v, causal=st.flags.causal, scale_log2=st.sm_scale * _LOG2E,
                              interpret=st.interpret)
    b, sq, h, d = q.shape
    bq, bk = st.blocks.block_q, st.blocks.block_kv
    qb = _query_blocks(q, k, q_seg, kv_seg, pos, st, bq, bk)
    in_specs = [qb.bounds_spec, qb.q_block, qb.kv_head, qb.kv_head, *qb.segment_specs]
    return pl.pallas_call(
        functools.partial(
            _fwd_kernel,
            exp2=_exp2_for(st, q.dtype),
            scale_log2=st.sm_scale * _LOG2E,
            block_q=bq,
            block_kv=bk,
            flags=st.flags,
            num_q_blocks=qb.count,
            reverse=qb.reverse,
            block_axis=int(st.blocks.fwd_heads_fastest),
        ),
        **_ordered(st.blocks.fwd_heads_fastest, (qb.count, h, b), in_specs, [qb.q_block, qb.rows]),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, sq), jnp.float32),
        ],
        compiler_params=_params(st.blocks.num_warps_fwd, st.blocks.num_stages_fwd),
        interpret=st.interpret,
        name="jaxtune_flash_fwd",
    )(qb.bounds, q, k, v, q_seg, kv_seg)


def _dkv_call(q, k, v, q_seg, kv_seg, pos, lse2, di, do, st: _Static):
    """dk, dv: one program per (kv block, kv head, batch).

    q, do, lse, di are seen as [B, Sq, KH, G, D] / [B, KH, G, Sq] (free reshapes) so that one
    program reads the G query heads of its kv head and GQA needs no reduction afterwards. With
    `BlockSizes.dkv_per_query_head` (and G > 1) one program per (kv block, query head, batch)
    instead, each seeing its own query head (a block of 1 along G), and the G float32 partials of
    a kv head are summed here.
    """
    b, sq, h, d = q.shape
    _, skv, kh, _ = k.shape
    group = h // kh
    per_query_head = st.blocks.dkv_per_query_head and group > 1
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_kv_dkv
    bounds = _schedule(
        batch=b,
        sq=sq,
        skv=skv,
        block_q=bq,
        block_kv=bk,
        delta=pos[0],
        window=pos[1],
        flags=st.flags,
        q_seg=q_seg,
        kv_seg=kv_seg,
        rows_are_q=False,
    )
    if per_query_head:  # grid axis 1 runs over query heads hh; their kv head is hh // group
        g_in = 1
        qfull = pl.BlockSpec((None, sq, None, 1, d), lambda j, hh, bb: (bb, 0, hh // group, hh % group, 0))
        rowfull = pl.BlockSpec((None, None, 1, sq), lambda j, hh, bb: (bb, hh // group, hh % group, 0))
        kvblk = pl.BlockSpec((None, bk, None, d), lambda j, hh, bb: (bb, j, hh // group, 0))
        outblk = pl.BlockSpec((None, bk, None, d), lambda j, hh, bb: (bb, j, hh, 0))
        out_shape = jax.ShapeDtypeStruct((b, skv, h, d), jnp.float32 if st.blocks.dkv_partials_f32 else k.dtype)
        heads = h
    else:
        g_in = group
        qfull = pl.BlockSpec((None, sq, None, group, d), lambda j, hh, bb: (bb, 0, hh, 0, 0))
        rowfull = pl.BlockSpec((None, None, group, sq), lambda j, hh, bb: (bb, hh, 0, 0))
        kvblk = outblk = pl.BlockSpec((None, bk, None, d), lambda j, hh, bb: (bb, j, hh, 0))
        out_shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
        heads = kh
    in_specs = [
        _bounds_spec(lambda j, hh, bb: (bb, j, 0)),
        qfull,
        kvblk,
        kvblk,
        qfull,
        rowfull,
        rowfull,
    ]
    if st.flags.segmented:
        in_specs += [
            pl.BlockSpec((None, sq), lambda j, hh, bb: (bb, 0)),
            pl.BlockSpec((None, bk), lambda j, hh, bb: (bb, j)),
        ]
    else:
        in_specs += [None, None]
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            exp2=_exp2_for(st, q.dtype),
            scale_log2=st.sm_scale * _LOG2E,
            sm_scale=st.sm_scale,
            block_q=bq,
            block_kv=bk,
            flags=st.flags,
            group=g_in,
            block_axis=int(st.blocks.bwd_heads_fastest),
        ),
        **_ordered(st.blocks.bwd_heads_fastest, (skv // bk, heads, b), in_specs, [outblk, outblk]),
        out_shape=[out_shape, out_shape],
        compiler_params=_params(st.blocks.num_warps_dkv, st.blocks.num_stages_dkv),
        interpret=st.interpret,
        name="jaxtune_flash_bwd_dkv",
    )(
        bounds,
        q.reshape(b, sq, kh, group, d),
        k,
        v,
        do.reshape(b, sq, kh, group, d),
        lse2.reshape(b, kh, group, sq),
        di.reshape(b, kh, group, sq),
        q_seg,
        kv_seg,
    )
    if per_query_head:
        dk = dk.reshape(b, skv, kh, group, d).sum(axis=3, dtype=jnp.float32).astype(k.dtype)
        dv = dv.reshape(b, skv, kh, group, d).sum(axis=3, dtype=jnp.float32).astype(v.dtype)
    return dk, dv


def _dq_call(q, k, v, q_seg, kv_seg, pos, lse2, o, dlse2, do, st: _Static):
    """(dq, D): one program per (query block, head, batch), walking kv blocks like the forward.

    D `[B, H, Sq]` float32 is FlashAttention-2's rowsum(O∘dO) less the lse cotangent (0 on rows
    that saw no key), computed here for the dK/dV kernel, which runs after this one."""
    b, sq, h, d = q.shape
    qb = _query_blocks(q, k, q_seg, kv_seg, pos, st, st.blocks.block_q_dq, st.blocks.block_kv_dq)
    in_specs = [qb.bounds_spec, qb.q_block, qb.kv_head, qb.kv_head, qb.q_block, qb.q_block, qb.rows, qb.rows,
                *qb.segment_specs]
    return pl.pallas_call(
        functools.partial(
            _dq_kernel,
            exp2=_exp2_for(st, q.dtype),
            scale_log2=st.sm_scale * _LOG2E,
            sm_scale=st.sm_scale,
            block_q=st.blocks.block_q_dq,
            block_kv=st.blocks.block_kv_dq,
            flags=st.flags,
            num_q_blocks=qb.count,
            reverse=qb.reverse,
            block_axis=int(st.blocks.bwd_heads_fastest),
        ),
        **_ordered(st.blocks.bwd_heads_fastest, (qb.count, h, b), in_specs, [qb.q_block, qb.rows]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(lse2.shape, jnp.float32)],
        compiler_params=_params(st.blocks.num_warps_dq, st.blocks.num_stages_dq),
        interpret=st.interpret,
        name="jaxtune_flash_bwd_dq",
    )(qb.bounds, q, k, v, do, o, lse2, dlse2, q_seg, kv_seg)


# --------------------------------------------------------------------------------------------
# custom_vjp wiring
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, pos, st):
    return _fwd_call(q, k, v, q_seg, kv_seg, pos, st)


def _flash_fwd(q, k, v, q_seg, kv_seg, pos, st):
    o, lse2 = _fwd_call(q, k, v, q_seg, kv_seg, pos, st)
    # Named so that a remat policy can keep them (jaxtune's "save_attention", with q, k and v named
    # by the caller): the backward then needs no second forward pass to recover them.
    o = checkpoint_name(o, "attention_out")
    lse2 = checkpoint_name(lse2, "attention_lse")
    return (o, lse2), (q, k, v, q_seg, kv_seg, pos, o, lse2)


def _flash_bwd(st, res, cts):
    q, k, v, q_seg, kv_seg, pos, o, lse2 = res
    do, dlse2 = cts
    # The dQ kernel also gives D (and the lse/D treatment of rows that saw no key, which the dK/dV
    # kernel's lse gets here: exp2(-inf - lse) would be NaN).
    dq, di = _dq_call(q, k, v, q_seg, kv_seg, pos, lse2, o, dlse2, do, st)
    lse_safe = jnp.where(jnp.isneginf(lse2), 0.0, lse2)
    dk, dv = _dkv_call(q, k, v, q_seg, kv_seg, pos, lse_safe, di, do, st)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check(q, k, v, segment_ids, kv_segment_ids, sm_scale):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"flash_attention expects q [B, S, H, D] and k, v [B, S, KH, D]; got "
            f"{q.shape=}, {k.shape=}, {v.shape=}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape=}, {v.shape=}")
    b, sq, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v batch and head_dim must match q; got {q.shape=}, {k.shape=}")
    if h % k.shape[2]:
        raise ValueError(f"query heads must be a multiple of kv heads; got {q.shape=}, {k.shape=}")
    if d > 256:
        raise ValueError(f"head_dim up to 256 is supported; got {q.shape=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32; got {q.dtype=}")
    if segment_ids is not None and segment_ids.shape != (b, sq):
        raise ValueError(
            f"segment_ids must be [B, Sq] = {(b, sq)}; got {segment_ids.shape=} for {q.shape=}"
        )
    if kv_segment_ids is not None:
        if segment_ids is None:
            raise ValueError("kv_segment_ids needs segment_ids (the query block's ids) as well")
        if kv_segment_ids.shape != (b, k.shape[1]):
            raise ValueError(
                f"kv_segment_ids must be [B, Skv] = {(b, k.shape[1])}; got "
                f"{kv_segment_ids.shape=} for {k.shape=}"
            )
    elif segment_ids is not None and k.shape[1] != sq:
        raise ValueError(f"with Sq != Skv pass kv_segment_ids too; got {q.shape=}, {k.shape=}")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"sm_scale must be positive; got {sm_scale=}")


def _tiled_shape(block_sizes, q, k):
    """(blocks clamped to the lengths, padded q length, padded kv length, padded head dim).

    Lengths are padded to a multiple of every tile (no masked loads in the kernels) and the head
    dim to a power of two (Triton tiles); zero columns change no dot product."""
    sq, skv, d = q.shape[1], k.shape[1], q.shape[3]
    blocks = (block_sizes or BlockSizes.get_default(d, q.dtype))._clamped(sq, skv)
    mult_q = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    mult_kv = max(blocks.block_kv, blocks.block_kv_dkv, blocks.block_kv_dq)
    return blocks, pl.cdiv(sq, mult_q) * mult_q, pl.cdiv(skv, mult_kv) * mult_kv, max(_MIN_BLOCK, pl.next_power_of_2(d))


def _mosaic_problems(q, k, segment_ids, kv_segment_ids, window, q_offset, kv_offset, block_sizes) -> list[str]:
    """What the Mosaic forward cannot do (yet) for this call, named; empty when it fits. Runs
    before the jitted `_flash_attention`, where the offsets would be traced values."""
    from jaxtune.kernels.flash_attention_mosaic import TILE_Q  # query rows (and keys) per step

    _, sq_p, skv_p, _ = _tiled_shape(block_sizes, q, k)
    problems = []
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset):
        problems.append("q/kv offsets (ring attention)")
    if segment_ids is not None or kv_segment_ids is not None:
        problems.append("segment ids")
    if window is not None:
        problems.append("a sliding window")
    if q.shape[1] != k.shape[1] or (sq_p, skv_p) != (q.shape[1], k.shape[1]) or q.shape[1] % TILE_Q:
        problems.append(f"lengths {q.shape[1]}/{k.shape[1]} (equal multiples of the tiles and of "
                        f"{TILE_Q} are needed)")
    if q.shape[3] not in (64, 128):  # 256 would need more than the SM's 227 KB of SMEM
        problems.append(f"head_dim {q.shape[3]} (64 or 128)")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        problems.append(f"dtype {q.dtype} (bf16/fp16)")
    return problems


def _resolve_forward(blocks: BlockSizes, problems: list[str], *, hopper: bool) -> BlockSizes:
    """`blocks` with `forward` decided: "auto" takes the Mosaic forward on a Hopper GPU where the
    call fits it, Triton elsewhere; an explicit "mosaic" that does not fit is refused by name."""
    if blocks.forward == "mosaic" and problems:
        raise NotImplementedError("BlockSizes(forward='mosaic') does not support " + ", ".join(problems)
                                  + "; use forward='triton' (or 'auto')")
    if blocks.forward == "auto":
        return dataclasses.replace(blocks, forward="mosaic" if hopper and not problems else "triton")
    return blocks


def _pad_to(x, n, axis=1, value=0):
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(
    jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret", "return_lse")
)
def _flash_attention(
    q,
    k,
    v,
    segment_ids,
    kv_segment_ids,
    q_offset,
    kv_offset,
    window,
    *,
    causal,
    sm_scale,
    block_sizes,
    interpret,
    return_lse,
):
    b, sq, h, d = q.shape
    skv = k.shape[1]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    blocks, sq_p, skv_p, d_p = _tiled_shape(block_sizes, q, k)
    q_seg, kv_seg = segment_ids, kv_segment_ids
    if q_seg is not None and kv_seg is None:
        kv_seg = q_seg
    if q_seg is None and (sq_p != sq or skv_p != skv):
        # Padded keys must stay invisible whatever the offsets: real tokens share one segment,
        # padding gets ids no real token has (the schedule still runs whole blocks unmasked).
        q_seg = jnp.zeros((b, sq), jnp.int32)
        kv_seg = jnp.zeros((b, skv), jnp.int32)
    if q_seg is not None:
        q_seg = _pad_to(q_seg.astype(jnp.int32), sq_p, value=_Q_PAD_SEGMENT)
        kv_seg = _pad_to(kv_seg.astype(jnp.int32), skv_p, value=_KV_PAD_SEGMENT)
    flags = _Flags(causal=bool(causal), segmented=q_seg is not None, windowed=window is not None)
    st = _Static(sm_scale=float(sm_scale), flags=flags, blocks=blocks, interpret=bool(interpret))

    delta = jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32)
    if window is None:
        win = jnp.int32(_INT_MAX)
    else:
        win = jnp.asarray(window, jnp.int32)
        win = jnp.where(win > 0, win, _INT_MAX)  # <= 0 means no window, as in the model config
    pos = jnp.stack([delta, win])

    qp = _pad_to(_pad_to(q, sq_p), d_p, axis=3)
    kp = _pad_to(_pad_to(k, skv_p), d_p, axis=3)
    vp = _pad_to(_pad_to(v, skv_p), d_p, axis=3)
    out, lse2 = _flash(qp, kp, vp, q_seg, kv_seg, pos, st)
    out = out[:, :sq, :, :d]
    if not return_lse:
        return out
    return out, lse2[:, :, :sq] * _LN2


def flash_attention(
    q,
    k,
    v,
    *,
    segment_ids=None,
    causal=True,
    sm_scale=None,
    block_sizes=None,
    interpret=False,
    return_lse=False,
    kv_segment_ids=None,
    q_offset=0,
    kv_offset=0,
    window=None,
):
    """Exact softmax attention, FlashAttention-2 style (jitted; differentiable in q, k, v).

    Args:
      q: `[B, Sq, H, D]`; k, v: `[B, Skv, KH, D]`, `H % KH == 0` (GQA/MQA without repeating K/V).
        bf16, fp16 or fp32 (fp32 uses exact fp32 products); any lengths; D <= 256.
      segment_ids: int32 `[B, Sq]`: tokens attend only within their segment (packed sequences).
        Values must lie in (-2**31 + 1, 2**31).
      causal: query at global position `q_offset + i` sees keys at `kv_offset + j <= q_offset + i`.
      sm_scale: logit scale (> 0), default `1/sqrt(D)`.
      block_sizes: `BlockSizes`; default `BlockSizes.get_default(D, dtype)`.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      return_lse: also return the natural-log log-sum-exp `[B, H, Sq]` (fp32).
      kv_segment_ids: int32 `[B, Skv]` for the kv block when it is not the query block (ring
        attention); then `segment_ids` are the query block's ids.
      q_offset, kv_offset: global start positions of the query and kv blocks (int or int32
        scalar, may be traced), used by the causal and window masks (ring attention).
      window: sliding window (int or traced int32 scalar; None or <= 0: none): a query sees only
        keys with `q_pos - k_pos < window`, as in the model's `sliding_windows`.

    Returns:
      out `[B, Sq, H, D]` in q's dtype, and with `return_lse` the lse `[B, H, Sq]`. A query that
      sees no key gets out = 0 and lse = -inf, never NaN.

    Ring attention merges per-block results `(out_i, lse_i)` by log-sum-exp:
    `m = max_i lse_i; w_i = exp(lse_i - m) (0 where lse_i = -inf); lse = m + log(sum_i w_i);
    out = sum_i out_i · w_i / sum_i w_i`, with `m` and `sum_i w_i` guarded for rows empty in every
    block (`jnp.logaddexp(-inf, -inf)` has a NaN gradient). `jax.grad` through the merge is exact:
    the backward takes the lse cotangent (tests/test_flash_attention.py has such a merge).
    """
    _check(q, k, v, segment_ids, kv_segment_ids, sm_scale)
    if isinstance(window, int) and window <= 0:
        window = None  # static "no window": no mask arithmetic at all
    blocks = block_sizes or BlockSizes.get_default(q.shape[3], q.dtype)
    if blocks.forward != "triton":
        from jaxtune.kernels.mosaic_smem import on_hopper  # Mosaic GPU is imported only when it may run

        problems = _mosaic_problems(q, k, segment_ids, kv_segment_ids, window, q_offset, kv_offset, blocks)
        blocks = _resolve_forward(blocks, problems, hopper=not interpret and on_hopper())
    return _flash_attention(
        q,
        k,
        v,
        segment_ids,
        kv_segment_ids,
        q_offset,
        kv_offset,
        window,
        causal=causal,
        sm_scale=sm_scale,
        block_sizes=blocks,
        interpret=interpret,
        return_lse=return_lse,
    )


# --------------------------------------------------------------------------------------------
# Plain-jnp reference
# --------------------------------------------------------------------------------------------


def flash_attention_reference(
    q,
    k,
    v,
    *,
    segment_ids=None,
    causal=True,
    sm_scale=None,
    return_lse=False,
    kv_segment_ids=None,
    q_offset=0,
    kv_offset=0,
    window=None,
):
    """Same contract as `flash_attention`, materialising the [B, H, Sq, Skv] logits in fp32."""
    b, sq, h, d = q.shape
    skv, kh = k.shape[1], k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    hi = lax.Precision.HIGHEST
    qg = q.astype(jnp.float32).reshape(b, sq, kh, h // kh, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32), precision=hi) * sm_scale
    mask = jnp.ones((b, 1, 1, sq, skv), bool)
    dist = (q_offset + jnp.arange(sq))[:, None] - (kv_offset + jnp.arange(skv))[None, :]
    if causal:
        mask &= (dist >= 0)[None, None, None]
    if window is not None:
        mask &= ((window <= 0) | (dist < window))[None, None, None]
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask &= (segment_ids[:, :, None] == kv_seg[:, None, :])[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(e, axis=-1, keepdims=True)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    o = jnp.einsum("bkgqs,bskd->bqkgd", e / l_safe, v.astype(jnp.float32), precision=hi)
    o = o.reshape(b, sq, h, d).astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(l_safe))[..., 0].reshape(b, h, sq)
    return o, lse

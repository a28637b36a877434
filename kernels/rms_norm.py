"""RMSNorm and residual add + RMSNorm in Pallas (Triton lowering): one pass over the data each way.

The model's RMSNorm (`rms_norm_reference`, as in HF) computes in float32 and casts the normalised
rows back to x's dtype *before* multiplying by the scale. XLA runs it as two fusions forward (the
row reduction, then the apply) and two backward (a reduction fusion, then the residual-gradient
add): on the 1B LoRA step ([8192, 2048] bf16, H200) ≈ 53 µs forward and 90 µs backward per norm
where one pass over the data needs ≈ 15 and 30. Here each program holds whole rows (all of D in
one block), so the row reductions stay in registers and every array is read and written once.

Forward: one program per `block_rows` rows. `add_rms_norm` also writes s = h + delta (the residual
stream, in h's dtype) and normalises that rounded s, as the model does.

Backward (with n = x·r, r = rsqrt(mean(x²) + eps), y = cast(n)·cast(scale)):
  dn = cast(dy·cast(scale))          the cast is the identity for the gradient; the product is
                                     rounded to x's dtype as the reference's multiply does
  dx = r·(dn − n·mean(dn·n))         per row, recomputing r from x (no saved statistics)
  dscale = Σ_rows dy·cast(n)         the *rounded* n, as the reference multiplies by it
and for `add_rms_norm` dh = ddelta = ds + dx, written once. A fixed number of programs
(`BlockSizes.bwd_programs`) each loops over a contiguous run of row blocks, accumulating its
dscale partial in registers and writing one float32 row of `[programs, D]`, summed afterwards
(Liger-Kernel's RMSNorm backward does the same): a partial per row block would write as many
bytes as the activations themselves. Residuals are only the inputs (x, or s for `add_rms_norm`,
which is an output anyway) and the scale.

The custom_vjp uses symbolic zeros: when the scale is not differentiated (LoRA freezes it) the
backward writes no dscale partials, and when s has no other use (ds = 0) it reads no ds.

Rows need not be a multiple of `block_rows`: loads and stores of the last block are masked, and
the masked rows are kept out of the dscale sums with a select (never a product, so whatever
they hold cannot turn into NaN there).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "BlockSizes",
    "add_rms_norm",
    "add_rms_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "supports",
]

_MIN_D = 16
# The backward keeps about six float32 copies of a block live: at D = 16384 one row alone needs
# ~100K registers, more than an SM has, so it would spill. Wider rows would need a loop over D.
_MAX_D = 8192
# Elements per block: 16 float32 values per thread at 8 warps. Enough bytes per program to keep
# loads in flight, few enough registers to leave room for several programs per SM.
_BLOCK_ELEMS = 4096
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per program and Triton launch parameters (none of it measured on a GPU yet).

    `block_rows`/`block_rows_bwd`: rows per forward program / per backward loop step (powers of
    two; the whole of D is always one block). `bwd_programs`: backward grid size, 0 = twice the
    default device's SM count (264 on an H200; 256 where unknown), capped at the number of row
    blocks. More programs hide more latency but write more [programs, D] float32 dscale partials.
    """

    block_rows: int = 2
    num_warps: int = 8
    block_rows_bwd: int = 2
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2
    bwd_programs: int = 0

    def __post_init__(self):
        for name in ("block_rows", "block_rows_bwd", "num_warps", "num_warps_bwd"):
            v = getattr(self, name)
            if not _pow2(v):
                raise ValueError(f"BlockSizes.{name}={v} must be a power of two")
        if self.num_stages_bwd < 1 or self.bwd_programs < 0:
            raise ValueError(f"bad {self.num_stages_bwd=} or {self.bwd_programs=}")

    @classmethod
    def get_default(cls, d: int) -> BlockSizes:
        """`_BLOCK_ELEMS // d` rows (at least one), 8 warps up to 4096 elements per block, 16 above
        (16 float32 values per thread either way), the same for the backward."""
        rows = max(1, _BLOCK_ELEMS // d)
        warps = max(4, min(16, rows * d // 512))
        return cls(block_rows=rows, num_warps=warps, block_rows_bwd=rows, num_warps_bwd=warps)


def supports(shape, dtype) -> bool:
    """Whether the kernels take x of this shape ([..., D], any number of rows) and dtype.

    D must be a power of two (Triton blocks) in [16, 8192]; dtype bf16, fp16 or fp32.
    """
    return (
        len(shape) >= 1
        and _pow2(shape[-1])
        and _MIN_D <= shape[-1] <= _MAX_D
        and jnp.dtype(dtype) in _DTYPES
    )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    eps: float
    blocks: BlockSizes
    interpret: bool
    name: str | None = None


def _row_mask(start, block_rows: int, d: int, n_rows: int):
    """[block_rows, d] bool: which rows of the block starting at row `start` exist."""
    return start + lax.broadcasted_iota(jnp.int32, (block_rows, d), 0) < n_rows


def _load(ref, mask):
    return ref[...] if mask is None else plgpu.load(ref, mask=mask, other=0)


def _store(ref, val, mask):
    if mask is None:
        ref[...] = val
    else:
        plgpu.store(ref, val, mask=mask)


def _rounded(x, dtype, interpret: bool):
    """float32 x rounded to `dtype` (and back to float32): the reference's casts to x's dtype.

    In interpret mode XLA, allowed excess precision by default, deletes a f32 -> bf16 -> f32
    round trip, so there the rounding is a `reduce_precision`, which it keeps (Triton has no
    lowering for it, and keeps the casts)."""
    if dtype == jnp.float32:
        return x
    if interpret:
        info = jnp.finfo(dtype)
        return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x.astype(dtype).astype(jnp.float32)


def _rstd(x, eps: float):
    """rsqrt(mean(x²) + eps) per row of a float32 [rows, D] block."""
    return lax.rsqrt(jnp.sum(x * x, axis=1) / x.shape[1] + eps)


def _fwd_kernel(*refs, eps, n_rows, add, ragged, interpret):
    if add:
        h_ref, delta_ref, scale_ref, s_ref, y_ref = refs
    else:
        x_ref, scale_ref, y_ref = refs
    block_rows, d = y_ref.shape
    dtype = y_ref.dtype
    mask = _row_mask(pl.program_id(0) * block_rows, block_rows, d, n_rows) if ragged else None
    if add:
        s = (_load(h_ref, mask).astype(jnp.float32) + _load(delta_ref, mask).astype(jnp.float32)).astype(dtype)
        _store(s_ref, s, mask)
    else:
        s = _load(x_ref, mask)
    x = s.astype(jnp.float32)
    n = x * _rstd(x, eps)[:, None]
    scale = scale_ref[...].astype(dtype).astype(jnp.float32)
    y = _rounded(n, dtype, interpret) * scale[None, :]
    _store(y_ref, y.astype(dtype), mask)


def _bwd_kernel(*refs, eps, n_rows, block_rows, n_blocks, programs, has_ds, with_dscale, ragged,
                interpret):
    refs = list(refs)
    ds_ref = refs.pop(0) if has_ds else None
    dy_ref, x_ref, scale_ref, dx_ref = refs[:4]
    dscale_ref = refs[4] if with_dscale else None
    d = x_ref.shape[1]
    dtype = x_ref.dtype
    p = pl.program_id(0)
    # Program p takes row blocks [p·n/P, (p+1)·n/P): contiguous runs, lengths differing by <= 1.
    lo = lax.div(p * n_blocks, programs)
    hi = lax.div((p + 1) * n_blocks, programs)
    scale = scale_ref[...].astype(dtype).astype(jnp.float32)

    def body(j, acc):
        start = j * block_rows
        rows = pl.ds(pl.multiple_of(start, block_rows), block_rows)
        mask = _row_mask(start, block_rows, d, n_rows) if ragged else None
        x = _load(x_ref.at[rows, :], mask).astype(jnp.float32)
        dy = _load(dy_ref.at[rows, :], mask).astype(jnp.float32)
        r = _rstd(x, eps)[:, None]
        n = x * r
        dn = _rounded(dy * scale[None, :], dtype, interpret)
        dx = r * (dn - n * (jnp.sum(dn * n, axis=1) / d)[:, None])
        if has_ds:
            dx = dx + _load(ds_ref.at[rows, :], mask).astype(jnp.float32)
        _store(dx_ref.at[rows, :], dx.astype(dx_ref.dtype), mask)
        if with_dscale:
            contrib = dy * _rounded(n, dtype, interpret)
            if ragged:
                contrib = jnp.where(mask, contrib, 0.0)
            acc = acc + jnp.sum(contrib, axis=0)
        return acc

    acc = lax.fori_loop(lo, hi, body, jnp.zeros((d,), jnp.float32))
    if with_dscale:
        dscale_ref[...] = acc


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (x, h, delta, s, dy, ds: [N, D]; scale [D])
# --------------------------------------------------------------------------------------------


def _fwd_call(xs, scale, st: _Static):
    """y (or s, y for two inputs h, delta): one program per `block_rows` rows."""
    n_rows, d = xs[0].shape
    br = st.blocks.block_rows
    rows = pl.BlockSpec((br, d), lambda i: (i, 0))
    add = len(xs) == 2
    out = jax.ShapeDtypeStruct(xs[0].shape, xs[0].dtype)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, eps=st.eps, n_rows=n_rows, add=add, ragged=n_rows % br != 0,
                          interpret=st.interpret),
        grid=(pl.cdiv(n_rows, br),),
        in_specs=[rows] * len(xs) + [pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[rows, rows] if add else rows,
        out_shape=[out, out] if add else out,
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps, num_stages=1),
        interpret=st.interpret,
        name="jaxtune_add_rms_norm_fwd" if add else "jaxtune_rms_norm_fwd",
    )(*xs, scale)


def _bwd_programs(blocks: BlockSizes, n_blocks: int) -> int:
    programs = blocks.bwd_programs
    if not programs:
        programs = 2 * (getattr(jax.devices()[0], "core_count", 0) or 128)
    return max(1, min(programs, n_blocks))


def _bwd_call(ds, dy, x, scale, st: _Static, with_dscale: bool):
    """(dx [+ ds], dscale partials [P, D] float32 or None) in one pass."""
    n_rows, d = x.shape
    br = st.blocks.block_rows_bwd
    n_blocks = pl.cdiv(n_rows, br)
    programs = _bwd_programs(st.blocks, n_blocks)
    whole = pl.BlockSpec((n_rows, d), lambda i: (0, 0))
    ins = ([ds] if ds is not None else []) + [dy, x, scale]
    out_specs = [whole]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if with_dscale:
        out_specs.append(pl.BlockSpec((None, d), lambda i: (i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((programs, d), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, eps=st.eps, n_rows=n_rows, block_rows=br, n_blocks=n_blocks,
                          programs=programs, has_ds=ds is not None, with_dscale=with_dscale,
                          ragged=n_rows % br != 0, interpret=st.interpret),
        grid=(programs,),
        in_specs=[whole] * (len(ins) - 1) + [pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_bwd,
                                             num_stages=st.blocks.num_stages_bwd),
        interpret=st.interpret,
        name="jaxtune_rms_norm_bwd",
    )(*ins)
    return outs[0], (outs[1] if with_dscale else None)


# --------------------------------------------------------------------------------------------
# custom_vjp wiring (symbolic zeros: see the module docstring)
# --------------------------------------------------------------------------------------------

# Residual marker for "the scale is differentiated": carried in the residuals' tree structure
# (() or None), which is static, so the backward can leave out the dscale output altogether.
_NEEDS_DSCALE = ()


def _zero(ct) -> bool:
    return isinstance(ct, SymbolicZero)


def _bwd_common(st, x, scale, needs_dscale, ds, dy):
    """(dx + ds, dscale) for cotangents that may be symbolic zeros."""
    ds = None if ds is None or _zero(ds) else ds
    with_dscale = needs_dscale is not None
    if _zero(dy):
        dx = jnp.zeros(x.shape, x.dtype) if ds is None else ds.astype(x.dtype)
        return dx, (jnp.zeros_like(scale) if with_dscale else None)
    dx, partials = _bwd_call(ds, dy, x, scale, st, with_dscale)
    dscale = jnp.sum(partials, axis=0).astype(scale.dtype) if with_dscale else None
    return dx, dscale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, scale, st):
    return _fwd_call([x], scale, st)


def _rms_norm_fwd(x, scale, st):
    y = _fwd_call([x.value], scale.value, st)
    return y, (x.value, scale.value, _NEEDS_DSCALE if scale.perturbed else None)


def _rms_norm_bwd(st, res, dy):
    x, scale, needs_dscale = res
    return _bwd_common(st, x, scale, needs_dscale, None, dy)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _add_rms_norm(h, delta, scale, st):
    return tuple(_fwd_call([h, delta], scale, st))


def _add_rms_norm_fwd(h, delta, scale, st):
    s, y = _fwd_call([h.value, delta.value], scale.value, st)
    if st.name is not None:
        # One copy of s for the caller's remat policy and this backward (see add_rms_norm).
        s = checkpoint_name(s, st.name)
    return (s, y), (s, scale.value, _NEEDS_DSCALE if scale.perturbed else None)


def _add_rms_norm_bwd(st, res, cts):
    s, scale, needs_dscale = res
    ds, dy = cts
    dh, dscale = _bwd_common(st, s, scale, needs_dscale, ds, dy)
    return dh, dh, dscale


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check(fn: str, x, scale):
    if not supports(x.shape, x.dtype):
        raise ValueError(
            f"{fn} needs x [..., D] with D a power of two in [{_MIN_D}, {_MAX_D}] and dtype bf16, "
            f"fp16 or fp32 (see supports()); got {x.shape=}, {x.dtype=}"
        )
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"{fn}: scale must be [D]; got {scale.shape=} for {x.shape=}")


def _static(d, eps, interpret, block_rows, block_sizes, name=None) -> _Static:
    blocks = block_sizes or BlockSizes.get_default(d)
    if block_rows is not None:
        blocks = dataclasses.replace(blocks, block_rows=block_rows, block_rows_bwd=block_rows)
    return _Static(eps=float(eps), blocks=blocks, interpret=bool(interpret), name=name)


def rms_norm(x, scale, eps, *, interpret=False, block_rows=None, block_sizes=None):
    """`rms_norm_reference(x, scale, eps)` as one Pallas kernel each way (differentiable in x, scale).

    Args:
      x: `[..., D]`, bf16/fp16/fp32, D a power of two in [16, 8192] (`supports`); any rows.
      scale: `[D]`, any float dtype (cast to x's dtype before the multiply, as the reference).
      eps: Python float.
      interpret: Pallas interpret mode (CPU).
      block_rows: rows per program (overrides both directions of `block_sizes`).
      block_sizes: `BlockSizes`; default `BlockSizes.get_default(D)`.

    Returns:
      y `[..., D]` in x's dtype.
    """
    _check("rms_norm", x, scale)
    d = x.shape[-1]
    x_nd = x.reshape(-1, d)
    if x_nd.shape[0] == 0:
        return rms_norm_reference(x, scale, eps)
    y_nd = _rms_norm(x_nd, scale, _static(d, eps, interpret, block_rows, block_sizes))
    return y_nd.reshape(x.shape)


def add_rms_norm(h, delta, scale, eps, *, interpret=False, block_rows=None, block_sizes=None, name=None):
    """`(s, rms_norm(s))` with `s = h + delta` in h's dtype, one Pallas kernel each way.

    h, delta: `[..., D]`, same shape and dtype (see `rms_norm` for D, dtypes and the other
    arguments). The backward returns the same array, ds + d(norm)/ds, for h and for delta.
    `name`: a `checkpoint_name` given to s where the forward keeps it for the backward, so that a
    remat policy saving that name keeps one copy of s and never recomputes h + delta.

    Returns:
      s, y: `[..., D]` in h's dtype.
    """
    _check("add_rms_norm", h, scale)
    if delta.shape != h.shape or delta.dtype != h.dtype:
        raise ValueError(f"add_rms_norm: h and delta must match; got {h.shape=}, {h.dtype=}, "
                         f"{delta.shape=}, {delta.dtype=}")
    d = h.shape[-1]
    if h.size == 0:
        return add_rms_norm_reference(h, delta, scale, eps)
    s_nd, y_nd = _add_rms_norm(h.reshape(-1, d), delta.reshape(-1, d), scale,
                               _static(d, eps, interpret, block_rows, block_sizes, name))
    return s_nd.reshape(h.shape), y_nd.reshape(h.shape)


# --------------------------------------------------------------------------------------------
# Plain-jnp reference (the model's code)
# --------------------------------------------------------------------------------------------


def rms_norm_reference(x, scale, eps):
    """RMSNorm over the last axis in float32, cast to x's dtype before the scale (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def add_rms_norm_reference(h, delta, scale, eps):
    """(s, rms_norm_reference(s)) with s = h + delta in h's dtype."""
    s = h + delta
    return s, rms_norm_reference(s, scale, eps)

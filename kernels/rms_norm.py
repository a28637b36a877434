"""RMSNorm over the last dimension as two Pallas (Triton lowering) kernels, one per direction,
with the residual stream's gradient added in the backward's pass.

Why (issue 9, benchmarks/RESULTS.md, fifteenth round): on the 1B LoRA step XLA runs each of the
33 norms as a reduction then a scaling pass in the forward (31 + 22 µs per norm, H200) and as
reductions and an add in the backward, all over `[tokens, D]` arrays. Here a program owns whole
rows, so a norm is one read and one write each way: forward reads h and writes the scaled norm
and the rows' 1/rms (18.5 µs at the 1B shape); backward reads h, 1/rms, the norm's output
gradient and the residual stream's gradient, and writes h's whole gradient (42 µs).

Arithmetic as HF's (and `jaxtune.model.norm.rms_norm`'s) in float32: `n = h·rsqrt(mean(h²) +
eps)`, rounded to h's dtype, times the scale (rounded) — with the same roundings in the backward
as autodiff of that expression (the scale's product rounded before the norm's backward).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["Blocks", "forward", "backward", "forward_reference", "backward_reference", "supports"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_MAX_WIDTH = 16384


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A program's share: whole rows, ≈ `elements` elements of them, on `warps` warps (None: 4 up
    to a width of 2048, else 8). The default (4 rows × 4 warps at the 1B width) is what the step
    runs; `benchmarks/kernel_energy.py` compares one row on 8 warps (Triton's layer-norm tutorial's
    shape): forward and backward together 64.5 µs with the default against 69.8 at [8192, 2048]
    bf16 (H200, RESULTS.md, sixteenth round; a forward alone is too short there to time apart from
    its dispatch)."""

    elements: int = 8192
    warps: int | None = None

    def __post_init__(self):
        for name, v in (("elements", self.elements), ("warps", self.warps or 1)):
            if not (isinstance(v, int) and v >= 1 and v & (v - 1) == 0):
                raise ValueError(f"Blocks.{name}={v!r} must be a power of two >= 1 (Triton's block rule)")

    def rows(self, rows: int, width: int) -> int:
        """Rows per program: `elements // width` (at least 1), halved until they divide `rows`."""
        r = max(1, self.elements // width)
        while rows % r:
            r //= 2
        return r

    def num_warps(self, width: int) -> int:
        return self.warps or (4 if width <= 2048 else 8)


def supports(rows: int, width: int, dtype) -> str | None:
    """None where the kernels take `[rows, width]` in `dtype`, else why not (one line)."""
    if jnp.dtype(dtype) not in _DTYPES:
        return f"dtype {jnp.dtype(dtype).name}"
    if width & (width - 1) or not 16 <= width <= _MAX_WIDTH:
        return f"width {width} is not a power of two in [16, {_MAX_WIDTH}] (Triton's block rule)"
    if rows < 1:
        return "no rows"
    return None


def _forward_kernel(h_ref, scale_ref, y_ref, rstd_ref, *, eps):
    x = h_ref[...].astype(jnp.float32)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) * (1.0 / x.shape[1]) + eps)
    normed = (x * rstd[:, None]).astype(y_ref.dtype).astype(jnp.float32)
    scale = scale_ref[...].astype(y_ref.dtype).astype(jnp.float32)
    y_ref[...] = (normed * scale[None, :]).astype(y_ref.dtype)
    rstd_ref[...] = rstd


def _backward_kernel(h_ref, rstd_ref, scale_ref, dy_ref, *rest, has_residual):
    dres_ref, dh_ref = rest if has_residual else (None, rest[0])
    dtype = h_ref.dtype
    x = h_ref[...].astype(jnp.float32)
    rstd = rstd_ref[...]
    scale = scale_ref[...].astype(dtype).astype(jnp.float32)
    dn = (dy_ref[...].astype(jnp.float32) * scale[None, :]).astype(dtype).astype(jnp.float32)
    n = x * rstd[:, None]
    mean_dn_n = jnp.sum(dn * n, axis=1) * (1.0 / x.shape[1])
    dx = rstd[:, None] * (dn - n * mean_dn_n[:, None])
    if has_residual:
        dx = dx + dres_ref[...].astype(jnp.float32)
    dh_ref[...] = dx.astype(dh_ref.dtype)


def _grid(h, blocks: Blocks):
    """(grid, a `[rows, D]` tile's spec, a `[rows]` slice's spec, compiler params) for h `[N, D]`."""
    why = supports(*h.shape, h.dtype)
    if why is not None:
        raise ValueError(f"rms_norm kernel does not take {tuple(h.shape)} {h.dtype}: {why} (check `supports` first)")
    rows, width = h.shape
    r = blocks.rows(rows, width)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps(width), num_stages=1)
    return (rows // r,), pl.BlockSpec((r, width), lambda i: (i, 0)), pl.BlockSpec((r,), lambda i: (i,)), params


@functools.partial(jax.jit, static_argnames=("eps", "blocks", "interpret"))
def forward(h, scale, *, eps: float, blocks: Blocks = Blocks(), interpret: bool = False):
    """(y `[N, D]` in h's dtype, 1/rms `[N]` float32) for h `[N, D]` and scale `[D]`."""
    grid, tile, row, params = _grid(h, blocks)
    width = h.shape[1]
    return pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps),
        grid=grid,
        in_specs=[tile, pl.BlockSpec((width,), lambda i: (0,))],
        out_specs=[tile, row],
        out_shape=[jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(h.shape[:1], jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="jaxtune_rms_norm_fwd",
    )(h, scale)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def backward(h, rstd, scale, dy, d_residual=None, *, blocks: Blocks = Blocks(), interpret: bool = False):
    """h's gradient `[N, D]` (h's dtype): the norm's backward for the output gradient dy, plus
    `d_residual` (h's gradient from its other uses; None: none)."""
    grid, tile, row, params = _grid(h, blocks)
    width = h.shape[1]
    has_residual = d_residual is not None
    return pl.pallas_call(
        functools.partial(_backward_kernel, has_residual=has_residual),
        grid=grid,
        in_specs=[tile, row, pl.BlockSpec((width,), lambda i: (0,)), tile] + [tile] * has_residual,
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
        compiler_params=params,
        interpret=interpret,
        name="jaxtune_rms_norm_bwd",
    )(h, rstd, scale, dy, *([d_residual] if has_residual else []))


def forward_reference(h, scale, eps: float):
    """`forward` in jnp (any leading dims; same roundings)."""
    x = h.astype(jnp.float32)
    rstd = lax.rsqrt(jnp.mean(x * x, axis=-1) + eps)
    normed = (x * rstd[..., None]).astype(h.dtype)
    return normed * scale.astype(h.dtype), rstd


def backward_reference(h, rstd, scale, dy, d_residual=None):
    """`backward` in jnp (any leading dims; same roundings)."""
    dn = (dy * scale.astype(h.dtype)).astype(jnp.float32)
    n = h.astype(jnp.float32) * rstd[..., None]
    dx = rstd[..., None] * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
    if d_residual is not None:
        dx = dx + d_residual.astype(jnp.float32)
    return dx.astype(h.dtype)

"""The gated activation's backward with a LoRA down_proj's adapter term added on the tile, in
Pallas (Triton lowering).

In `down(act(g)·u)` with LoRA on down_proj (`h@Wd + (h@Ad)@sBd`), the gradient reaching
`h = act(g)·u` has two terms: the frozen path's `dh_base = dy@Wdᵀ` and the adapter's
`dha@Adᵀ` (`dha = dy@sBdᵀ`, rank r). Autodiff writes the second one out as a full
`[tokens, mlp]` array (its own memory-bound matmul), and XLA then runs the activation's backward
as two fusions, one per output, each reading g, u and both gradient terms: on the 1B LoRA step
(H200, 8192 tokens × mlp 8192, bf16) 41 + 2 × 137 µs per layer. Here it is one pass: read g, u
and dh_base, form `dha@Adᵀ` on the tile (a rank-r matmul on data already in registers), write
dg and du (225 µs). Measured alternatives in benchmarks/RESULTS.md (ninth round), among them
fusing the other rank-r products around the activation too, which was slower.

`activation_grad_joint` takes gate and up as one array, chunk by chunk (`[N, F/c, 2c]`: one
matmul over both kernels writes that), and writes their gradient in the same layout; one program
per chunk of c columns, as the two-array kernel's per column block.

Arithmetic is float32; dg and du are rounded to the inputs' dtype as the plain computation
(`activation_grad_reference`) rounds them. The rank is padded to a multiple of 16 (Triton's
smallest matmul side) with zero columns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxtune.kernels.activation_math import ACTIVATIONS, REFERENCE, activation_and_grad

__all__ = ["BlockSizes", "activation_grad", "activation_grad_joint", "activation_grad_reference",
           "activation_grad_joint_reference", "supports", "supports_joint"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_RANK_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """One program per `block_rows × block_cols` tile (powers of two dividing the array; at least
    16 rows, Triton's smallest matmul side). The defaults won a sweep on an H200 at
    [8192, 8192] bf16 (benchmarks/lora_mlp.py; 16×128 with 4 warps: 225 µs, 32×128: 260)."""

    block_rows: int = 16
    block_cols: int = 128
    num_warps: int = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, int) and v >= 1 and v & (v - 1) == 0):
                raise ValueError(f"BlockSizes.{f.name}={v!r} must be a power of two >= 1")
        if self.block_rows < 16:
            raise ValueError(f"BlockSizes.block_rows={self.block_rows} must be at least 16")

    def fit(self, n_rows: int, f: int) -> BlockSizes | None:
        """These blocks halved until they divide `[n_rows, f]` (rows not below 16, columns not below
        32), or None when no such blocks exist."""
        rows, cols = self.block_rows, self.block_cols
        while rows > 16 and n_rows % rows:
            rows //= 2
        while cols > 32 and f % cols:
            cols //= 2
        if n_rows % rows or f % cols:
            return None
        return dataclasses.replace(self, block_rows=rows, block_cols=cols)


def supports(n_rows: int, f: int, dtype, hidden_act: str, blocks: BlockSizes | None = None) -> bool:
    """Whether `activation_grad` takes a `[n_rows, f]` activation (callers use the reference if not)."""
    return (hidden_act in ACTIVATIONS and jnp.dtype(dtype) in _DTYPES and n_rows > 0 and f > 0
            and (blocks or BlockSizes()).fit(n_rows, f) is not None)


def _pad_rank(x):
    pad = -x.shape[1] % _RANK_MULTIPLE
    return x if pad == 0 else jnp.pad(x, ((0, 0), (0, pad)))


def _tile_grads(g, u, dhb, dha, a, hidden_act):
    """(dg, du) float32 on one tile: dh = dh_base + dha@a_downᵀ (the rank-r product formed here)."""
    precision = lax.Precision.HIGHEST if dha.dtype == jnp.float32 else None  # no tf32 for float32
    dh_lora = lax.dot_general(dha, a, (((1,), (1,)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)  # dha @ a_downᵀ on this tile
    dh = dhb.astype(jnp.float32) + dh_lora
    g, u = g.astype(jnp.float32), u.astype(jnp.float32)
    act, d_act = activation_and_grad(g, hidden_act)
    return dh * u * d_act, dh * act


def _kernel(g_ref, u_ref, dhb_ref, dha_ref, a_ref, dg_ref, du_ref, *, hidden_act):
    dg, du = _tile_grads(g_ref[...], u_ref[...], dhb_ref[...], dha_ref[...], a_ref[...], hidden_act)
    du_ref[...] = du.astype(du_ref.dtype)
    dg_ref[...] = dg.astype(dg_ref.dtype)


def _joint_kernel(gu_ref, dhb_ref, dha_ref, a_ref, dgu_ref, *, hidden_act, chunk):
    # One chunk of gate columns and the same chunk of up columns, side by side in one block.
    dg, du = _tile_grads(gu_ref[:, :chunk], gu_ref[:, chunk:], dhb_ref[...], dha_ref[...], a_ref[...], hidden_act)
    dgu_ref[:, :chunk] = dg.astype(dgu_ref.dtype)
    dgu_ref[:, chunk:] = du.astype(dgu_ref.dtype)


@functools.partial(jax.jit, static_argnames=("hidden_act", "blocks", "interpret"))
def activation_grad(g, u, dh_base, dha, a_down, hidden_act: str, *, blocks: BlockSizes = BlockSizes(),
                    interpret: bool = False):
    """`(dg, du)` of `h = act(g)·u` for `dh = dh_base + dha@a_downᵀ`.

    g, u, dh_base `[N, F]`; dha `[N, r]`; a_down `[F, r]`; one dtype (bf16, fp16 or float32), which
    dg and du come back in. Check `supports` first.
    """
    n, f = g.shape
    bl = blocks.fit(n, f)
    if bl is None:
        raise ValueError(f"no blocks from {blocks} divide [{n}, {f}] (check `supports` first)")
    dha_p, a_p = _pad_rank(dha), _pad_rank(a_down)
    rp = a_p.shape[1]
    tile = pl.BlockSpec((bl.block_rows, bl.block_cols), lambda j, i: (i, j))
    return pl.pallas_call(
        functools.partial(_kernel, hidden_act=hidden_act),
        # Columns fastest: programs launched together stream through rows in address order.
        grid=(f // bl.block_cols, n // bl.block_rows),
        in_specs=[tile, tile, tile, pl.BlockSpec((bl.block_rows, rp), lambda j, i: (i, 0)),
                  pl.BlockSpec((bl.block_cols, rp), lambda j, i: (j, 0))],
        out_specs=[tile, tile],
        out_shape=[jax.ShapeDtypeStruct((n, f), g.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=bl.num_warps, num_stages=1),
        interpret=interpret,
        name="jaxtune_lora_activation_grad",
    )(g, u, dh_base, dha_p, a_p)


def supports_joint(n_rows: int, chunks: int, chunk: int, dtype, hidden_act: str,
                   blocks: BlockSizes | None = None) -> bool:
    """Whether `activation_grad_joint` takes `[n_rows, chunks, 2·chunk]`: its programs take one
    chunk of columns each, so the chunk must be a column block the block rules allow."""
    if chunk < 32 or chunk & (chunk - 1):
        return False
    return supports(n_rows, chunks * chunk, dtype, hidden_act, dataclasses.replace(blocks or BlockSizes(), block_cols=chunk))


@functools.partial(jax.jit, static_argnames=("hidden_act", "blocks", "interpret"))
def activation_grad_joint(gu, dh_base, dha, a_down, hidden_act: str, *, blocks: BlockSizes = BlockSizes(),
                          interpret: bool = False):
    """`activation_grad` for gate and up held in one array, chunk by chunk: gu `[N, F/c, 2c]` with
    gate columns `[j·c, (j+1)·c)` in `gu[:, j, :c]` and the same up columns in `gu[:, j, c:]` (the
    layout of one matmul over gate's and up's kernels side by side, chunk by chunk). Returns the
    gradient in the same layout: `[dg | du]` chunk by chunk, ready for that matmul's backward.
    dh_base `[N, F]`; dha `[N, r]`; a_down `[F, r]`. Check `supports_joint` first."""
    n, chunks, two_c = gu.shape
    c = two_c // 2
    if not supports_joint(n, chunks, c, gu.dtype, hidden_act, blocks):
        raise ValueError(f"activation_grad_joint does not take {tuple(gu.shape)} {gu.dtype} with {blocks} "
                         "(check `supports_joint` first)")
    bl = dataclasses.replace(blocks, block_cols=c).fit(n, chunks * c)
    dha_p, a_p = _pad_rank(dha), _pad_rank(a_down)
    rp = a_p.shape[1]
    pair = pl.BlockSpec((bl.block_rows, None, two_c), lambda j, i: (i, j, 0))
    return pl.pallas_call(
        functools.partial(_joint_kernel, hidden_act=hidden_act, chunk=c),
        grid=(chunks, n // bl.block_rows),
        in_specs=[pair, pl.BlockSpec((bl.block_rows, c), lambda j, i: (i, j)),
                  pl.BlockSpec((bl.block_rows, rp), lambda j, i: (i, 0)), pl.BlockSpec((c, rp), lambda j, i: (j, 0))],
        out_specs=pair,
        out_shape=jax.ShapeDtypeStruct(gu.shape, gu.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bl.num_warps, num_stages=1),
        interpret=interpret,
        name="jaxtune_lora_activation_grad_joint",
    )(gu, dh_base, dha_p, a_p)


def activation_grad_joint_reference(gu, dh_base, dha, a_down, hidden_act: str):
    """`activation_grad_joint` in jnp (gu `[..., F/c, 2c]`, the rest with any leading dims)."""
    *lead, chunks, two_c = gu.shape
    c = two_c // 2
    flat = lambda z: z.reshape(*lead, chunks * c)
    dg, du = activation_grad_reference(flat(gu[..., :c]), flat(gu[..., c:]), dh_base, dha, a_down, hidden_act)
    chunked = lambda z: z.reshape(*lead, chunks, c)
    return jnp.concatenate([chunked(dg), chunked(du)], axis=-1)


def activation_grad_reference(g, u, dh_base, dha, a_down, hidden_act: str):
    """`activation_grad` in jnp (any leading dims; same roundings)."""
    precision = lax.Precision.HIGHEST if dha.dtype == jnp.float32 else None
    dh = dh_base.astype(jnp.float32) + jnp.einsum("...r,fr->...f", dha, a_down, precision=precision,
                                                  preferred_element_type=jnp.float32)
    g32 = g.astype(jnp.float32)
    act, vjp = jax.vjp(REFERENCE[hidden_act], g32)
    return vjp(dh * u.astype(jnp.float32))[0].astype(g.dtype), (dh * act).astype(g.dtype)

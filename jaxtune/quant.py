"""Frozen bases in 4 or 8 bits: NF4 (QLoRA) and row-wise int8 leaves, as bitsandbytes stores them.

`quantize(params, model_cfg, qcfg)` (or `quantize_stream` while loading) replaces each projection
kernel by an `NF4` or `Int8` leaf; `linear` dequantises it and multiplies, so model code never
knows (DESIGN.md invariant 2). Embeddings, norms and `lm_head` stay as they are, as with
bitsandbytes through transformers (`lm_head` is kept in full precision there too).

NF4 (QLoRA paper §3, Dettmers et al. 2023): each tensor is flattened row-major and cut into blocks
of 64 values; a block stores its absmax (float32) and 64 four-bit indices into the NF4 code book,
two per byte with the first value in the high nibble. With double quantisation (§3 "Double
Quantization") the absmax values, less their mean, are themselves quantised blockwise (256 per
block) to 8-bit indices into bitsandbytes' dynamic map. A "tensor" here is one layer's slice of a
stacked kernel, i.e. one HF tensor, so blocks and means are those bitsandbytes would compute on the
same tensor laid out as ours (`[*in, *out]`; HF's is `[out, in]`, so the bytes differ from a
bitsandbytes checkpoint's, the method does not). Storage: 0.5 + 1/64 + 4/(64·256) bytes per weight
with double quantisation (≈0.516), 0.5625 without.

Int8 (`load_in_8bit`, LLM.int8 weight format): int8 codes `round(w·127/absmax)` with absmax over
the input dimensions, one per output feature ("row-wise" in HF's `[out, in]` layout). The matmul
dequantises the weight and multiplies in the compute dtype; bitsandbytes instead also quantises
activations to int8 (with fp16 outlier columns), so our int8 path is weight-only and slightly
more accurate than theirs.

Dequantisation is elementwise on the codes (a broadcast, shifts, masks, a 16-entry table, a
multiply), which XLA fuses into one loop that reads the codes and writes the weight in the compute
dtype; cuBLAS then multiplies. Inside the scanned layer only one layer's weight exists dequantised
at a time. Measured on an H100 (jax 0.11.2, 4096×14336 kernel, 8192 tokens, bf16): dequantising
takes 0.094 ms against 1.2 ms for the matmul, i.e. the unfused path costs about 8% of that
projection's forward (less of a training step, whose backward for a frozen base needs only dx).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jaxtune.errors import ConfigError
from jaxtune.model.config import ModelConfig
from jaxtune.model.linear import register_linear
from jaxtune.model.params import Path, param_specs

NF4_BLOCK = 64  # values per absmax (bitsandbytes' default blocksize for 4-bit)
ABSMAX_BLOCK = 256  # absmax values per second-level scale under double quantisation

# The NF4 code book: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA §3),
# as bitsandbytes' float32 table holds them.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# A value goes to the code whose interval (between midpoints of neighbouring codes) holds it; a
# value exactly on a midpoint goes down, as bitsandbytes' `bucketize` and its CUDA decision tree do.
NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)


def _torch_linspace_f32(n: int) -> np.ndarray:
    # torch.linspace(0.1, 1, n, dtype=float32) bit for bit: fused multiply-add from the start for
    # the first half, from the end for the second.
    start, end = np.float32(0.1), np.float32(1.0)
    step = (end - start) / np.float32(n - 1)
    i = np.arange(n)
    from_start = (np.float64(start) + np.float64(step) * i).astype(np.float32)
    from_end = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, from_start, from_end)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map()`), 256 sorted float32 values.

    Dettmers 2016 "8-bit approximations": one sign bit, a unary exponent, the remaining bits a
    linear fraction; here 7 exponent values, 10^-6 ... 10^0.
    """
    values: list[np.ndarray] = []
    for i in range(7):
        bounds = _torch_linspace_f32(2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        values += [scale * means, -scale * means]
    values.append(np.array([0.0, 1.0], np.float32))
    code = np.sort(np.concatenate(values)).astype(np.float32)
    assert code.shape == (256,)
    return code


DYNAMIC_CODE = dynamic_map()
DYNAMIC_MIDPOINTS = ((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How frozen bases are stored (Axolotl's `load_in_4bit` / `load_in_8bit` keys)."""

    bits: int  # 4 (NF4, `load_in_4bit`) or 8 (row-wise int8, `load_in_8bit`)
    double_quant: bool = True  # 4-bit only: quantise the absmax values too (`bnb_4bit_use_double_quant`)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"quantisation bits must be 4 (load_in_4bit) or 8 (load_in_8bit), got {self.bits}")


@struct.dataclass
class NF4:
    """A kernel in NF4. Array fields may carry leading axes (the stacked `layers` axis) before the
    per-tensor ones; `lax.scan` slices them like any other param."""

    codes: jax.Array  # uint8 [*lead, blocks, 32]: two 4-bit code indices per byte, first one high
    absmax: jax.Array  # [*lead, blocks]: float32, or uint8 indices into DYNAMIC_CODE if double-quantised
    absmax_scale: jax.Array | None  # float32 [*lead, ceil(blocks / 256)] under double quantisation
    absmax_offset: jax.Array | None  # float32 [*lead]: mean absmax, subtracted before quantising it
    tensor_shape: tuple[int, ...] = struct.field(pytree_node=False)  # one tensor's shape, ours ([*in, *out])
    dtype: str = struct.field(pytree_node=False)  # the dequantised weight's dtype (the original's)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape[:-2] + self.tensor_shape


@struct.dataclass
class Int8:
    """A kernel in row-wise int8: codes with the kernel's shape, one scale per output feature."""

    codes: jax.Array  # int8 [*lead, *in, *out]
    absmax: jax.Array  # float32 [*lead, *out]: max |w| over the input dimensions
    in_ndim: int = struct.field(pytree_node=False)  # how many dims of one tensor are the input side
    out_ndim: int = struct.field(pytree_node=False)  # and the output side
    dtype: str = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape


QUANTIZED_TYPES = (NF4, Int8)


def is_quantized(leaf) -> bool:
    return isinstance(leaf, QUANTIZED_TYPES)


# ---------------------------------------------------------------------------------------------
# NF4 on one tensor

def _nearest(scaled: jax.Array, midpoints: np.ndarray) -> jax.Array:
    """Index of the code interval each value falls in (count of midpoints strictly below it)."""
    return jnp.sum(scaled[..., None] > jnp.asarray(midpoints), axis=-1, dtype=jnp.int32)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """Flatten `x` row-major into `[ceil(n / block), block]`, zero-padding the last block (zeros
    never change an absmax, so the padded block's statistics are those of its real values)."""
    flat = x.reshape(-1).astype(jnp.float32)
    pad = -flat.shape[0] % block
    return jnp.pad(flat, (0, pad)).reshape(-1, block)


def _absmax_quantize(x_nb: jax.Array, block: int, code: np.ndarray, midpoints: np.ndarray):
    """Blockwise absmax quantisation of `[n, block]` values: (code indices, float32 absmax)."""
    absmax_n = jnp.max(jnp.abs(x_nb), axis=-1)
    # bitsandbytes multiplies by the reciprocal (not a division) and clamps a zero absmax to 1e-38
    scaled_nb = jnp.clip(x_nb * (1.0 / jnp.maximum(absmax_n, 1e-38))[:, None], -1.0, 1.0)
    return _nearest(scaled_nb, midpoints), absmax_n


def nf4_quantize_tensor(x: jax.Array, double_quant: bool) -> NF4:
    """One tensor (any shape) to an NF4 leaf without leading axes, as bitsandbytes'
    `quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`."""
    idx_bk, absmax_b = _absmax_quantize(_blocks(x, NF4_BLOCK), NF4_BLOCK, NF4_CODE, NF4_MIDPOINTS)
    idx_bk = idx_bk.astype(jnp.uint8)
    codes_bk = (idx_bk[:, 0::2] << 4) | idx_bk[:, 1::2]
    if not double_quant:
        return NF4(codes_bk, absmax_b, None, None, tuple(x.shape), jnp.dtype(x.dtype).name)
    blocks = absmax_b.shape[0]
    offset = jnp.mean(absmax_b)
    centred_cj = _blocks(absmax_b - offset, ABSMAX_BLOCK)
    qabsmax_cj, scale_c = _absmax_quantize(centred_cj, ABSMAX_BLOCK, DYNAMIC_CODE, DYNAMIC_MIDPOINTS)
    qabsmax_b = qabsmax_cj.reshape(-1)[:blocks].astype(jnp.uint8)
    return NF4(codes_bk, qabsmax_b, scale_c, offset, tuple(x.shape), jnp.dtype(x.dtype).name)


def nf4_absmax(w: NF4) -> jax.Array:
    """The float32 absmax per block `[*lead, blocks]`, undoing double quantisation if used."""
    if w.absmax_scale is None:
        return w.absmax
    values = jnp.take(jnp.asarray(DYNAMIC_CODE), w.absmax.astype(jnp.int32))
    scale = jnp.repeat(w.absmax_scale, ABSMAX_BLOCK, axis=-1)[..., :w.absmax.shape[-1]]
    return values * scale + w.absmax_offset[..., None]


# Shift that brings each value's nibble down: 4 for even positions (high nibble), 0 for odd.
_NIBBLE_SHIFT = np.tile(np.array([4, 0], np.uint8), NF4_BLOCK // 2)


def nf4_code_indices(w: NF4) -> jax.Array:
    """The 4-bit code indices `[*lead, blocks, 64]` (uint8 0..15), unpacked.

    Each byte is repeated (a broadcast, which fuses) and shifted per position rather than
    stacking high and low nibbles (a concatenate, which XLA GPU materialises in its own pass):
    on an H100 this halves the dequantisation time of a 4096×14336 kernel (0.229 → 0.094 ms).
    """
    return (jnp.repeat(w.codes, 2, axis=-1) >> jnp.asarray(_NIBBLE_SHIFT)) & 0xF


def nf4_dequantize(w: NF4, dtype=None) -> jax.Array:
    """The weight `[*lead, *tensor_shape]` in `dtype` (default: the original dtype).

    Computed in float32 (code value × absmax) and cast once, as bitsandbytes does.
    """
    dtype = jnp.dtype(dtype if dtype is not None else w.dtype)
    values_bk = jnp.take(jnp.asarray(NF4_CODE), nf4_code_indices(w).astype(jnp.int32))
    weight = values_bk * nf4_absmax(w)[..., None]
    lead = w.codes.shape[:-2]
    n = math.prod(w.tensor_shape)
    weight = weight.reshape(*lead, -1)[..., :n].reshape(*lead, *w.tensor_shape)
    return weight.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Int8 on one tensor

def int8_quantize_tensor(x: jax.Array, in_ndim: int) -> Int8:
    """One kernel `[*in, *out]` to row-wise int8, as bitsandbytes' `int8_vectorwise_quant` on the
    HF `[out, in]` weight: `round(w · (127 / absmax))` with absmax over the input dimensions."""
    x32 = x.astype(jnp.float32)
    absmax_o = jnp.max(jnp.abs(x32), axis=tuple(range(in_ndim)))
    codes = jnp.round(x32 * (127.0 / absmax_o)).astype(jnp.int8)  # a zero row gives nan → 0
    codes = jnp.where(absmax_o == 0, jnp.int8(0), codes)
    return Int8(codes, absmax_o, in_ndim, x.ndim - in_ndim, jnp.dtype(x.dtype).name)


def int8_dequantize(w: Int8, dtype=None) -> jax.Array:
    """The weight `[*lead, *in, *out]`: codes × absmax / 127 (by the float32 reciprocal, as bitsandbytes)."""
    dtype = jnp.dtype(dtype if dtype is not None else w.dtype)
    lead = w.absmax.ndim - w.out_ndim
    absmax = w.absmax.reshape(w.absmax.shape[:lead] + (1,) * w.in_ndim + w.absmax.shape[lead:])
    return (w.codes.astype(jnp.float32) * absmax * np.float32(1 / 127)).astype(dtype)


def dequantize(w, dtype=None) -> jax.Array:
    """Any quantised leaf as a dense weight in `dtype`; plain arrays are returned cast."""
    if isinstance(w, NF4):
        return nf4_dequantize(w, dtype)
    if isinstance(w, Int8):
        return int8_dequantize(w, dtype)
    return w if dtype is None else w.astype(dtype)


def _quantized_linear(x: jax.Array, w, spec: str, dtype) -> jax.Array:
    # Dequantise straight into the compute dtype, then one einsum accumulating in float32 and
    # writing `dtype` (writing float32 and casting after costs a pass over the output).
    return jnp.einsum(spec, x.astype(dtype), dequantize(w, dtype), preferred_element_type=dtype)


register_linear(NF4, _quantized_linear)
register_linear(Int8, _quantized_linear)


# ---------------------------------------------------------------------------------------------
# Whole params

def quantized_paths(model_cfg: ModelConfig) -> list[Path]:
    """The params bitsandbytes would quantise: every stacked projection kernel (not lm_head)."""
    return [p for p, s in param_specs(model_cfg).items() if s.in_ndim is not None and s.stacked]


@functools.partial(jax.jit, static_argnames=("bits", "double_quant", "in_ndim"))
def _quantize_one(x: jax.Array, bits: int, double_quant: bool, in_ndim: int):
    if bits == 4:
        return nf4_quantize_tensor(x, double_quant)
    return int8_quantize_tensor(x, in_ndim)


def quantize_kernel(kernel: jax.Array, in_ndim: int, qcfg: QuantConfig, stacked: bool = True):
    """Quantise a kernel tensor by tensor: each layer's slice on its own when `stacked`."""
    if not stacked:
        return _quantize_one(kernel, qcfg.bits, qcfg.double_quant, in_ndim)
    parts = [_quantize_one(kernel[i], qcfg.bits, qcfg.double_quant, in_ndim) for i in range(kernel.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def quantize(params: dict, model_cfg: ModelConfig, qcfg: QuantConfig) -> dict:
    """`params` with every projection kernel replaced by its NF4 / Int8 leaf."""
    specs = param_specs(model_cfg)
    flat = traverse_util.flatten_dict(params)
    for path in quantized_paths(model_cfg):
        if path in flat and not is_quantized(flat[path]):
            flat[path] = quantize_kernel(flat[path], specs[path].in_ndim, qcfg)
    return traverse_util.unflatten_dict(flat)


def quantize_stream(host_params: Iterable[tuple[Path, np.ndarray]], model_cfg: ModelConfig, qcfg: QuantConfig,
                    put: Callable[[np.ndarray], jax.Array] = jax.device_put) -> Iterator[tuple[Path, object]]:
    """Quantise while loading: `(path, host array)` in, `(path, device leaf)` out.

    Each projection kernel goes to the device one layer slice (one HF tensor) at a time and is
    quantised there, so device memory holds the quantised params so far plus one bf16 tensor,
    never the bf16 model. Other params are `put` as they are. Use with
    `jaxtune.converters.hf.iter_params(folder, cfg, dtype="bfloat16")`.
    """
    specs = param_specs(model_cfg)
    targets = set(quantized_paths(model_cfg))
    for path, host in host_params:
        if path not in targets:
            yield path, put(host)
            continue
        in_ndim = specs[path].in_ndim
        parts = [_quantize_one(put(host[i]), qcfg.bits, qcfg.double_quant, in_ndim) for i in range(host.shape[0])]
        yield path, jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def quantized_axes(leaf, base_axes: tuple[str | None, ...]):
    """The logical-axes pytree (for `jaxtune.sharding.tree_shardings`) of a quantised leaf whose
    dense kernel has `base_axes`. NF4 blocks run through the tensor row-major, so the block axis
    takes the name of the tensor's first dimension and its shards are contiguous runs of it."""
    if isinstance(leaf, NF4):
        lead = base_axes[:leaf.codes.ndim - 2]
        block_axis = base_axes[len(lead)]
        return leaf.replace(
            codes=(*lead, block_axis, None), absmax=(*lead, block_axis),
            absmax_scale=None if leaf.absmax_scale is None else (*lead, None),
            absmax_offset=None if leaf.absmax_offset is None else tuple(lead))
    if isinstance(leaf, Int8):
        lead = base_axes[:leaf.absmax.ndim - leaf.out_ndim]
        return leaf.replace(codes=tuple(base_axes),
                            absmax=(*lead, *base_axes[len(lead) + leaf.in_ndim:]))
    raise TypeError(f"not a quantised leaf: {type(leaf).__name__}")


def stored_bytes(leaf) -> int:
    """Bytes a leaf (quantised or not) occupies: the sum over its arrays."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(leaf))

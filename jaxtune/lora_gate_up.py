"""A gated MLP whose three projections carry plain LoRA, with the gate/up projections and the
activation in one Hopper kernel (kernels/gate_up_activation_mosaic.py). Off by default
(`KERNEL = "off"`): measured in the 1B LoRA training step on an H200 it is level with the path
the trainer takes (88,036 / 88,111 against 87,958 / 87,970 tok/s, interleaved; RESULTS.md,
fifteenth round), so it stays off until the kernel's own matmul gets closer to cuBLAS's
(`benchmarks/train_throughput.py --gate-up-kernel` runs the step with it).

Forward: `xa = dropout(x)@A` for gate and up (outside, so autodiff carries A's gradients), side by
side and zero-padded to the kernel's adapter K with each sB padded to match (the kernel's docstring
says why), then the kernel writes g, u and h = act(g)·u with no `[x | xa]` or `[W ; sB]`
concatenation and no separate activation pass; the down_proj's two products follow. Backward: exactly what the default path
computes, from the same pieces — the activation's backward with the down adapter's term
(`lora_gated_down`'s, one kernel) and, per projection, `[dx | dxa] = dg @ [W ; sB]ᵀ` with `dsB =
xaᵀ@dg` (`lora_fused_product`'s). The frozen kernels get gradients only if differentiated.

Taken only where the kernel runs (a GPU with `KERNEL = "auto"`, or anywhere in Pallas interpret
mode with `"interpret"`: CPU tests), its shape rules hold (`supports`), and the activations are
not sharded (a `pallas_call` has no sharding rule); elsewhere the registered function returns
None and the default path runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune import lora_fused_product, lora_gated_down
from jaxtune.kernels import gate_up_activation_mosaic as kernel
from jaxtune.model.mlp import MLP
from jaxtune.sharding import split_spec

# "off": never (the default: level with the default path in the step); "auto": compiled on a GPU;
# "interpret": in Mosaic GPU's interpret mode anywhere (CPU tests).
KERNEL = "off"

_PROJECTION = "btd,df->btf"


def takes(x_shape: tuple[int, ...], mlp: int, rank: int, dtype, hidden_act: str) -> bool:
    """Whether `gate_up_mlp` runs the kernel for an MLP input of `x_shape` `[B, T, D]` and
    adapters of rank `rank` on gate and up."""
    if KERNEL == "off" or (KERNEL == "auto" and jax.default_backend() != "gpu"):
        return False
    if split_spec(MLP, x_shape[:2] + (mlp,)) is not None:
        return False
    b, t, d = x_shape
    return 2 * rank <= kernel.ADAPTER_K and kernel.supports(b * t, d, mlp, kernel.ADAPTER_K, dtype, hidden_act) is None


def gate_up_mlp(x, xa_gate, xa_up, w_gate, w_up, sb_gate, sb_up, w_down, a_down, sb_down, *, hidden_act: str):
    """`down(act(gate(x))·up(x))` with LoRA on all three: x `[B, T, D]`, xa_* `[B, T, r]`,
    w_gate/w_up `[D, F]`, sb_* `[r, F]` (s·B), w_down `[F, D]`, a_down `[F, r]`, sb_down `[r, D]`;
    one dtype throughout; the result `[B, T, D]` in it."""
    r, k = xa_gate.shape[-1], kernel.ADAPTER_K
    xa = jnp.concatenate([xa_gate, xa_up, jnp.zeros(xa_gate.shape[:-1] + (k - 2 * r,), x.dtype)], axis=-1)
    sb_gate = jnp.pad(sb_gate, ((0, k - r), (0, 0)))
    sb_up = jnp.pad(sb_up, ((r, k - 2 * r), (0, 0)))
    return _mlp(hidden_act, r, x, xa, w_gate, w_up, sb_gate, sb_up, w_down, a_down, sb_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mlp(hidden_act, rank, x, xa, w_gate, w_up, sb_gate, sb_up, w_down, a_down, sb_down):
    return _forward(hidden_act, x, xa, w_gate, w_up, sb_gate, sb_up, w_down, a_down, sb_down)[0]


def _forward(hidden_act, x, xa, w_gate, w_up, sb_gate, sb_up, w_down, a_down, sb_down):
    b, t, d = x.shape
    flat = lambda z: z.reshape(b * t, z.shape[-1])
    g, u, h = kernel.gate_up_activation(flat(x), flat(xa), w_gate, w_up, sb_gate, sb_up,
                                        hidden_act=hidden_act, interpret=KERNEL == "interpret")
    g, u, h = (z.reshape(b, t, z.shape[-1]) for z in (g, u, h))
    y, ha = lora_gated_down.down_products(h, w_down, a_down, sb_down)
    return y, (g, u, h, ha)


def _fwd(hidden_act, rank, *args):
    values = [a.value for a in args]
    y, (g, u, h, ha) = _forward(hidden_act, *values)
    want_dw = (args[2].perturbed, args[3].perturbed, args[6].perturbed)  # w_gate, w_up, w_down
    return y, (*values, g, u, h, ha, want_dw)


def _bwd(hidden_act, rank, res, dy):
    x, xa, w_gate, w_up, sb_gate, sb_up, w_down, a_down, sb_down, g, u, h, ha, want_dw = res
    dg, du, dw_down, d_a_down, d_sb_down = lora_gated_down._bwd(
        hidden_act, (g, u, h, ha, w_down, a_down, sb_down, want_dw[2]), dy)
    # Each projection with its own adapter's rows only (no products over the padding), as the
    # default path computes them.
    gate, up = slice(0, rank), slice(rank, 2 * rank)
    dx_g, dxa_gate, dw_gate, dsb_gate = lora_fused_product._bwd(
        _PROJECTION, None, (x, xa[..., gate], w_gate, sb_gate[gate], want_dw[0]), dg)
    dx_u, dxa_up, dw_up, dsb_up = lora_fused_product._bwd(
        _PROJECTION, None, (x, xa[..., up], w_up, sb_up[up], want_dw[1]), du)
    pad = xa.shape[-1] - 2 * rank
    dxa = jnp.concatenate([dxa_gate, dxa_up, jnp.zeros(dxa_gate.shape[:-1] + (pad,), dxa_gate.dtype)], axis=-1)
    dsb_gate = jnp.pad(dsb_gate, ((0, rank + pad), (0, 0)))
    dsb_up = jnp.pad(dsb_up, ((rank, pad), (0, 0)))
    return dx_g + dx_u, dxa, dw_gate, dw_up, dsb_gate, dsb_up, dw_down, d_a_down, d_sb_down


_mlp.defvjp(_fwd, _bwd, symbolic_zeros=True)

"""A gated MLP whose three projections carry plain LoRA, with gate/up and the activation in one
Hopper kernel (kernels/gate_up_activation_mosaic.py) writing gate and up in the joint layout of
`lora.py`'s JOINT_GATE_UP path. On by default on a Hopper GPU (`KERNEL = "auto"`): in the 1B LoRA
training step on an H200 +0.2% and +1.0% tokens/s against the joint path in XLA, interleaved, and
0.64 GiB less peak memory (benchmarks/RESULTS.md, nineteenth round;
`benchmarks/train_throughput.py --gate-up-kernel on|off` compares them).

Forward: `xa = x@[A_gate | A_up]` (outside, so autodiff carries A's gradients), zero-padded to the
kernel's adapter K with the block-diagonal sB padded to match (the kernel's docstring says why),
then the kernel writes gu `[B, T, F/c, 2c]` and h = act(g)·u with no `[x | xa]` copied, no `[W ;
sB]` formed for the forward (the backward forms it, as the joint path does) and no separate
activation pass; the down_proj's two products follow. Backward: exactly
what the JOINT_GATE_UP path computes, from the same pieces: the activation's backward with the down
adapter's term in its joint form (`lora_gated_down`'s, one kernel), then `[dx | dxa] = dgu @ [W ;
sB]ᵀ` and `dsB = xaᵀ@dgu` (`lora_fused_product`'s). The frozen kernels get gradients only if
differentiated.

Taken only where the JOINT_GATE_UP path is (lora.py decides) and the kernel runs: a Hopper GPU
with `KERNEL = "auto"`, or anywhere in Mosaic GPU's interpret mode with `"interpret"` (CPU tests); its
shape rules hold (`supports`), and the activations are not sharded (a kernel call has no sharding
rule). Elsewhere the joint path's XLA form runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune import lora_fused_product, lora_gated_down
from jaxtune.kernels import gate_up_activation_mosaic as kernel
from jaxtune.kernels.mosaic_smem import on_hopper
from jaxtune.model.mlp import MLP
from jaxtune.sharding import split_spec

# "auto": compiled on a Hopper GPU (the default); "off": never; "interpret": in Mosaic GPU's
# interpret mode anywhere (CPU tests).
KERNEL = "auto"
# CTAs per cluster (the kernel's `cluster`): 2 multicasts the kernels' tiles to pairs of programs, as
# cuBLAS's 2x1 kernels do; measured slower than 1 on an H200 (805-859 against 786-807 µs, RESULTS, twentieth round).
CLUSTER = 1

_JOINT_PRODUCT = "btd,dkc->btkc"


def takes(x_shape: tuple[int, ...], mlp: int, chunk: int, rank: int, dtype, hidden_act: str) -> bool:
    """Whether `gate_up_mlp` runs the kernel for an MLP input of `x_shape` `[B, T, D]`, gate and up
    in chunks of `chunk` columns, and both adapters' ranks summing to `rank`."""
    if KERNEL == "off" or (KERNEL == "auto" and not on_hopper()):
        return False
    if split_spec(MLP, x_shape[:2] + (mlp,)) is not None:
        return False
    b, t, d = x_shape
    return rank <= kernel.ADAPTER_K and kernel.supports(b * t, d, mlp, chunk, kernel.ADAPTER_K, dtype, hidden_act,
                                                        CLUSTER) is None


def gate_up_mlp(x, xa, w_gate, w_up, sb, w_down, a_down, sb_down, *, hidden_act: str, chunk: int, residual=None):
    """`down(act(gate(x))·up(x))` with LoRA on all three: x `[B, T, D]`, xa `[B, T, R]` (both
    adapters' x@A side by side), w_gate/w_up `[D, F]`, sb `[R, F/c, 2c]` (s·B, block-diagonal in the
    joint layout), w_down `[F, D]`, a_down `[F, r]`, sb_down `[r, D]` (s·B); one dtype throughout;
    the result `[B, T, D]` in it, plus `residual` (`[B, T, D]`) if given."""
    return _mlp(hidden_act, chunk, x, xa, w_gate, w_up, sb, w_down, a_down, sb_down, residual)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mlp(hidden_act, chunk, x, xa, w_gate, w_up, sb, w_down, a_down, sb_down, residual):
    return _forward(hidden_act, chunk, x, xa, w_gate, w_up, sb, w_down, a_down, sb_down, residual)[0]


def _forward(hidden_act, chunk, x, xa, w_gate, w_up, sb, w_down, a_down, sb_down, residual):
    b, t, d = x.shape
    f, k = w_gate.shape[1], kernel.ADAPTER_K
    xa_padded = jnp.pad(xa.reshape(b * t, -1), ((0, 0), (0, k - xa.shape[-1])))
    sb_padded = jnp.pad(sb.reshape(sb.shape[0], 2 * f), ((0, k - sb.shape[0]), (0, 0)))
    gu, h = kernel.gate_up_activation(x.reshape(b * t, d), xa_padded, w_gate, w_up, sb_padded, hidden_act=hidden_act,
                                      chunk=chunk, cluster=CLUSTER, interpret=KERNEL == "interpret")
    gu, h = gu.reshape(b, t, f // chunk, 2 * chunk), h.reshape(b, t, f)
    y, ha = lora_gated_down.down_products(h, w_down, a_down, sb_down, residual)
    return y, (gu, h, ha)


def _fwd(hidden_act, chunk, *args):
    *args, residual = args
    values = [a.value for a in args]
    y, (gu, h, ha) = _forward(hidden_act, chunk, *values, None if residual is None else residual.value)
    want_dw = (args[2].perturbed or args[3].perturbed, args[5].perturbed)  # (w_gate or w_up, w_down)
    return y, (*values, gu, h, ha, want_dw, residual is not None)


def _bwd(hidden_act, chunk, res, dy):
    x, xa, w_gate, w_up, sb, w_down, a_down, sb_down, gu, h, ha, want_dw, has_residual = res
    dgu, dw_down, d_a_down, d_sb_down, _ = lora_gated_down._joint_bwd(
        hidden_act, (gu, h, ha, w_down, a_down, sb_down, want_dw[1], False), dy)
    dx, dxa, (dw_gate, dw_up), dsb = lora_fused_product._bwd(
        _JOINT_PRODUCT, chunk, (x, xa, (w_gate, w_up), sb, want_dw[0]), dgu)
    return dx, dxa, dw_gate, dw_up, dsb, dw_down, d_a_down, d_sb_down, dy if has_residual else None


_mlp.defvjp(_fwd, _bwd, symbolic_zeros=True)

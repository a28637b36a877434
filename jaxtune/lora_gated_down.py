"""A gated MLP's activation and its LoRA down_proj as one differentiable function:
`down(act(g)·u) = h@Wd + (h@Ad)@sBd` with `h = act(g)·u`.

Autodiff of the plain form (the activation, then `linear` on the LoRA leaf) writes the adapter's
term of h's gradient, `dha@Adᵀ`, as a full `[tokens, mlp]` array and reads it again in the
activation's backward. Here the backward is written out and that term is formed on the tiles of
the activation's backward kernel (kernels/lora_activation_grad.py): one pass over g, u and
`dy@Wdᵀ` where autodiff made three (+1.6% on the 1B LoRA step, benchmarks/RESULTS.md, ninth
round). Where the kernel does not run (off a GPU, `KERNELS = "off"`, shapes it does not take) its
jnp reference does, so the arithmetic is the same everywhere.

Residuals are what autodiff of the plain form keeps: g, u, h and `h@Ad`. The frozen `Wd` gets a
gradient only if differentiated (symbolic zeros tell), as in `lora_fused_product`. Under a mesh
the kernel runs per shard in `shard_map` (a `pallas_call` has no sharding rule): the tokens over
the batch and length axes, the mlp dimension over the tensor axis, each shard with its rows of Ad.

On a Hopper GPU the joint form's backward goes one step further where it fits
(`lora_projection.takes_activation_grad`): down_proj's `dy@Wdᵀ + dha@Adᵀ` and the activation's
backward are one Mosaic kernel, so dh is never written at all (+1.0–1.1% on the 1B step, RESULTS,
twenty-first round).

`lora_gated_down_joint` is the same block for gate and up held in one array (one matmul over both
kernels wrote it, `lora.py`'s `JOINT_GATE_UP`): its backward returns that array's gradient in its
own layout, from the kernel's joint form, so nothing concatenates dg and du.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune import lora_projection
from jaxtune.kernels import lora_activation_grad as kernel
from jaxtune.kernels.activation_math import REFERENCE
from jaxtune.model.mlp import MLP
from jaxtune.sharding import constrain, per_shard, shard_counts, split_spec

# "auto": the Pallas kernel on a GPU, its jnp reference elsewhere; "off": the reference everywhere;
# "interpret": the kernel everywhere, in Pallas interpret mode off a GPU (CPU tests).
KERNELS = "auto"


def _kernel_mode() -> tuple[bool, bool]:
    """(run the kernel, in interpret mode)."""
    on_gpu = jax.default_backend() == "gpu"
    if KERNELS == "off" or (KERNELS == "auto" and not on_gpu):
        return False, False
    return True, not on_gpu


def lora_gated_down(g, u, w_down, a_down, sb_down, *, hidden_act: str, residual=None):
    """`act(g)·u` through a LoRA down_proj: g, u `[B, T, F]`; w_down `[F, D]` (frozen base);
    a_down `[F, r]`; sb_down `[r, D]` (s·B); all in one dtype, the result `[B, T, D]` in it too,
    `residual` (`[B, T, D]`) added to it if given (`down_products` says where)."""
    return _gated_down(hidden_act, g, u, w_down, a_down, sb_down, residual)


def _einsum(spec, a, b, out_dtype):
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)


def _activation(g, u, hidden_act):
    return (REFERENCE[hidden_act](g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_down(hidden_act, g, u, w_down, a_down, sb_down, residual):
    return _forward(hidden_act, g, u, w_down, a_down, sb_down, residual)[0]


def _forward(hidden_act, g, u, w_down, a_down, sb_down, residual):
    h = constrain(_activation(g, u, hidden_act), MLP)
    y, ha = down_products(h, w_down, a_down, sb_down, residual)
    return y, (h, ha)


def down_products(h, w_down, a_down, sb_down, residual=None):
    """(`residual + h@Wd + (h@Ad)@sBd` (no residual: without it), `h@Ad`): the LoRA down_proj's
    output and its adapter's rank-r input, in h's dtype (what the backward needs of the forward
    besides h). Through lora_projection.py's kernel where it takes the shapes (one pass where XLA
    makes three: the adapter's product, its add and the residual's), else in XLA."""
    ha = _einsum("btf,fr->btr", h, a_down, h.dtype)
    b, t, f = h.shape
    d = w_down.shape[1]
    if lora_projection.takes(b * t, f, d, ha.shape[-1], h.dtype):
        flat_residual = None if residual is None else residual.reshape(b * t, d)
        y = lora_projection.kernel_product(h.reshape(b * t, f), ha.reshape(b * t, -1), w_down, sb_down, flat_residual)
        return y.reshape(b, t, d), ha
    y = _einsum("btf,fd->btd", h, w_down, h.dtype) + _einsum("btr,rd->btd", ha, sb_down, h.dtype)
    return (y if residual is None else residual + y), ha


def _primal(arg):
    """A custom_vjp's primal argument's value (None for an absent residual)."""
    return None if arg is None else arg.value


def _fwd(hidden_act, g, u, w_down, a_down, sb_down, residual):
    y, (h, ha) = _forward(hidden_act, g.value, u.value, w_down.value, a_down.value, sb_down.value, _primal(residual))
    return y, (g.value, u.value, h, ha, w_down.value, a_down.value, sb_down.value, w_down.perturbed,
               residual is not None)


def _bwd(hidden_act, res, dy):
    g, u, h, ha, w_down, a_down, sb_down, want_dw, has_residual = res
    dy = dy.astype(g.dtype)
    dha, down_grads = _down_grads(dy, h, ha, w_down, a_down, sb_down, want_dw)
    dg, du = _activation_grad(g, u, _dh_base(dy, w_down), dha, a_down, hidden_act)
    return dg, du, *down_grads, dy if has_residual else None


def _dh_base(dy, w_down):
    """h's gradient through the frozen Wd: `dy@Wdᵀ`."""
    return constrain(_einsum("btd,fd->btf", dy, w_down, dy.dtype), MLP)


def _down_grads(dy, h, ha, w_down, a_down, sb_down, want_dw):
    """(the adapter input's gradient `dy@sBdᵀ`, and the gradients of (Wd, Ad, sBd): Wd's only if
    differentiated)."""
    dha = _einsum("btd,rd->btr", dy, sb_down, dy.dtype)
    d_a_down = _einsum("btf,btr->fr", h, dha, jnp.float32).astype(a_down.dtype)
    d_sb_down = _einsum("btr,btd->rd", ha, dy, jnp.float32).astype(sb_down.dtype)
    dw_down = _einsum("btf,btd->fd", h, dy, jnp.float32).astype(w_down.dtype) if want_dw else None
    return dha, (dw_down, d_a_down, d_sb_down)


_gated_down.defvjp(_fwd, _bwd, symbolic_zeros=True)


# Gate and up as one array: [B, T, F/c, 2c], chunk j holding gate's columns [j·c, (j+1)·c) then
# up's (the output of one matmul over both kernels side by side, chunk by chunk: `lora.py`).
JOINT = ("act_batch", "act_length", "act_mlp", None)  # its logical axes: chunks split like the mlp dim


def lora_gated_down_joint(gu, w_down, a_down, sb_down, *, hidden_act: str, residual=None):
    """`lora_gated_down` for gate and up held in one array `gu` `[B, T, F/c, 2c]` (`JOINT`'s
    layout); gu's gradient comes back in that layout, as the matmul that wrote it wants it, with
    no concatenation of separate gate and up gradients."""
    return _gated_down_joint(hidden_act, gu, w_down, a_down, sb_down, residual)


def _split_joint(gu):
    b, t, chunks, two_c = gu.shape
    c = two_c // 2
    return gu[..., :c].reshape(b, t, chunks * c), gu[..., c:].reshape(b, t, chunks * c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_down_joint(hidden_act, gu, w_down, a_down, sb_down, residual):
    return _forward(hidden_act, *_split_joint(gu), w_down, a_down, sb_down, residual)[0]


def _joint_fwd(hidden_act, gu, w_down, a_down, sb_down, residual):
    y, (h, ha) = _forward(hidden_act, *_split_joint(gu.value), w_down.value, a_down.value, sb_down.value,
                          _primal(residual))
    return y, (gu.value, h, ha, w_down.value, a_down.value, sb_down.value, w_down.perturbed, residual is not None)


def _joint_bwd(hidden_act, res, dy):
    gu, h, ha, w_down, a_down, sb_down, want_dw, has_residual = res
    dy = dy.astype(gu.dtype)
    dha, down_grads = _down_grads(dy, h, ha, w_down, a_down, sb_down, want_dw)
    b, t, _, two_c = gu.shape
    (f, d), chunk = w_down.shape, two_c // 2
    if lora_projection.takes_activation_grad(b * t, f, d, a_down.shape[-1], chunk, gu.dtype, hidden_act):
        # dy@Wdᵀ + dha@Adᵀ and the activation's backward in one kernel: dh never leaves its accumulator
        dgu = lora_projection.activation_grad_product(dy.reshape(b * t, d), dha.reshape(b * t, -1), w_down, a_down,
                                                      gu.reshape(b * t, 2 * f), hidden_act=hidden_act, chunk=chunk)
        dgu = dgu.reshape(gu.shape)
    else:
        dgu = _activation_grad_joint(gu, _dh_base(dy, w_down), dha, a_down, hidden_act)
    return dgu, *down_grads, dy if has_residual else None


_gated_down_joint.defvjp(_joint_fwd, _joint_bwd, symbolic_zeros=True)


def _activation_grad_joint(gu, dh_base, dha, a_down, hidden_act):
    """gu's gradient: the kernel per shard where it runs, else its reference on the whole arrays."""
    use, interpret = _kernel_mode()
    spec = split_spec(JOINT, gu.shape)
    counts = shard_counts(JOINT, gu.shape)
    local_rows = (gu.shape[0] // counts[0]) * (gu.shape[1] // counts[1])
    chunks, c = gu.shape[2] // counts[2], gu.shape[3] // 2
    if not (use and kernel.supports_joint(local_rows, chunks, c, gu.dtype, hidden_act)):
        return kernel.activation_grad_joint_reference(gu, dh_base, dha, a_down, hidden_act)

    def run(gu, dh_base, dha, a):
        b, t = gu.shape[:2]
        flat = lambda z: z.reshape((b * t,) + z.shape[2:])
        return kernel.activation_grad_joint(flat(gu), flat(dh_base), flat(dha), a, hidden_act,
                                            interpret=interpret).reshape(gu.shape)

    if spec is None:
        return run(gu, dh_base, dha, a_down)
    rows = P(spec[0], spec[1], None)
    return per_shard(run, (spec, P(*spec[:3]), rows, P(spec[2], None)), spec)(gu, dh_base, dha, a_down)


def _activation_grad(g, u, dh_base, dha, a_down, hidden_act):
    """`(dg, du)`: the kernel per shard where it runs, else its reference on the whole arrays."""
    use, interpret = _kernel_mode()
    spec = split_spec(MLP, g.shape)
    counts = shard_counts(MLP, g.shape)
    local_rows = (g.shape[0] // counts[0]) * (g.shape[1] // counts[1])
    if not (use and kernel.supports(local_rows, g.shape[2] // counts[2], g.dtype, hidden_act)):
        return kernel.activation_grad_reference(g, u, dh_base, dha, a_down, hidden_act)

    def run(g, u, dh_base, dha, a):
        b, t, f = g.shape
        flat = lambda z: z.reshape(b * t, z.shape[-1])
        dg, du = kernel.activation_grad(flat(g), flat(u), flat(dh_base), flat(dha), a, hidden_act, interpret=interpret)
        return dg.reshape(b, t, f), du.reshape(b, t, f)

    if spec is None:
        return run(g, u, dh_base, dha, a_down)
    rows = P(spec[0], spec[1], None)
    return per_shard(run, (spec, spec, spec, rows, P(spec[2], None)), (spec, spec))(g, u, dh_base, dha, a_down)

"""Plain LoRA projections through the Hopper kernel (jaxtune/lora_projection.py, on by default on a
Hopper GPU), the residual adds after o_proj and down_proj included: values and gradients against
autodiff of the XLA form, and where the kernel is taken.

On CPU the kernel runs in Mosaic GPU's interpret mode (`KERNEL = "interpret"`), on a GPU compiled.
It takes bf16 only, so the bar is against float32 autodiff: the kernel's form may not be worse than
bf16 autodiff of the XLA form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import lora, lora_gated_down, lora_projection, quant
from jaxtune.kernels.mosaic_smem import on_hopper
from jaxtune.model import mlp as mlp_module
from jaxtune.model.linear import linear
from jaxtune.sharding import activation_sharding, merged_rules
from jaxtune.mesh import make_mesh
from test_flash_attention import INTERPRET
from test_lora_gated_down import _mlp_params

MODE = "interpret" if INTERPRET else "auto"  # compiled on a GPU
TOKENS, HEADS, HEAD_DIM, D = 128, 4, 64, 256  # the smallest o_proj the kernel takes: 256 in, 256 out


def _relative_l2(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _o_proj(rank=8, dropout=0.0, magnitude=None):
    """An o_proj-shaped LoRA leaf `[heads, head_dim, D]`; B nonzero so the adapter's term counts."""
    ks = jax.random.split(jax.random.key(0), 3)
    return lora.LoRA(base=jax.random.normal(ks[0], (HEADS, HEAD_DIM, D)) * (HEADS * HEAD_DIM) ** -0.5,
                     a=jax.random.normal(ks[1], (HEADS, HEAD_DIM, rank)) * 0.05,
                     b=jax.random.normal(ks[2], (rank, D)) * 0.5, magnitude=magnitude, dropout_key=None,
                     scale=2.0, dropout=dropout)


def _loss(w, x, h, dtype, spec="btnh,nhd->btd"):
    cast = lambda t: jax.tree.map(lambda z: z.astype(dtype) if jnp.issubdtype(z.dtype, jnp.floating) else z, t)
    y = linear(x.astype(dtype), cast(w), spec, dtype, residual=None if h is None else h.astype(dtype))
    return _weighted_square(y)


def _weighted_square(y):
    """Σ c·y²/2 with fixed positive weights c: a sum of positive terms, so the loss is as well
    conditioned as y is (a signed sum, as Σ sin(y)·k, is dominated by bf16's rounding of y), and
    y's gradient c·y differs from element to element and depends on the forward's values."""
    c = jax.random.uniform(jax.random.key(9), y.shape, minval=0.5, maxval=1.5)
    return jnp.sum(c * jnp.square(y.astype(jnp.float32))) / 2


def _uses_kernel(fn, *args) -> bool:
    return "jaxtune_lora_matmul" in str(jax.make_jaxpr(lambda *a: jax.grad(fn)(*a))(*args))


def _check_against_truth(truth, plain, fused):
    """Each of loss and gradients as close to float32 autodiff as bf16 autodiff of the XLA form gets
    (with a margin of 0.1%)."""
    assert len(fused) == len(truth)
    for t, p, f in zip(truth, plain, fused):
        assert _relative_l2(f, t) <= 1.2 * _relative_l2(p, t) + 1e-3, (np.shape(t), _relative_l2(f, t),
                                                                         _relative_l2(p, t))


@pytest.mark.parametrize("with_residual,frozen_base", [(True, True), (False, False)])
def test_projection_kernel_gives_autodiffs_values_and_gradients(monkeypatch, with_residual, frozen_base):
    """o_proj's form (heads flattened into the kernel's K), with the residual stream added in the
    kernel's epilogue; the second case differentiates the base too (W's gradient, a full fine-tune
    of a LoRA leaf's base, as the kernel's backward computes it only when asked)."""
    w = _o_proj()
    x = jax.random.normal(jax.random.key(1), (2, TOKENS // 2, HEADS, HEAD_DIM))
    h = jax.random.normal(jax.random.key(2), (2, TOKENS // 2, D)) if with_residual else None
    argnums = (1, 2, 3) if with_residual else (1, 2)

    def grads(w, x, h, dtype):
        loss = lambda base, rest, x, h: _loss(w.replace(base=base, a=rest[0], b=rest[1]), x, h, dtype)
        out = jax.value_and_grad(loss, argnums=(0,) + argnums if not frozen_base else argnums)(
            w.base, (w.a, w.b), x, h)
        return jax.tree.leaves(out)

    monkeypatch.setattr(lora_projection, "KERNEL", "off")
    truth = grads(w, x, h, jnp.float32)
    plain = grads(w, x, h, jnp.bfloat16)
    monkeypatch.setattr(lora_projection, "KERNEL", MODE)
    assert _uses_kernel(lambda x: _loss(w, x, h, jnp.bfloat16), x)
    fused = grads(w, x, h, jnp.bfloat16)
    _check_against_truth(truth, plain, fused)


def test_mlp_with_the_kernel_on_every_projection_and_the_residual(monkeypatch):
    """The gated MLP where gate, up and down all take the kernel (tokens too few for the joint gate/up
    product): gate/up through `linear`, down_proj inside lora_gated_down's function with the residual
    in its epilogue; against autodiff of the per-projection XLA form. Every product here takes the
    kernel's cooperative tiles (the o_proj test's take ping-pong's: K below COOPERATIVE_K)."""
    monkeypatch.setattr(lora_projection, "COOPERATIVE_K", 1)
    params = _mlp_params(d=256, f=512, r=8)
    x = jax.random.normal(jax.random.key(1), (1, TOKENS, 256))
    h = jax.random.normal(jax.random.key(2), (1, TOKENS, 256))
    loss = lambda p, x, h, dtype, fused: _weighted_square(mlp_module.gated_mlp(x, p, "silu", dtype, fused=fused,
                                                                               residual=h))
    run = lambda p, x, h, dtype, fused: jax.tree.leaves(jax.value_and_grad(loss, argnums=(0, 1, 2))(p, x, h, dtype,
                                                                                                    fused))
    bf16 = lambda t: jax.tree.map(lambda z: z.astype(jnp.bfloat16), t)
    monkeypatch.setattr(lora_projection, "KERNEL", "off")
    truth = run(params, x, h, jnp.float32, False)
    plain = run(bf16(params), bf16(x), bf16(h), jnp.bfloat16, False)
    monkeypatch.setattr(lora_projection, "KERNEL", MODE)
    text = str(jax.make_jaxpr(lambda p, x, h: jax.grad(loss)(p, x, h, jnp.bfloat16, True))(bf16(params), bf16(x),
                                                                                           bf16(h)))
    assert text.count("jaxtune_lora_matmul") >= 5  # gate, up, down forward; gate's and up's dx (down's in the activation's)
    fused = run(bf16(params), bf16(x), bf16(h), jnp.bfloat16, True)
    _check_against_truth(truth, plain, fused)


def test_projection_kernel_is_taken_only_when_asked_and_where_it_fits(monkeypatch):
    x = jax.random.normal(jax.random.key(1), (2, TOKENS // 2, HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    w = jax.tree.map(lambda z: z.astype(jnp.bfloat16), _o_proj())
    uses = lambda w, x, spec="btnh,nhd->btd": _uses_kernel(lambda x: _loss(w, x, None, jnp.bfloat16, spec), x)
    assert lora_projection.KERNEL == "auto"  # the default: compiled, on a Hopper GPU only
    assert uses(w, x) == on_hopper()
    monkeypatch.setattr(lora_projection, "KERNEL", "off")
    assert not uses(w, x)
    monkeypatch.setattr(lora_projection, "KERNEL", MODE)
    assert uses(w, x)
    assert not uses(w, x[:, :40])  # 80 tokens: not whole 64-row tiles
    assert not uses(w.replace(base=w.base[..., :128], b=w.b[:, :128]), x)  # 128 outputs: not a 256-column tile
    assert not uses(w.replace(dropout=0.1, dropout_key=jax.random.split(jax.random.key(3), 1)[0]), x)  # dropout
    assert not uses(w.replace(magnitude=jnp.ones((D,), jnp.bfloat16)), x)  # DoRA
    wide = _o_proj(rank=72)
    assert not uses(jax.tree.map(lambda z: z.astype(jnp.bfloat16), wide), x)  # rank above the kernel's K of 64
    flat = w.replace(base=w.base.reshape(HEADS * HEAD_DIM, D), a=w.a.reshape(HEADS * HEAD_DIM, -1))
    x_flat = x.reshape(2, TOKENS // 2, -1)
    assert uses(flat, x_flat, "btd,de->bte")
    nf4 = quant.quantize_kernel(flat.base.astype(jnp.float32), 1, quant.QuantConfig(bits=4), stacked=False)
    assert not uses(flat.replace(base=nf4), x_flat, "btd,de->bte")  # QLoRA
    if len(jax.devices()) >= 2:  # activations over a mesh: a kernel call has no sharding rule
        with activation_sharding(make_mesh({"data": 2}, devices=jax.devices()[:2]), merged_rules()):
            assert not uses(w, x)


@pytest.mark.parametrize("act,cooperative_k", [("silu", None), ("gelu_pytorch_tanh", 1)])
def test_down_backward_with_the_activations_in_one_kernel(monkeypatch, act, cooperative_k):
    """lora_gated_down's joint block (gate and up in one `[B, T, F/c, 2c]` array): its backward takes
    `lora_matmul_activation_grad` (dy@Wdᵀ + dha@Adᵀ and the activation's backward in one kernel,
    ping-pong tiles; the forward's down_proj in either tiling); values and gradients (gu's, Ad's,
    sBd's, the residual's) against float32 autodiff no worse than bf16 autodiff of the XLA form."""
    monkeypatch.setattr(lora_projection, "COOPERATIVE_K", cooperative_k)
    f, chunk, rank = 512, 128, 8
    ks = jax.random.split(jax.random.key(5), 5)
    gu = jax.random.normal(ks[0], (1, TOKENS, f // chunk, 2 * chunk)) * 2
    w_down = jax.random.normal(ks[1], (f, D)) * f**-0.5
    a_down = jax.random.normal(ks[2], (f, rank)) * f**-0.5
    sb_down = jax.random.normal(ks[3], (rank, D)) * 0.5
    h = jax.random.normal(ks[4], (1, TOKENS, D))
    loss = lambda gu, a, sb, h, w: _weighted_square(
        lora_gated_down.lora_gated_down_joint(gu, w, a, sb, hidden_act=act, residual=h))
    run = lambda *args: jax.tree.leaves(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args))
    inputs = (gu, a_down, sb_down, h, w_down)
    bf16 = tuple(z.astype(jnp.bfloat16) for z in inputs)
    monkeypatch.setattr(lora_projection, "KERNEL", "off")
    truth, plain = run(*inputs), run(*bf16)
    monkeypatch.setattr(lora_projection, "KERNEL", MODE)
    uses = lambda: "jaxtune_lora_matmul_activation_grad" in str(jax.make_jaxpr(jax.grad(loss))(*bf16))
    assert uses()
    fused = run(*bf16)
    _check_against_truth(truth, plain, fused)
    monkeypatch.setattr(lora_projection, "ACTIVATION_GRAD", False)  # then cuBLAS and the activation's own kernel
    assert not uses()
    monkeypatch.setattr(lora_projection, "ACTIVATION_GRAD", True)
    narrow = gu.astype(jnp.bfloat16).reshape(1, TOKENS, 2 * f // 32, 32)  # 16-column chunks: not whole stores
    assert "jaxtune_lora_matmul_activation_grad" not in str(
        jax.make_jaxpr(jax.grad(loss))(narrow, *bf16[1:]))

"""The gated MLP with LoRA gate/up projections and the activation in one Hopper kernel
(jaxtune/lora_gate_up.py, on by default on a Hopper GPU): values and gradients against autodiff of the
per-projection form and against the joint gate/up path it replaces, and when it is taken.

On CPU the kernel runs in Mosaic GPU's interpret mode (`KERNEL = "interpret"`), on a GPU compiled. The kernel takes
bf16 only, so the bar is the one of `test_block_in_bf16_is_as_close_to_float32_as_autodiff`: against
float32 autodiff the fused form may not be worse than bf16 autodiff of the projections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import lora, lora_gate_up, lora_gated_down
from jaxtune.kernels.mosaic_smem import on_hopper
from test_flash_attention import INTERPRET
from test_lora_gated_down import _block_loss, _mlp_params

MODE = "interpret" if INTERPRET else "auto"  # compiled on a GPU

# The smallest shapes that take the joint gate/up product (tokens ≥ 4·D, F ≥ 2·D, F a multiple of
# its 128-column chunks) and the kernel (64-row tiles, D a multiple of 64, gate's + up's rank ≤ 64).
D, F, R, TOKENS = 64, 256, 16, 256


def _uses_kernel(params, x, *args) -> bool:
    text = str(jax.make_jaxpr(lambda p, x: jax.grad(_block_loss)(p, x, *args))(params, x))
    return "jaxtune_gate_up_activation" in text


def _bf16(params):
    return jax.tree.map(lambda z: z.astype(jnp.bfloat16), params)


def _relative_l2(a, b):
    """‖a − b‖ / ‖b‖ over all elements (test_lora_gated_down's `_rel` is the max-abs form)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# The second case adds the residual stream inside the block (the model passes it, so that the down
# projection can add it in its kernel's epilogue): its gradient is the output's.
@pytest.mark.parametrize("act,rank,cluster,with_residual", [("silu", 16, 1, False), ("gelu_pytorch_tanh", 8, 2, True)])
def test_gate_up_kernel_gives_autodiffs_values_and_gradients(monkeypatch, act, rank, cluster, with_residual):
    monkeypatch.setattr(lora_gated_down, "KERNELS", "off")  # the activation's backward by its reference
    monkeypatch.setattr(lora_gate_up, "KERNEL", "off")  # for the forms it is compared with
    params = _mlp_params(d=D, f=F, r=rank)
    x = jax.random.normal(jax.random.key(1), (1, TOKENS, D))
    h = jax.random.normal(jax.random.key(2), (1, TOKENS, D)) if with_residual else None
    bf16, xb, hb = _bf16(params), x.astype(jnp.bfloat16), None if h is None else h.astype(jnp.bfloat16)
    loss = lambda p, x, h, dtype, fused: _block_loss(p, x, dtype, act, fused, residual=h)
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    run = lambda p, x, h, dtype, fused: jax.tree.leaves(grad(p, x, h, dtype, fused))  # loss, then every gradient
    truth = run(params, x, h, jnp.float32, False)
    plain = run(bf16, xb, hb, jnp.bfloat16, False)
    joint = run(bf16, xb, hb, jnp.bfloat16, True)  # the joint gate/up path in XLA, which the kernel replaces
    monkeypatch.setattr(lora_gate_up, "KERNEL", MODE)
    monkeypatch.setattr(lora_gate_up, "CLUSTER", cluster)
    assert _uses_kernel(bf16, xb, jnp.bfloat16, act, True)
    fused = run(bf16, xb, hb, jnp.bfloat16, True)
    assert len(fused) == len(jax.tree.leaves(params)) + 2 + with_residual
    # The loss is one signed sum, so its plain error can be near 0 by chance (0.003 against the
    # kernel's 0.006 with the residual): its margin is 1% of the truth; every gradient's 0.1%.
    for t, f_, p, j in zip(truth, fused, plain, joint):
        margin = 1e-3 if t.ndim else 1e-2
        assert _relative_l2(f_, t) <= 1.2 * _relative_l2(p, t) + margin, (_relative_l2(f_, t), _relative_l2(p, t))
        # the same arithmetic as the joint path (one float32 accumulation over [x | xa]): equal up
        # to the order of the float32 sums
        assert _relative_l2(f_, j) < 1e-2, _relative_l2(f_, j)


def test_gate_up_kernel_is_taken_only_when_asked_and_where_it_fits(monkeypatch):
    x = jax.random.normal(jax.random.key(1), (1, TOKENS, D)).astype(jnp.bfloat16)
    params = _bf16(_mlp_params(d=D, f=F, r=R))
    assert lora_gate_up.KERNEL == "auto"  # the default: compiled, on a Hopper GPU only
    assert _uses_kernel(params, x, jnp.bfloat16) == on_hopper()
    monkeypatch.setattr(lora_gate_up, "KERNEL", "off")
    assert not _uses_kernel(params, x, jnp.bfloat16)
    monkeypatch.setattr(lora_gate_up, "KERNEL", MODE)
    assert _uses_kernel(params, x, jnp.bfloat16)
    assert not _uses_kernel(params, x[:, :100], jnp.bfloat16)  # too few tokens for the joint product
    x_260 = jax.random.normal(jax.random.key(2), (1, 260, D)).astype(jnp.bfloat16)
    assert not _uses_kernel(params, x_260, jnp.bfloat16)  # not whole 64-row tiles
    assert _uses_kernel(_bf16(_mlp_params(d=D, f=F, r=8)), x, jnp.bfloat16)  # padded to the adapter K
    assert not _uses_kernel(_bf16(_mlp_params(d=D, f=F, r=48)), x, jnp.bfloat16)  # 2 x 48 > 64
    dropout = _bf16(_mlp_params(d=D, f=F, r=R, gate_dropout=0.1))
    assert not _uses_kernel(dropout, x, jnp.bfloat16, "silu", True, jax.random.key(3))  # gate draws its own mask
    down_dora = dict(params, down_proj={"kernel": params["down_proj"]["kernel"].replace(
        magnitude=jnp.ones((D,), jnp.bfloat16))})
    assert not _uses_kernel(down_dora, x, jnp.bfloat16)
    monkeypatch.setattr(lora, "JOINT_GATE_UP", False)
    assert not _uses_kernel(params, x, jnp.bfloat16)  # only where the joint product is taken

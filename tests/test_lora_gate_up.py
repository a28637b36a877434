"""The gated MLP with LoRA gate/up projections and the activation in one Hopper kernel
(jaxtune/lora_gate_up.py, off by default): values and gradients against autodiff of the
per-projection form, and when it is taken.

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
from jaxtune.model import mlp as mlp_module
from test_flash_attention import INTERPRET
from test_lora_gated_down import _block_loss, _mlp_params

MODE = "interpret" if INTERPRET else "auto"  # compiled on a GPU

D, F, R = 64, 128, 16  # the kernel's smallest shapes: 128 tokens, D a multiple of 64, F of 128; rank ≤ 32


def _uses_kernel(params, x, *args) -> bool:
    text = str(jax.make_jaxpr(lambda p, x: jax.grad(_block_loss)(p, x, *args))(params, x))
    return "jaxtune_gate_up_activation" in text


@pytest.mark.parametrize("act,gate_dropout,rank", [("silu", 0.0, 16), ("gelu_pytorch_tanh", 0.3, 8)])
def test_gate_up_kernel_gives_autodiffs_values_and_gradients(monkeypatch, act, gate_dropout, rank):
    monkeypatch.setattr(lora_gate_up, "KERNEL", MODE)
    monkeypatch.setattr(lora_gated_down, "KERNELS", "off")  # the activation's backward by its reference
    params = _mlp_params(d=D, f=F, r=rank, gate_dropout=gate_dropout)
    key = jax.random.key(3) if gate_dropout else None
    x = jax.random.normal(jax.random.key(1), (1, 128, D))
    bf16 = jax.tree.map(lambda z: z.astype(jnp.bfloat16), params)
    grad = jax.grad(_block_loss, argnums=(0, 1))
    with_keys = lambda p: jax.tree.map(lambda w: w.replace(dropout_key=key) if isinstance(w, lora.LoRA) and w.dropout
                                       else w, p, is_leaf=lambda w: isinstance(w, lora.LoRA))
    block = lambda p, x, dtype, fused: mlp_module.gated_mlp(x, with_keys(p), act, dtype, fused=fused)
    xb = x.astype(jnp.bfloat16)
    truth = [block(params, x, jnp.float32, False)] + jax.tree.leaves(grad(params, x, jnp.float32, act, False, key))
    fused = [block(bf16, xb, jnp.bfloat16, True)] + jax.tree.leaves(grad(bf16, xb, jnp.bfloat16, act, True, key))
    plain = [block(bf16, xb, jnp.bfloat16, False)] + jax.tree.leaves(grad(bf16, xb, jnp.bfloat16, act, False, key))
    for t, f_, p in zip(truth, fused, plain):  # the block's output, then every gradient
        err = lambda z: np.linalg.norm(np.asarray(z, np.float32) - np.asarray(t)) / np.linalg.norm(np.asarray(t))
        assert err(f_) <= 1.2 * err(p) + 1e-3, (err(f_), err(p))
    assert _uses_kernel(bf16, x.astype(jnp.bfloat16), jnp.bfloat16, act, True, key)


def test_gate_up_kernel_is_taken_only_when_asked_and_where_it_fits(monkeypatch):
    x = jax.random.normal(jax.random.key(1), (1, 128, D)).astype(jnp.bfloat16)
    bf16 = lambda p: jax.tree.map(lambda z: z.astype(jnp.bfloat16), p)
    params = bf16(_mlp_params(d=D, f=F, r=R))
    assert not _uses_kernel(params, x, jnp.bfloat16)  # KERNEL = "off" by default
    monkeypatch.setattr(lora_gate_up, "KERNEL", "auto")
    assert _uses_kernel(params, x, jnp.bfloat16) == (not INTERPRET)  # "auto" compiles it on a GPU only
    monkeypatch.setattr(lora_gate_up, "KERNEL", MODE)
    assert _uses_kernel(params, x, jnp.bfloat16)
    assert not _uses_kernel(params, x[:, :100], jnp.bfloat16)  # 100 tokens: not whole 128-row tiles
    assert _uses_kernel(bf16(_mlp_params(d=D, f=F, r=8)), x, jnp.bfloat16)  # padded to the adapter K
    assert not _uses_kernel(bf16(_mlp_params(d=D, f=F, r=48)), x, jnp.bfloat16)  # 2 x 48 > 64
    down_dora = dict(params, down_proj={"kernel": params["down_proj"]["kernel"].replace(
        magnitude=jnp.ones((D,), jnp.bfloat16))})
    assert not _uses_kernel(down_dora, x, jnp.bfloat16)
    assert isinstance(params["gate_proj"]["kernel"], lora.LoRA)

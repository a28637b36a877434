"""The grouped q/k/v projection (jaxtune/model/qkv.py) and RoPE's backward (jaxtune/model/rope.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxtune import lora, quant
from jaxtune.model import qkv
from jaxtune.model.config import RopeConfig
from jaxtune.model.linear import concat_outputs, linear
from jaxtune.model.params import init_params
from jaxtune.model.rope import _rotate, apply_rope, rope_cos_sin
from jaxtune.model.transformer import forward
from test_lora import CFG, assert_sharded_model_matches_unsharded, randomize_adapters

QWEN2 = dataclasses.replace(CFG, family="qwen2", qkv_bias=True)


def with_random_biases(params, seed=7):
    flat = traverse_util.flatten_dict(params)
    for i, path in enumerate(p for p in flat if p[-1] == "bias"):
        flat[path] = 0.5 * jax.random.normal(jax.random.key(seed + i), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


def loss_and_grads(params, cfg, grouped, monkeypatch, dtype=jnp.float32):
    monkeypatch.setattr(qkv, "GROUPED", grouped)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 7)))
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(forward(p, cfg, batch, dtype=dtype) ** 2)))(params)


def adapted(cfg, **lora_kwargs):
    params = with_random_biases(init_params(cfg, jax.random.key(0)))
    return randomize_adapters(lora.apply(params, lora.LoraConfig(r=4, alpha=8.0, target_linear=True, **lora_kwargs),
                                         cfg, jax.random.key(3)))


@pytest.mark.parametrize("cfg", [CFG, QWEN2], ids=["llama", "qwen2-biases"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_grouped_equals_per_projection(cfg, kind, monkeypatch):
    params = with_random_biases(init_params(cfg, jax.random.key(0))) if kind == "full" else adapted(cfg)
    (loss, grads), (want_loss, want_grads) = (loss_and_grads(params, cfg, g, monkeypatch) for g in (True, False))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_one_input_gradient_matmul_per_kind(monkeypatch):
    """The backward reaches x through one matmul for the three frozen kernels and one for the three
    adapters, where the per-projection form has three of each."""
    params = adapted(CFG)
    layer = jax.tree.map(lambda a: a[0], params["layers"])
    x = jax.random.normal(jax.random.key(1), (2, 5, CFG.hidden_size))

    def input_grad_matmuls(grouped):
        monkeypatch.setattr(qkv, "GROUPED", grouped)
        f = lambda x: sum(jnp.sum(o ** 2) for o in qkv.qkv_projection(x, layer["self_attn"], CFG, jnp.float32))
        jaxpr = jax.make_jaxpr(jax.grad(f))(x)
        return sum(1 for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
                   and e.outvars[0].aval.shape == x.shape)

    assert input_grad_matmuls(True) == 2
    assert input_grad_matmuls(False) == 6


def test_lora_leaves_that_cannot_be_grouped():
    """DoRA, dropout (one mask per adapter) and quantised bases keep the per-projection path."""
    out_shapes = [(2, 12), (2, 6), (2, 6)]  # per kv head: its G=2 query heads of 6, then k, then v
    for kwargs in ({"use_dora": True}, {"dropout": 0.1}):
        attn = lora.with_dropout_keys(adapted(CFG, **kwargs), jax.random.key(0))["layers"]["self_attn"]
        leaves = [jax.tree.map(lambda a: a[0], attn[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")]
        assert concat_outputs(leaves, 1, out_shapes) is None, kwargs
    quantized = quant.quantize(init_params(CFG, jax.random.key(0)), CFG, quant.QuantConfig(bits=4))
    attn = lora.apply(quantized, lora.LoraConfig(r=4, target_linear=True), CFG, jax.random.key(3))["layers"]["self_attn"]
    leaves = [jax.tree.map(lambda a: a[0], attn[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")]
    assert all(isinstance(w, lora.LoRA) and not isinstance(w.base, jax.Array) for w in leaves)
    assert concat_outputs(leaves, 1, out_shapes) is None
    # and plain LoRA leaves do group: one leaf whose product is the three side by side
    attn = adapted(CFG)["layers"]["self_attn"]
    leaves = [jax.tree.map(lambda a: a[0], attn[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")]
    grouped = concat_outputs(leaves, 1, out_shapes)
    x = jax.random.normal(jax.random.key(2), (3, CFG.hidden_size))
    want = jnp.concatenate([linear(x, w, "td,dc->tc", jnp.float32).reshape(3, *s) for w, s in zip(
        [jax.tree.map(lambda a: a.reshape(a.shape[0], -1) if a.ndim == 3 else a, w) for w in leaves], out_shapes)], -1)
    np.testing.assert_allclose(linear(x, grouped, "td,dkc->tkc", jnp.float32), want, rtol=1e-5, atol=1e-5)


def test_sharded_grouped_model_matches_unsharded():
    """Grouped by kv head, the kernel splits over the tensor axis with its heads (CFG: 2 kv heads
    over tensor=2): the sharded model still equals the unsharded one."""
    assert_sharded_model_matches_unsharded(adapted(CFG), CFG)


@pytest.mark.parametrize("rope", [RopeConfig(), RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=8)],
                         ids=["default", "yarn"])
def test_rope_backward_is_autodiff_of_the_rotation(rope):
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 5)))
    cos, sin = rope_cos_sin(rope, 8, positions)
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    dy = jax.random.normal(jax.random.key(1), x.shape)
    got = jax.vjp(lambda x: apply_rope(x, cos, sin), x)[1](dy)[0]
    want = jax.vjp(lambda x: _rotate(x, cos, sin), x)[1](dy)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(apply_rope(x, cos, sin), _rotate(x, cos, sin))

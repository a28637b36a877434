"""The model's norms and gated activation on our Pallas kernels (jaxtune/model/norm_activation.py):
the same logits and gradients as the jnp forms, unsharded and per shard under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.mesh import make_mesh
from jaxtune.model import norm_activation
from jaxtune.model.config import ModelConfig
from jaxtune.model.params import init_params, logical_axes
from jaxtune.model.transformer import forward
from jaxtune.sharding import activation_sharding, merged_rules, tree_shardings

# Features the kernels take (a power of two ≥ 128 for the norms, columns of 128 for the activation).
CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, initializer_range=0.2)
BATCH = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, size=(8, 8)))


def _loss(params):
    return jnp.sum(jnp.sin(forward(params, CFG, BATCH)))


def _pallas_calls(params) -> int:
    return str(jax.make_jaxpr(jax.grad(_loss))(params)).count("pallas_call")


@pytest.fixture(scope="module")
def reference():
    """Full fine-tune (the norm scales get gradients too) on the jnp forms."""
    params = init_params(CFG, jax.random.key(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(norm_activation, "KERNELS", "off")
        assert _pallas_calls(params) == 0
        return params, jax.jit(jax.value_and_grad(_loss))(params)


def _assert_close(got, want, rtol=2e-5):
    np.testing.assert_allclose(got[0], want[0], rtol=rtol)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert np.linalg.norm(g - w) <= rtol * max(np.linalg.norm(w), 1e-6)


def test_kernels_give_the_jnp_models_logits_and_gradients(reference, monkeypatch):
    params, want = reference
    monkeypatch.setattr(norm_activation, "KERNELS", "interpret")
    # Per layer, forward and backward: input norm, add + norm, activation; and the final norm.
    assert _pallas_calls(params) == 2 * (3 * CFG.num_layers + 1)
    _assert_close(jax.jit(jax.value_and_grad(_loss))(params), want)


def test_kernels_run_per_shard_under_a_mesh(reference, monkeypatch):
    """data × fsdp × tensor: rows split over data and fsdp, the MLP's features over tensor; the
    replicated norm scales' gradients are summed over shards."""
    params, want = reference
    monkeypatch.setattr(norm_activation, "KERNELS", "interpret")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = tree_shardings(logical_axes(CFG), params, mesh, merged_rules())
    with activation_sharding(mesh, merged_rules()):
        assert _pallas_calls(params) == 2 * (3 * CFG.num_layers + 1)
        got = jax.jit(jax.value_and_grad(_loss))(jax.device_put(params, shardings))
    _assert_close(got, want)


def test_row_kernels_step_aside_when_features_are_split(reference, monkeypatch):
    """Rules that split the residual's features over `tensor` leave the norms to jnp (a row-wise
    kernel on a shard would normalise part of each row); the activation still takes its kernel."""
    params, want = reference
    monkeypatch.setattr(norm_activation, "KERNELS", "interpret")
    mesh = make_mesh({"data": 4, "tensor": 2})
    rules = merged_rules({"act_embed": "tensor"})
    with activation_sharding(mesh, rules):
        assert _pallas_calls(params) == 2 * CFG.num_layers
        got = jax.jit(jax.value_and_grad(_loss))(jax.device_put(params, tree_shardings(logical_axes(CFG), params,
                                                                                      mesh, rules)))
    _assert_close(got, want)

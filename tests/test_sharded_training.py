"""Sharded training on 8 CPU devices equals a 1-device run, with no hidden host transfers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.mesh import make_mesh
from jaxtune.model.params import init_params
from jaxtune import lora
from jaxtune.sharding import activation_sharding, merged_rules, tree_shardings
from jaxtune.train.optimizer import OptimizerSettings, make_optimizer
from jaxtune.train.placement import batch_sharding, create_state, params_shardings, state_shardings
from jaxtune.train.state import partition
from jaxtune.train.step import StepSettings, make_train_step
from test_train_step import CFG, packed_batch

STEPS = 10


LORA = lora.LoraConfig(r=4, alpha=8, dropout=0.1, target_linear=True)


@functools.cache
def sharded_init(mesh_items: tuple, device_ids: tuple):
    """`init_params` jitted straight into its shards on this mesh. Made once per mesh, so the full
    and the LoRA run share its compile (seconds on 8 CPU devices); each run still calls it."""
    devices = [d for d in jax.devices() if d.id in device_ids]
    shardings = params_shardings(CFG, make_mesh(dict(mesh_items), devices), merged_rules())
    return jax.jit(lambda k: init_params(CFG, k), out_shardings=shardings)


def train(mesh_shape: dict, devices, adapter: bool = False) -> tuple[list[float], dict]:
    mesh = make_mesh(mesh_shape, devices)
    rules = merged_rules()
    shardings = params_shardings(CFG, mesh, rules)
    params = sharded_init(tuple(mesh_shape.items()), tuple(d.id for d in devices))(jax.random.key(1))
    assert jax.tree.map(lambda p: p.sharding, params) == shardings
    if adapter:
        # adapters born in their shards: A/B shard like their base (lora.logical_axes)
        abstract = jax.eval_shape(lambda p: lora.apply(p, LORA, CFG, jax.random.key(5)), params)
        shardings = tree_shardings(lora.logical_axes(abstract, CFG), abstract, mesh, rules)
        params = jax.jit(lambda p: lora.apply(p, LORA, CFG, jax.random.key(5)), out_shardings=shardings)(params)
        mask = lora.trainable_mask(params, LORA)
    else:
        mask = jax.tree.map(lambda _: True, params)
    trainable, frozen = partition(params, mask)
    trainable_sh, frozen_sh = partition(shardings, mask)
    tx, schedule = make_optimizer(OptimizerSettings(learning_rate=5e-3, warmup_steps=2, weight_decay=0.1), STEPS)
    state_sh = state_shardings(trainable_sh, tx, jax.eval_shape(lambda: trainable), mesh)
    state = create_state(trainable, tx, jax.random.key(2), state_sh)
    batch_sh = batch_sharding(mesh, rules)
    step_fn = make_train_step(CFG, tx, schedule, StepSettings(dtype=jnp.float32, ce_chunk_tokens=32),
                              with_rng=lora.with_dropout_keys if adapter else None)
    with activation_sharding(mesh, rules):
        step = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
                       donate_argnums=(0,))
        batches = [jax.device_put({k: v.reshape(2, 8, -1) for k, v in packed_batch(16, 16, seed=i % 2).items()},
                                  batch_sh) for i in range(STEPS)]
        losses = []
        with jax.transfer_guard("disallow"):
            for batch in batches:
                state, metrics = step(state, frozen, batch)
                losses.append(metrics["loss"])
    return [float(l) for l in losses], jax.device_get(state.trainable)


@pytest.fixture(scope="module")
def reference():
    return {adapter: train({"data": 1}, jax.devices()[:1], adapter) for adapter in (False, True)}


MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"tensor": 4, "data": 2}]


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_training_on_mesh_equals_one_device(mesh_shape, adapter, reference):
    ref_losses, ref_params = reference[adapter]
    losses, params = train(mesh_shape, jax.devices(), adapter)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, ref_params)
    assert losses[-1] + losses[-2] < losses[0] + losses[1]  # two batches, cycled: it learns them


def test_params_are_actually_sharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = params_shardings(CFG, mesh, merged_rules())
    q = sh["layers"]["self_attn"]["q_proj"]["kernel"].spec
    assert tuple(q) == (None, "fsdp", "tensor", None)
    down = sh["layers"]["mlp"]["down_proj"]["kernel"].spec
    assert tuple(down) == (None, "tensor", "fsdp")
    # vocab 61 is not divisible by tensor=2, so that dimension stays replicated rather than failing.
    assert tuple(sh["embed_tokens"]["embedding"].spec) == (None, "fsdp")


def test_mesh_that_does_not_fit_the_devices_is_a_config_error():
    from jaxtune.errors import ConfigError

    with pytest.raises(ConfigError, match="does not divide 8 devices"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ConfigError, match="use 4 devices, but 8 are present"):
        make_mesh({"data": 2, "tensor": 2})
    with pytest.raises(ConfigError, match="unknown axis 'pipeline'"):
        make_mesh({"pipeline": 2})
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}


def test_pallas_attention_runs_per_shard_under_a_mesh():
    """The flash kernel on a data×fsdp×tensor mesh: each device attends over its own rows and
    heads (no gather of q/k/v), with the values and gradients of the unsharded kernel."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtune.model.attention import self_attention

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (4, 32, 4, 16), jnp.float32)
    k = jax.random.normal(keys[1], (4, 32, 2, 16), jnp.float32)
    v = jax.random.normal(keys[2], (4, 32, 2, 16), jnp.float32)
    seg = jnp.asarray(np.repeat(np.array([[1, 1, 2, 3]]), 4, axis=0).repeat(8, axis=1), jnp.int32)

    def loss(q, k, v, seg):
        out = self_attention(q, k, v, seg, window=jnp.int32(20), backend="pallas")
        return jnp.sum(out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (want_loss, want_out), want_grads = jax.jit(grad)(q, k, v, seg)

    x_sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    args = (jax.device_put(q, x_sh), jax.device_put(k, x_sh), jax.device_put(v, x_sh),
            jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"), None))))
    with activation_sharding(mesh, merged_rules()):
        sharded = jax.jit(grad)
        hlo = sharded.lower(*args).compile().as_text()
        (got_loss, got_out), got_grads = sharded(*args)
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert got_out.sharding.spec == x_sh.spec
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    # Unpacked rows (no segment ids at all) take the same per-shard path.
    unmasked = jax.jit(lambda q, k, v: self_attention(q, k, v, None, backend="pallas"))
    want_out = unmasked(q, k, v)
    with activation_sharding(mesh, merged_rules()):
        got_out = unmasked(*args[:3])
    assert got_out.sharding.spec == x_sh.spec
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mesh_shape", [{"data": 4, "sequence": 2}, {"data": 2, "tensor": 4}])
def test_chunked_cross_entropy_stays_on_its_shards(mesh_shape, fused):
    """Every device computes the logits of its own tokens (rows over data, length over sequence,
    vocab over tensor): no hidden states or logits are gathered, and the loss is the unsharded one."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtune.train.loss import cross_entropy_sum

    mesh = make_mesh(mesh_shape, jax.devices())
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (8, 64, 16), jnp.float32)
    w = jax.random.normal(keys[1], (16, 96), jnp.float32)
    targets = jax.random.randint(keys[2], (8, 64), -1, 96).at[:, -1].set(-100)
    targets = jnp.where(targets < 0, -100, targets)

    def loss(h, w):
        return cross_entropy_sum(h, w, targets, chunk_tokens=32, fused=fused)

    grad = jax.value_and_grad(lambda h, w: loss(h, w)[0], argnums=(0, 1))
    want_loss, want_grads = jax.jit(grad)(h, w)
    h_sh = NamedSharding(mesh, P("data", "sequence" if "sequence" in mesh_shape else None, None))
    w_sh = NamedSharding(mesh, P(None, "tensor" if "tensor" in mesh_shape else None))
    args = (jax.device_put(h, h_sh), jax.device_put(w, w_sh))
    with activation_sharding(mesh, merged_rules()):
        sharded = jax.jit(grad)
        hlo = sharded.lower(*args).compile().as_text()
        got_loss, got_grads = sharded(*args)
    assert "all-gather" not in hlo
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w_ in zip(got_grads, want_grads):  # vocab-split partial sums reorder float32 adds
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w_))))

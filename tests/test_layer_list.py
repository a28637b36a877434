"""Frozen layer params split per layer for the unrolled layer loop (`scan_layers: false`): the same
training step as the scanned, stacked one, without the per-layer weight copies that otherwise
stay alive from the forward to the backward under remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import lora
from jaxtune.model.config import ModelConfig
from jaxtune.model.layer_list import per_layer, split_layer_shardings, split_layers
from jaxtune.model.params import init_params
from jaxtune.model.transformer import hidden_states
from jaxtune.train.loss import IGNORE
from jaxtune.train.optimizer import OptimizerSettings, make_optimizer
from jaxtune.train.state import init_state
from jaxtune.train.step import StepSettings, make_train_step

CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def lora_params(cfg):
    params = init_params(cfg, jax.random.key(0))
    lcfg = lora.LoraConfig(r=4, alpha=8, target_linear=True)
    params = lora.apply(params, lcfg, cfg, jax.random.key(1))
    # B = 0 at init would hide a wrong adapter path: give the adapters values
    nonzero_b = lambda leaf: leaf.replace(b=0.1 * jax.random.normal(jax.random.key(3), leaf.b.shape, leaf.b.dtype))
    params = jax.tree.map(lambda x: nonzero_b(x) if isinstance(x, lora.LoRA) else x, params,
                          is_leaf=lambda x: isinstance(x, lora.LoRA))
    return params, lora.trainable_mask(params)


def test_per_layer_reads_split_and_stacked_leaves_alike():
    params, _ = lora_params(CFG)
    stacked = params["layers"]
    split = split_layers(params)["layers"]
    for got, want in zip(per_layer(split, CFG.num_layers), per_layer(stacked, CFG.num_layers)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="split into 3 layers, the model has 4"):
        per_layer(split, 4)


def test_scanned_layers_refuse_split_params_by_name():
    params = split_layers(init_params(CFG, jax.random.key(0)))
    with pytest.raises(ValueError, match="need the unrolled layer loop: scan_unroll=1 < 3 layers"):
        hidden_states(params, CFG, jnp.zeros((1, 8), jnp.int32))


@pytest.mark.parametrize("remat", [None, "save_attention_block"])
def test_unrolled_step_on_split_frozen_params_equals_the_scanned_step(remat):
    """LoRA: trainable adapters stay stacked, frozen bases come split; two optimizer steps give
    the scanned step's losses and adapters."""
    params, mask = lora_params(CFG)
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    tx, schedule = make_optimizer(OptimizerSettings(learning_rate=1e-2), 2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (1, 2, 16)).astype(np.int32)
    batch = dict(input_ids=ids, labels=np.where(rng.random(ids.shape) < 0.2, IGNORE, ids).astype(np.int32),
                 segment_ids=np.ones_like(ids), positions=np.broadcast_to(np.arange(16, dtype=np.int32), ids.shape))
    results = []
    for unroll, frozen_in in ((1, frozen), (CFG.num_layers, split_layers(frozen))):
        s = StepSettings(dtype=jnp.float32, remat=remat, scan_unroll=unroll, packed=False)
        step = jax.jit(make_train_step(CFG, tx, schedule, s))
        state, step_losses = init_state(trainable, tx, jax.random.key(2)), []
        for _ in range(2):
            state, metrics = step(state, frozen_in, batch)
            step_losses.append(float(metrics["loss"]))
        results.append((step_losses, state.trainable))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_split_frozen_weights_are_not_kept_alive_through_the_step():
    """Unrolled under remat, a stacked frozen kernel's per-layer slice is one copy that XLA shares
    between the forward and the backward, so every layer's copy lives across the step; split
    leaves are the step's own arguments. The compiled step's temporary bytes show it."""
    cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                              head_dim=64, num_layers=4)
    params, mask = lora_params(cfg)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, params)
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    tx, schedule = make_optimizer(OptimizerSettings(learning_rate=1e-2), 1)
    s = StepSettings(dtype=jnp.bfloat16, remat="nothing_saveable", scan_unroll=cfg.num_layers, packed=False)
    step = jax.jit(make_train_step(cfg, tx, schedule, s))
    state = jax.eval_shape(lambda t: init_state(t, tx, jax.random.key(2)), trainable)
    batch = {k: jax.ShapeDtypeStruct((1, 1, 8), jnp.int32) for k in ("input_ids", "labels", "segment_ids", "positions")}
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    temp = {name: step.lower(state, abstract(f), batch).compile().memory_analysis().temp_size_in_bytes
            for name, f in (("stacked", frozen), ("split", split_layers(frozen)))}
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen["layers"]))
    assert temp["stacked"] - temp["split"] > 0.5 * layer_bytes, (temp, layer_bytes)


def test_split_shardings_drop_the_layer_axis():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1,), ("fsdp",))
    sh = {"layers": {"w": NamedSharding(mesh, PartitionSpec(None, "fsdp", None))}, "norm": None}
    split = split_layer_shardings(sh, 3)
    assert split["layers"]["w"] == (NamedSharding(mesh, PartitionSpec("fsdp", None)),) * 3
    stacked = jax.device_put(jnp.arange(24.0).reshape(3, 4, 2), sh["layers"]["w"])
    parts = split_layers({"layers": {"w": stacked}}, donate=True)["layers"]["w"]
    assert stacked.is_deleted() and [p.sharding for p in parts] == list(split["layers"]["w"])
    np.testing.assert_array_equal(np.stack(parts), np.arange(24.0).reshape(3, 4, 2))

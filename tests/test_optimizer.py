"""Schedules and optimizers as Axolotl/HF define them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.errors import ConfigError
from jaxtune.train.optimizer import OptimizerSettings, decay_mask, make_optimizer, make_schedule


def test_warmup_then_cosine_to_the_floor():
    s = OptimizerSettings(learning_rate=1.0, warmup_steps=10, schedule="cosine", cosine_min_lr_ratio=0.1)
    lr = make_schedule(s, total_steps=110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, rel=1e-5)  # halfway down: floor + (1 - floor) / 2
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)


def test_linear_decays_to_zero_and_constant_ignores_warmup_as_hf_does():
    linear = make_schedule(OptimizerSettings(learning_rate=2.0, warmup_steps=2, schedule="linear"), 12)
    assert float(linear(7)) == pytest.approx(1.0) and float(linear(12)) == pytest.approx(0.0)
    constant = make_schedule(OptimizerSettings(learning_rate=2.0, warmup_steps=5, schedule="constant"), 12)
    assert float(constant(0)) == 2.0
    with_warmup = make_schedule(OptimizerSettings(learning_rate=2.0, warmup_steps=4,
                                                  schedule="constant_with_warmup"), 12)
    assert float(with_warmup(2)) == pytest.approx(1.0) and float(with_warmup(9)) == 2.0


def test_weight_decay_skips_norm_scales_and_biases():
    params = {"layers": {"input_layernorm": {"scale": jnp.ones(3)},
                         "self_attn": {"q_proj": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}}}
    mask = decay_mask(params)
    assert mask["layers"]["self_attn"]["q_proj"] == {"kernel": True, "bias": False}
    assert mask["layers"]["input_layernorm"]["scale"] is False
    tx, _ = make_optimizer(OptimizerSettings(learning_rate=0.0, weight_decay=0.5, schedule="constant"), 10)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["layers"]["self_attn"]["q_proj"]["bias"]).max()) == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "lion"])
def test_every_optimizer_takes_a_step_downhill(name):
    params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]])}
    tx, _ = make_optimizer(OptimizerSettings(name=name, learning_rate=0.05, schedule="constant"), 10)
    loss = lambda p: jnp.sum(p["w"] ** 2)
    state = tx.init(params)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    assert float(loss(optax.apply_updates(params, updates))) < float(loss(params))


def test_clipping_bounds_the_update_input():
    tx, _ = make_optimizer(OptimizerSettings(name="sgd", learning_rate=1.0, max_grad_norm=1.0,
                                             schedule="constant"), 10)
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-6)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="optimizer 'adam_fancy'"):
        make_optimizer(OptimizerSettings(name="adam_fancy"), 10)
    with pytest.raises(ConfigError, match="lr_scheduler 'wave'"):
        make_schedule(OptimizerSettings(schedule="wave"), 10)

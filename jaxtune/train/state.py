"""Train state: step, trainable params (float32 master copy), optimizer state, RNG.

Params are split into trainable and frozen trees by a boolean mask over array leaves (all True
for a full fine-tune; adapter leaves only for LoRA). Only the trainable tree is differentiated
and has optimizer state; the frozen tree (bf16 or quantised bases) is passed to the step
alongside the state and never copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    trainable: dict  # params pytree, frozen leaves None
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (checkpointable); wrap with jax.random.wrap_key_data


def partition(params, mask) -> tuple[dict, dict]:
    """(trainable, frozen): the same pytree twice, with the other side's leaves set to None."""
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of `partition`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def init_state(trainable, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state; trainable leaves are upcast to the float32 master copy."""
    trainable = jax.tree.map(lambda p: p.astype(jnp.float32), trainable)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable), rng=rng)

"""Held-out loss: the same next-token loss as training, summed over the whole eval split."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxtune.model.config import ModelConfig
from jaxtune.train.state import combine
from jaxtune.train.step import StepSettings, loss_terms


def make_eval_step(cfg: ModelConfig, s: StepSettings, state_sh, frozen_sh, batch_sh):
    """Jitted `(state, frozen, batch [accum, rows, T]) -> (loss sum, target count)`."""

    def eval_step(state, frozen, batch):
        params = combine(state.trainable, frozen)

        def body(carry, micro):
            loss_sum, count = loss_terms(params, cfg, s, micro)
            return (carry[0] + loss_sum, carry[1] + count), None

        (loss_sum, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), batch)
        return loss_sum, count

    return jax.jit(eval_step, in_shardings=(state_sh, frozen_sh, batch_sh))


def evaluate(eval_step, state, frozen, data, batch_sh, accum: int) -> float:
    """Mean next-token loss over every eval batch (sum of losses / number of target tokens)."""
    total, count = 0.0, 0
    for host_batch in data.eval.batches():
        loss_sum, n = eval_step(state, frozen, data.to_device(host_batch, batch_sh, accum))
        total += float(loss_sum)
        count += int(n)
    return total / count if count else math.nan

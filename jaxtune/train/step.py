"""The one train step: `train_step(state, frozen, batch) -> (state, metrics)`, pure and jittable.

Gradient accumulation is a `lax.scan` over micro-batches; the loss is the sum of token losses
over the whole accumulated batch divided by its number of label tokens (not a mean of
micro-batch means), so 4 micro-batches of 2 rows give exactly the update of 1 batch of 8.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxtune.model.config import ModelConfig
from jaxtune.model.transformer import hidden_states, lm_head_kernel
from jaxtune.train.loss import cross_entropy_sum, next_token_targets
from jaxtune.train.state import TrainState, combine

BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    dtype: jnp.dtype = jnp.bfloat16  # compute dtype
    attention: str = "xla"
    remat: str | None = None  # a name in jaxtune.model.transformer.REMAT_POLICIES
    ce_chunk_tokens: int | None = None  # tokens per cross-entropy chunk per device (None: by vocab size)
    ce_fused: bool = True  # the loss's gradient taken chunk by chunk in the forward pass (loss.py)
    ce_logits_dtype: str | None = None  # what the lm_head matmul writes (None: `dtype`, as transformers)
    scan_unroll: int = 1  # layers per iteration of the layer scan (num_layers: no loop at all)
    # Rows may hold several sequences (sample_packing). False: one right-padded sequence per row,
    # so attention needs no segment mask (the segment ids still shape the targets); on a Hopper GPU
    # our flash kernel then runs its faster Mosaic forward.
    packed: bool = True


def loss_terms(params, cfg: ModelConfig, s: StepSettings, micro: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token losses, number of target tokens) for one micro-batch `[b, T]`."""
    h_btd = hidden_states(params, cfg, micro["input_ids"], segment_ids=micro["segment_ids"] if s.packed else None,
                          positions=micro["positions"], dtype=s.dtype, attention=s.attention, remat=s.remat,
                          scan_unroll=s.scan_unroll)
    # With context parallelism the batch arrives in zigzag order, where a token's neighbour in
    # memory is not its successor: the data path then supplies targets computed beforehand.
    targets_bt = micro["targets"] if "targets" in micro else next_token_targets(micro["labels"], micro["segment_ids"])
    return cross_entropy_sum(h_btd, lm_head_kernel(params, cfg), targets_bt, s.ce_chunk_tokens, s.ce_fused,
                             logits_dtype=s.ce_logits_dtype)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    s: StepSettings, with_rng: Callable | None = None) -> Callable:
    """`train_step(state, frozen, batch)`; batch leaves are `[accum, micro_rows, T]` int32.

    `with_rng(params, key)`, if given, hands each micro-batch its own PRNG key (LoRA dropout);
    keys derive from the state's seed, the step and the micro-batch index, so a resumed run
    draws the same dropout masks as an uninterrupted one.
    """

    def micro_loss(trainable, frozen, micro, key):
        params = combine(trainable, frozen)
        if with_rng is not None:
            params = with_rng(params, key)
        loss_sum, count = loss_terms(params, cfg, s, micro)
        return loss_sum, count

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, frozen, batch: dict):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def accumulate(carry, micro_and_index):
            loss_sum, count, grads = carry
            micro, index = micro_and_index
            key = jax.random.fold_in(step_key, index)
            (micro_sum, micro_count), micro_grads = grad_fn(state.trainable, frozen, micro, key)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (loss_sum + micro_sum, count + micro_count, grads), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        micro_batches = {k: batch[k] for k in (*BATCH_KEYS, "targets") if k in batch}
        accum = batch["input_ids"].shape[0]
        (loss_sum, count, grads), _ = jax.lax.scan(
            accumulate, (jnp.float32(0), jnp.int32(0), zeros), (micro_batches, jnp.arange(accum)))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "target_tokens": count,
        }
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    return train_step

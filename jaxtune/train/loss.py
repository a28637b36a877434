"""Next-token cross-entropy over packed rows, computed in vocabulary-sized chunks of tokens.

With a 128k vocabulary the float32 logits `[tokens, vocab]` would be the largest tensor of a step
(4 × 2048 tokens × 128256 × 4 B = 4.2 GB, again for their gradient). Here tokens go through the
lm_head in chunks under `lax.scan` with a rematerialised body, so only one chunk's logits exist at
a time, forward or backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100  # label value that carries no loss (prompt tokens, padding), as in HF


def next_token_targets(labels_bt: jax.Array, segment_ids_bt: jax.Array) -> jax.Array:
    """Targets `[B, T]`: position t predicts labels[t+1] when t+1 is in the same packed sequence.

    The data pipeline's labels are aligned with input_ids (not shifted); the last token of each
    packed sequence, and of each row, predicts nothing.
    """
    next_labels = jnp.concatenate([labels_bt[:, 1:], jnp.full_like(labels_bt[:, :1], IGNORE)], axis=1)
    next_segment = jnp.concatenate([segment_ids_bt[:, 1:], jnp.zeros_like(segment_ids_bt[:, :1])], axis=1)
    same_sequence = (next_segment == segment_ids_bt) & (segment_ids_bt > 0)
    return jnp.where(same_sequence, next_labels, IGNORE)


def cross_entropy_sum(h_btd: jax.Array, lm_head_dv: jax.Array, targets_bt: jax.Array,
                      chunk_tokens: int = 4096) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of target tokens) over all non-IGNORE targets.

    `h_btd` are final hidden states, `lm_head_dv` the output projection; logits are accumulated
    in float32 from operands in h's dtype. Tokens are padded up to a whole number of chunks.
    """
    D = h_btd.shape[-1]
    h_nd = h_btd.reshape(-1, D)
    targets_n = targets_bt.reshape(-1)
    n = h_nd.shape[0]
    chunk = min(chunk_tokens, n)
    pad = -n % chunk
    if pad:
        h_nd = jnp.pad(h_nd, ((0, pad), (0, 0)))
        targets_n = jnp.pad(targets_n, (0, pad), constant_values=IGNORE)
    h_cmd = h_nd.reshape(-1, chunk, D)
    targets_cm = targets_n.reshape(-1, chunk)
    w_dv = lm_head_dv.astype(h_btd.dtype)

    @jax.checkpoint  # backward recomputes one chunk's logits instead of keeping all of them
    def chunk_loss(h_md, targets_m):
        logits_mv = jnp.einsum("md,dv->mv", h_md, w_dv, preferred_element_type=jnp.float32)
        valid_m = targets_m != IGNORE
        safe_m = jnp.where(valid_m, targets_m, 0)
        target_logit_m = jnp.take_along_axis(logits_mv, safe_m[:, None], axis=-1)[:, 0]
        losses_m = jax.nn.logsumexp(logits_mv, axis=-1) - target_logit_m
        return jnp.sum(jnp.where(valid_m, losses_m, 0.0)), jnp.sum(valid_m, dtype=jnp.int32)

    def body(carry, xs):
        loss, count = chunk_loss(*xs)
        return (carry[0] + loss, carry[1] + count), None

    (loss_sum, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (h_cmd, targets_cm))
    return loss_sum, count

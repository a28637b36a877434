"""Next-token cross-entropy over packed rows, computed in vocabulary-sized chunks of tokens.

With a 128k vocabulary the float32 logits `[tokens, vocab]` would be the largest tensor of a step
(4 × 2048 tokens × 128256 × 4 B = 4.2 GB, again for their gradient). Here tokens go through the
lm_head in chunks under `lax.scan` with a rematerialised body, so only one chunk's logits exist at
a time, forward or backward; chunks are cut so that every device holds a share of each.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxtune.sharding import shard_counts

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


def chunk_tokens_for_vocab(vocab_size: int) -> int:
    """Tokens per cross-entropy chunk: the largest power of two (at least 256) whose float32
    logits fit in 0.5 GiB. Measured on an H200 (benchmarks/RESULTS.md): 1024 instead of 4096
    tokens at a 128k vocabulary gives the same step time and 2-3 GiB less peak memory."""
    tokens = 2**29 // (4 * vocab_size)
    return max(256, 1 << (tokens.bit_length() - 1)) if tokens else 256


def cross_entropy_sum(h_btd: jax.Array, lm_head_dv: jax.Array, targets_bt: jax.Array,
                      chunk_tokens: int | None = None, fused: bool = True,
                      logits_dtype=None) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of target tokens) over all non-IGNORE targets.

    `h_btd` are final hidden states, `lm_head_dv` the output projection; logits are accumulated
    in float32 from operands in h's dtype. Each device computes about `chunk_tokens` of its own
    tokens' logits at a time (default: `chunk_tokens_for_vocab`).

    Chunk j holds tokens j, j + n, j + 2n, ... of every row (n chunks): the rows keep their
    data/fsdp sharding and the length its sequence sharding in every chunk, so all devices work
    on every chunk. (Contiguous chunks of the flattened tokens would put whole chunks on one
    device, and the scan over them would run the lm_head one device at a time.)

    `fused`: under differentiation, each chunk's gradient is taken while its logits exist (see
    `_fused_loss`), instead of recomputing the logits in the backward pass.

    `logits_dtype`: what the lm_head matmul writes (accumulating in float32 either way; default:
    h's dtype); the softmax math is float32. In bf16 this is what transformers and MaxText do (an
    lm_head in bf16 returns bf16 logits, upcast for the loss) and halves the memory traffic of the
    loss's biggest tensor (+1–1.4% tokens/s on the 1B LoRA step, benchmarks/RESULTS.md); float32
    logits keep the rounding of the matmul's accumulator.
    """
    B, T, D = h_btd.shape
    chunk_tokens = chunk_tokens or chunk_tokens_for_vocab(lm_head_dv.shape[-1])
    batch_shards, length_shards, _ = shard_counts(("act_batch", "act_length", "act_embed"), h_btd.shape)
    local_length = T // length_shards
    wanted = math.ceil((B // batch_shards) * local_length / chunk_tokens)
    n = next(d for d in range(min(wanted, local_length), local_length + 1) if local_length % d == 0)
    h_nbkd = h_btd.reshape(B, T // n, n, D).transpose(2, 0, 1, 3)
    targets_nbk = targets_bt.reshape(B, T // n, n).transpose(2, 0, 1)
    w_dv = lm_head_dv.astype(h_btd.dtype)
    # With the vocabulary split over devices (tensor parallel lm_head), picking the target's logit
    # by index would gather every logit; a masked sum over the vocab reduces in place instead.
    vocab_split = shard_counts(("act_embed", "act_vocab"), lm_head_dv.shape)[1] > 1
    logits_dtype = jnp.dtype(logits_dtype or h_btd.dtype)
    if fused:
        return _fused_loss(vocab_split, logits_dtype, h_nbkd, w_dv, targets_nbk)
    return _chunked_loss(vocab_split, logits_dtype, h_nbkd, w_dv, targets_nbk)


def _chunk_logits(h_bkd, w_dv, targets_bk, vocab_split: bool, logits_dtype):
    """One chunk's float32 logits, the target logits, the validity mask and the targets with
    IGNORE replaced by 0 (an index that exists)."""
    logits_bkv = jnp.einsum("bkd,dv->bkv", h_bkd, w_dv, preferred_element_type=logits_dtype).astype(jnp.float32)
    valid_bk = targets_bk != IGNORE
    safe_bk = jnp.where(valid_bk, targets_bk, 0)
    if vocab_split:
        vocab_v = jnp.arange(logits_bkv.shape[-1], dtype=safe_bk.dtype)
        target_logit_bk = jnp.sum(jnp.where(vocab_v == safe_bk[..., None], logits_bkv, 0.0), axis=-1)
    else:
        target_logit_bk = jnp.take_along_axis(logits_bkv, safe_bk[..., None], axis=-1)[..., 0]
    return logits_bkv, target_logit_bk, valid_bk, safe_bk


def _loss_and_count(lse_bk, target_logit_bk, valid_bk):
    """A chunk's summed token losses (-log p(target) = lse - target logit) and its target count."""
    return jnp.sum(jnp.where(valid_bk, lse_bk - target_logit_bk, 0.0)), jnp.sum(valid_bk, dtype=jnp.int32)


def _chunk_terms(h_bkd, w_dv, targets_bk, vocab_split: bool, logits_dtype):
    logits_bkv, target_logit_bk, valid_bk, _ = _chunk_logits(h_bkd, w_dv, targets_bk, vocab_split, logits_dtype)
    lse_bk = jax.nn.logsumexp(logits_bkv, axis=-1)
    return _loss_and_count(lse_bk, target_logit_bk, valid_bk)


def _chunked_loss(vocab_split, logits_dtype, h_nbkd, w_dv, targets_nbk):
    """The loss by a scan over chunks; differentiated by autodiff, the backward recomputes each
    chunk's logits (the body is rematerialised) instead of keeping all of them."""
    chunk_terms = jax.checkpoint(lambda h, t: _chunk_terms(h, w_dv, t, vocab_split, logits_dtype))

    def body(carry, xs):
        loss, count = chunk_terms(*xs)
        return (carry[0] + loss, carry[1] + count), None

    (loss_sum, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (h_nbkd, targets_nbk))
    return loss_sum, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_loss(vocab_split, logits_dtype, h_nbkd, w_dv, targets_nbk):
    """`_chunked_loss` whose gradient is computed in the forward pass, chunk by chunk.

    d(loss)/d(logits) = softmax - one_hot(target) is known as soon as a chunk's logits are, so
    the forward also computes dh = dlogits·Wᵀ (and dW += hᵀ·dlogits when the lm_head is being
    trained) and keeps only those: the backward scales them by the incoming cotangent. This saves
    the recomputation of every chunk's logits, one [tokens, D] × [D, vocab] matmul per step.
    dlogits comes from the pass that sums the softmax's exponentials (`_scaled_logits_grad`).
    Without differentiation (evaluation) only the loss is computed.
    """
    return _chunked_loss(vocab_split, logits_dtype, h_nbkd, w_dv, targets_nbk)


def _fused_loss_fwd(vocab_split, logits_dtype, h_nbkd, w_dv, targets_nbk):
    want_dw = w_dv.perturbed  # symbolic zeros: a frozen lm_head (LoRA) gets no dW matmul
    h_nbkd, w_dv, targets_nbk = h_nbkd.value, w_dv.value, targets_nbk.value

    def body(carry, xs):
        loss, count, dw_dv = carry
        h_bkd, targets_bk = xs
        grad_terms = _split_vocab_logits_grad if vocab_split else _scaled_logits_grad
        g_bkv, row_scale_bk, lse_bk, target_logit_bk, valid_bk = grad_terms(h_bkd, w_dv, targets_bk, logits_dtype)
        dh_bkd = jnp.einsum("bkv,dv->bkd", g_bkv, w_dv, preferred_element_type=jnp.float32) * row_scale_bk[..., None]
        if want_dw:
            h_scaled_bkd = (h_bkd * row_scale_bk[..., None]).astype(h_bkd.dtype)
            dw_dv = dw_dv + jnp.einsum("bkd,bkv->dv", h_scaled_bkd, g_bkv, preferred_element_type=jnp.float32)
        chunk_loss, chunk_count = _loss_and_count(lse_bk, target_logit_bk, valid_bk)
        return (loss + chunk_loss, count + chunk_count, dw_dv), dh_bkd.astype(h_bkd.dtype)

    dw0 = jnp.zeros(w_dv.shape, jnp.float32) if want_dw else None
    (loss_sum, count, dw_dv), dh_nbkd = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0), dw0), (h_nbkd, targets_nbk))
    return (loss_sum, count), (dh_nbkd, dw_dv)


def _split_vocab_logits_grad(h_bkd, w_dv, targets_bk, logits_dtype):
    """`_scaled_logits_grad`'s terms with the vocabulary split over devices: g = softmax −
    one_hot(target) itself (row scale 1, 0 for IGNORE targets), the one-hot by comparison with each
    device's vocabulary indices (a scatter into a sharded vocabulary would gather it)."""
    logits_bkv, target_logit_bk, valid_bk, safe_bk = _chunk_logits(h_bkd, w_dv, targets_bk, True, logits_dtype)
    lse_bk = jax.nn.logsumexp(logits_bkv, axis=-1)
    vocab_v = jnp.arange(logits_bkv.shape[-1], dtype=safe_bk.dtype)
    g_bkv = jnp.exp(logits_bkv - lse_bk[..., None]) - (vocab_v == safe_bk[..., None])
    return g_bkv.astype(h_bkd.dtype), valid_bk.astype(jnp.float32), lse_bk, target_logit_bk, valid_bk


def _scaled_logits_grad(h_bkd, w_dv, targets_bk, logits_dtype):
    """A chunk's d(loss)/d(logits) as `row_scale · g` (g in h's dtype, row_scale float32 per token),
    with its log-sum-exp, target logits and validity mask.

    softmax − one_hot(target) = (e − s·one_hot) / s, with e = exp(logits − max) and s = Σ e. The
    pass that sums e also writes it, and e − s (float32, then rounded) replaces e at the target.
    `jax.nn.logsumexp` and a separate gradient pass read the logits three times (1B LoRA step,
    H200: 68 + 81 + 185 µs per 1024-token chunk at a 128k vocabulary); this reads them twice
    (68 + 136 µs, benchmarks/RESULTS.md). The 1/s (0 for IGNORE targets) goes onto the
    [tokens, D] side of the matmuls that consume g: dh = (g·Wᵀ)/s, dW = (h/s)ᵀ·g.
    """
    logits_bkv, target_logit_bk, valid_bk, safe_bk = _chunk_logits(h_bkd, w_dv, targets_bk, False, logits_dtype)
    max_bk = jnp.max(logits_bkv, axis=-1)
    e_bkv = jnp.exp(logits_bkv - max_bk[..., None])
    sum_bk = jnp.sum(e_bkv, axis=-1)
    target_g_bk = (jnp.exp(target_logit_bk - max_bk) - sum_bk).astype(h_bkd.dtype)
    g_bkv = _set_at_targets(e_bkv.astype(h_bkd.dtype), safe_bk, target_g_bk)
    row_scale_bk = jnp.where(valid_bk, 1.0 / sum_bk, 0.0)
    return g_bkv, row_scale_bk, max_bk + jnp.log(sum_bk), target_logit_bk, valid_bk


def _set_at_targets(x_bkv, targets_bk, values_bk):
    """x with x[b, k, targets[b, k]] = values[b, k]: a scatter whose token dimensions are batch
    dimensions, so that the partitioner keeps it on each device's tokens (the full-index form that
    `.at[]` and `put_along_axis` build gathered the indices across devices)."""
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(2,),
                                           scatter_dims_to_operand_dims=(2,), operand_batching_dims=(0, 1),
                                           scatter_indices_batching_dims=(0, 1))
    return jax.lax.scatter(x_bkv, targets_bk[..., None], values_bk, dims, indices_are_sorted=True,
                           unique_indices=True, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _fused_loss_bwd(vocab_split, logits_dtype, residuals, cotangents):
    dh_nbkd, dw_dv = residuals
    g = cotangents[0]  # of loss_sum; the count has none
    dh = (dh_nbkd * g).astype(dh_nbkd.dtype)
    dw = None if dw_dv is None else (dw_dv * g)
    return dh, dw, None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd, symbolic_zeros=True)

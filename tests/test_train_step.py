"""The train step: accumulation equals one big batch, the chunked loss equals the plain one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.model.config import ModelConfig
from jaxtune.model.params import init_params
from jaxtune.model.transformer import forward
from jaxtune.train.loss import IGNORE, cross_entropy_sum, next_token_targets
from jaxtune.train.optimizer import OptimizerSettings, make_optimizer
from jaxtune.train.state import init_state, partition
from jaxtune.train.step import StepSettings, make_train_step

CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def packed_batch(rows: int, T: int, seed: int = 0) -> dict:
    """Rows of 2-3 packed sequences with prompt tokens masked and trailing padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (rows, T)).astype(np.int32)
    labels, seg, pos = ids.copy(), np.zeros_like(ids), np.zeros_like(ids)
    for r in range(rows):
        t, s = 0, 1
        while t < T - 3:
            n = int(rng.integers(3, T // 2))
            n = min(n, T - 2 - t)
            seg[r, t:t + n], pos[r, t:t + n] = s, np.arange(n)
            labels[r, t:t + int(rng.integers(1, n))] = IGNORE  # prompt part
            t, s = t + n, s + 1
        labels[r, t:] = IGNORE
    return dict(input_ids=ids, labels=labels, segment_ids=seg, positions=pos)


def test_next_token_targets_stop_at_sequence_boundaries():
    labels = jnp.array([[5, 6, 7, 8, 9, -100]])
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(next_token_targets(labels, seg), [[6, -100, 8, 9, -100, -100]])


def test_chunked_cross_entropy_equals_full_logits():
    params = init_params(CFG, jax.random.key(0))
    batch = packed_batch(3, 17)
    targets = next_token_targets(jnp.asarray(batch["labels"]), jnp.asarray(batch["segment_ids"]))
    from jaxtune.model.transformer import hidden_states, lm_head_kernel

    h = hidden_states(params, CFG, batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    loss_sum, count = cross_entropy_sum(h, lm_head_kernel(params, CFG), targets, chunk_tokens=5)  # 51 = 10*5+1
    logits = forward(params, CFG, batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    logp = jax.nn.log_softmax(logits)
    valid = targets != IGNORE
    ref = -jnp.sum(jnp.where(valid, jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], -1)[..., 0], 0))
    assert int(count) == int(valid.sum())
    np.testing.assert_allclose(loss_sum, ref, rtol=1e-6)


@pytest.mark.parametrize("lm_head_trained", [True, False])
def test_fused_cross_entropy_gradient_equals_autodiff(lm_head_trained):
    """The fused loss (gradient taken in the forward pass) gives autodiff's gradients; with a
    frozen lm_head it runs no dW matmul (2 matmuls per chunk, not 3)."""
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (3, 17, 8))
    w = jax.random.normal(keys[1], (8, 29))
    targets = jax.random.randint(keys[2], (3, 17), -5, 29)
    targets = jnp.where(targets < 0, IGNORE, targets)
    argnums = (0, 1) if lm_head_trained else (0,)

    def grads(fused):
        loss = lambda h, w: 2.5 * cross_entropy_sum(h, w, targets, chunk_tokens=5, fused=fused)[0]
        return jax.grad(loss, argnums=argnums)(h, w), jax.make_jaxpr(jax.grad(loss, argnums=argnums))(h, w)

    (want, _), (got, jaxpr) = grads(False), grads(True)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-6)
    assert str(jaxpr).count("dot_general") == (3 if lm_head_trained else 2)


def test_fused_cross_entropy_exponentiates_each_chunks_logits_once():
    """With the vocabulary on one device, the fused loss's forward takes exp of a chunk's logits in
    one pass that also sums them (the gradient is that pass's output, rescaled on the [tokens, D]
    side), not in logsumexp's pass and again in the gradient's; no vocabulary-wide one-hot."""
    keys = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(keys[0], (2, 10, 8))
    w = jax.random.normal(keys[1], (8, 29))
    targets = jax.random.randint(keys[2], (2, 10), 0, 29)
    grad = jax.grad(lambda h, w: cross_entropy_sum(h, w, targets, chunk_tokens=5)[0], argnums=(0, 1))
    text = str(jax.make_jaxpr(grad)(h, w))
    vocab_wide = r"\[\d+,\d+,29\] = "
    assert len(re.findall(vocab_wide + "exp ", text)) == 1
    assert len(re.findall(vocab_wide + "(eq|iota) ", text)) == 0


def test_fused_cross_entropy_keeps_small_target_gradients_of_confident_bf16_predictions():
    """p − 1 at a target predicted with p ≈ 0.997 is formed in float32 before rounding to bf16
    (rounding p first would give 0 or −0.0039): the bf16 gradient stays within bf16 rounding of
    the float32 one."""
    keys = jax.random.split(jax.random.key(2), 3)
    targets = jax.random.randint(keys[0], (2, 16), 0, 61)
    # logit ≈ 10 for the target, ≈ 0 elsewhere: p(target) ≈ e¹⁰ / (e¹⁰ + 60) ≈ 0.997
    h = (jax.nn.one_hot(targets, 64) + 0.05 * jax.random.normal(keys[1], (2, 16, 64))).astype(jnp.bfloat16)
    w = (10.0 * jnp.eye(64, 61) + 0.05 * jax.random.normal(keys[2], (64, 61))).astype(jnp.bfloat16)

    def grad(dtype):
        loss = lambda h: cross_entropy_sum(h.astype(dtype), w.astype(dtype), targets, chunk_tokens=8)[0]
        return np.asarray(jax.grad(loss)(h.astype(dtype)), np.float32)

    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h.astype(jnp.float32), w.astype(jnp.float32)))
    p_target = np.exp(np.asarray(jnp.take_along_axis(logp, targets[..., None], -1)))
    assert np.median(p_target) > 0.99
    g32, g16 = grad(jnp.float32), grad(jnp.bfloat16)
    assert np.linalg.norm(g16 - g32) <= 2e-2 * np.linalg.norm(g32)


def test_rms_norm_output_is_one_array_in_the_forward_and_fences_nothing_in_the_backward():
    """The norm's scaled output passes an optimization barrier in the forward pass (so XLA writes
    it once rather than the unscaled array plus a `* scale` per consumer); its gradient does not
    (the consumers' input gradients stay fusable into the norm's backward). Same values either way."""
    from jaxtune.model.transformer import rms_norm

    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    scale = jnp.linspace(0.5, 1.5, 16)
    plain = lambda x, s: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s
    forward = str(jax.make_jaxpr(lambda x: rms_norm(x, scale, 1e-6))(x))
    assert forward.count("optimization_barrier") == 1
    loss = lambda fn: lambda x, s: jnp.sum(jnp.sin(fn(x, s)))
    backward = str(jax.make_jaxpr(jax.grad(loss(lambda x, s: rms_norm(x, s, 1e-6)), argnums=(0, 1)))(x, scale))
    assert backward.count("optimization_barrier") == 1  # the forward's, not one on the gradient
    got = jax.grad(loss(lambda x, s: rms_norm(x, s, 1e-6)), argnums=(0, 1))(x, scale)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, scale)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-6)


def test_bf16_layers_keep_no_float32_activations_for_the_backward(capsys):
    """Norms and the gated MLP compute in float32 from bf16, but the backward pass keeps only
    their bf16 inputs (recomputing the float32 math), not float32 copies of [.., D] or [.., F]
    activations. (Attention's own residuals are the backend's business: flash keeps bf16 q/k/v/out.)"""
    from jax.ad_checkpoint import print_saved_residuals

    from jaxtune.model.transformer import hidden_states

    params = init_params(CFG, jax.random.key(0), dtype=jnp.bfloat16)
    ids = jnp.zeros((2, 16), jnp.int32)

    def loss(params):
        h = hidden_states(params, CFG, ids, dtype=jnp.bfloat16, attention="pallas")
        return jnp.sum(h.astype(jnp.float32))

    print_saved_residuals(loss, params)
    saved = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("f32[", "bf16["))]
    widths = {str(CFG.hidden_size), str(CFG.intermediate_size)}
    activations = [line for line in saved if line.split("]")[0].split(",")[-1] in widths
                   and line.split("[")[1].split(",")[0] == str(CFG.num_layers)]  # stacked per layer
    assert activations and all(line.startswith("bf16[") for line in activations), activations


def test_save_attention_policy_skips_the_attention_forward_in_the_backward():
    """With `remat_policy: save_attention` the layer's backward reuses the saved q/k/v, flash output
    and log-sum-exp: its compiled backward holds as many loops (layer scan, flash kernels' loops in
    interpret mode) as without remat, fewer than full remat (which reruns the flash forward), and
    the gradients are the same."""
    import re

    from jaxtune.model.transformer import hidden_states

    params = init_params(CFG, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 32)), jnp.int32)
    loops, grads = {}, {}
    for remat in (None, "nothing_saveable", "save_attention"):
        def loss(params, remat=remat):
            return jnp.sum(hidden_states(params, CFG, ids, attention="pallas", remat=remat) ** 2)

        backward = jax.jit(jax.vjp(loss, params)[1]).lower(1.0).compile()
        grads[remat] = backward(1.0)[0]
        loops[remat] = len(re.findall(r" while\(", backward.as_text()))
    assert loops["save_attention"] == loops[None] < loops["nothing_saveable"], loops
    # Same math; XLA fuses the recomputed ops differently, so float32 rounding differs (the XLA
    # attention backend under nothing_saveable differs from no remat by 2e-5 too).
    for remat in ("nothing_saveable", "save_attention"):
        for got, want in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads[None])):
            assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), remat


@pytest.mark.parametrize("remat", [None, "save_attention"])
def test_unrolled_layers_compute_the_scanned_gradients(remat):
    """`scan_layers: false` unrolls the layer loop (with CSE barriers under remat): same math."""
    from jaxtune.model.transformer import hidden_states

    params = init_params(CFG, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 16)), jnp.int32)
    grads = [jax.grad(lambda p, u=unroll: jnp.sum(hidden_states(p, CFG, ids, remat=remat, scan_unroll=u) ** 2))(params)
             for unroll in (1, CFG.num_layers)]
    # Same math; XLA fuses the unrolled program differently, so float32 rounding differs (the
    # scanned step jitted and run eagerly differ by 4e-5 too).
    for got, want in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def run_steps(accum: int, micro: int, steps: int = 3):
    params = init_params(CFG, jax.random.key(1))
    tx, schedule = make_optimizer(OptimizerSettings(learning_rate=1e-2, warmup_steps=1, weight_decay=0.1), steps)
    trainable, frozen = partition(params, jax.tree.map(lambda _: True, params))
    state = init_state(trainable, tx, jax.random.key(2))
    step = jax.jit(make_train_step(CFG, tx, schedule, StepSettings(dtype=jnp.float32, ce_chunk_tokens=16)))
    losses = []
    for i in range(steps):
        batch = packed_batch(accum * micro, 16, seed=10 + i)
        batch = {k: v.reshape(accum, micro, -1) for k, v in batch.items()}
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses, state.trainable


def test_accumulating_4x2_equals_one_batch_of_8():
    losses_a, params_a = run_steps(accum=4, micro=2)
    losses_b, params_b = run_steps(accum=1, micro=8)
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
    # Adam divides by sqrt(v): a float32 rounding difference in a near-zero gradient can move an
    # element by ~1e-6 after 3 steps, a thousandth of a step's update (lr 1e-2).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params_a, params_b)
    assert losses_a[-1] < losses_a[0]


@pytest.mark.parametrize("attention", ["pallas", "xla"])
def test_unpacked_rows_need_no_attention_segment_mask(attention, monkeypatch):
    """`StepSettings(packed=False)` (sample_packing: false) drops the attention's segment mask:
    with one right-padded sequence per row no real token sees padding anyway, so loss and
    gradients equal the masked step's (the padding's own outputs differ, but carry no loss).
    Without the mask our flash kernel may take its Hopper forward, which has no segment ids."""
    import jaxtune.train.step as step_module

    seen, original = [], step_module.hidden_states

    def recording_hidden_states(*args, segment_ids, **kwargs):
        seen.append(segment_ids is None)
        return original(*args, segment_ids=segment_ids, **kwargs)

    monkeypatch.setattr(step_module, "hidden_states", recording_hidden_states)
    params = init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(3)
    T, lengths = 24, (24, 17, 9)
    ids = rng.integers(0, CFG.vocab_size, (len(lengths), T)).astype(np.int32)
    seg = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    labels = np.where(seg == 1, ids, IGNORE).astype(np.int32)
    micro = dict(input_ids=ids, labels=labels, segment_ids=seg,
                 positions=np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape))
    results = []
    for packed in (True, False):
        s = StepSettings(dtype=jnp.float32, attention=attention, packed=packed)
        (loss, count), grads = jax.value_and_grad(lambda p: step_module.loss_terms(p, CFG, s, micro),
                                                  has_aux=True)(params)
        results.append((loss, count, grads))
    assert seen == [False, True]  # the attention got segment ids only in the packed step
    (loss_m, count_m, grads_m), (loss_u, count_u, grads_u) = results
    assert int(count_m) == int(count_u) == sum(n - 1 for n in lengths)
    np.testing.assert_allclose(loss_u, loss_m, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_u), jax.tree.leaves(grads_m)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("windows", [None, (0, 0), (5, 0)])
def test_flash_kernel_sees_a_static_window_unless_a_layer_has_one(windows, monkeypatch):
    """The layer loop scans a per-layer window array; for a model without sliding windows the
    kernel must get a static 0 instead of that traced value, or it keeps window masks and cannot
    take its Hopper forward (the 8B training step ran the Triton forward for that reason)."""
    import dataclasses

    import jaxtune.kernels.flash_attention as flash_module
    from jaxtune.model.transformer import hidden_states

    seen, original = [], flash_module.flash_attention

    def recording_flash_attention(*args, window=None, **kwargs):
        seen.append(window)
        return original(*args, window=window, **kwargs)

    monkeypatch.setattr(flash_module, "flash_attention", recording_flash_attention)
    cfg = dataclasses.replace(CFG, sliding_windows=windows)
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.zeros((1, 16), jnp.int32)
    jax.eval_shape(lambda p: hidden_states(p, cfg, ids, attention="pallas"), params)
    assert seen, "the pallas backend did not call our flash kernel"
    if windows is not None and any(windows):
        assert all(isinstance(w, jax.core.Tracer) for w in seen)
    else:
        assert seen == [0] * len(seen)


def test_bf16_logits_cross_entropy_writes_bf16_logits_and_stays_close():
    """`logits_dtype=bfloat16` (the default for bf16 hidden states): the lm_head matmul writes bf16
    logits (half the memory traffic of the loss's biggest tensor), the softmax math stays float32;
    loss and gradient agree with the float32-logits loss to bf16 rounding, fused or not."""
    keys = jax.random.split(jax.random.key(4), 3)
    h = jax.random.normal(keys[0], (2, 16, 32), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (32, 61)) * 0.3).astype(jnp.bfloat16)
    targets = jax.random.randint(keys[2], (2, 16), 0, 61)
    for fused in (True, False):
        def loss(h, dtype, fused=fused):
            return cross_entropy_sum(h, w, targets, chunk_tokens=8, fused=fused, logits_dtype=dtype)[0]

        def jaxpr(dtype):
            return str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(h, dtype))

        assert "preferred_element_type=bfloat16" in jaxpr(jnp.bfloat16)
        assert "preferred_element_type=bfloat16" in jaxpr(None)  # default: h's dtype, as transformers
        assert "preferred_element_type=bfloat16" not in jaxpr(jnp.float32)
        want, got = loss(h, jnp.float32), loss(h, jnp.bfloat16)
        np.testing.assert_allclose(got, want, rtol=1e-2)
        g32, g16 = jax.grad(loss)(h, jnp.float32), jax.grad(loss)(h, jnp.bfloat16)
        assert np.linalg.norm(np.asarray(g16 - g32, np.float32)) <= 3e-2 * np.linalg.norm(np.asarray(g32, np.float32))

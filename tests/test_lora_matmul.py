"""The LoRA projection kernel (Mosaic GPU, kernels/lora_matmul_mosaic.py): `residual + x@W + xa@sB`
and its transposed form `x@Wᵀ + xa@sBᵀ` against float32 products of the same bf16 inputs; shapes it
cannot take refused by name; lowered for an H200 from the CPU.

On CPU the kernel runs in Mosaic GPU's interpret mode (SMEM, TMA, barriers and wgmma simulated; the
interpreter also checks that every barrier phase is observed and none skipped); on a Hopper GPU
compiled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels import lora_matmul_mosaic as lm
from h200_lowering import lower_for_h200
from test_flash_attention import INTERPRET


def _inputs(tokens, k, n, transpose, residual):
    keys = jax.random.split(jax.random.key(0), 5)
    rand = lambda i, shape, scale: (jax.random.normal(keys[i], shape) * scale).astype(jnp.bfloat16)
    # Every term about as large as the frozen product, so leaving one out (or adding it to the
    # wrong rows or columns) cannot pass. A dense sB: the kernel must use all of xa's K.
    w = rand(2, (n, k) if transpose else (k, n), k**-0.5)
    sb = rand(3, (n, lm.ADAPTER_K) if transpose else (lm.ADAPTER_K, n), lm.ADAPTER_K**-0.5)
    res = rand(4, (tokens, n), 1.0) if residual else None
    return rand(0, (tokens, k), 1.0), w, rand(1, (tokens, lm.ADAPTER_K), 1.0), sb, res


@pytest.mark.parametrize("tokens,k,n,transpose,residual,stages,programs,cluster,cooperative", [
    (64, 64, 256, False, False, 2, None, 1, False),  # one tile, two K steps (one frozen, the adapters')
    # 2 x 2 tiles over 3 programs, so one program's two consumers each take one; 3 K steps through
    # 3 slots, so slots and phases carry from tile to tile; the residual in the epilogue
    (128, 128, 512, False, True, 3, None, 1, False),
    # the backward's form: W and sB as stored, transposed in SMEM; 4 x 1 tiles over 2 programs
    (256, 192, 256, True, False, 3, 2, 1, False),
    (128, 128, 512, True, True, 2, 1, 1, False),  # one program walks all four tiles, its consumers in turn
    # 2-CTA clusters: 2 pairs of programs over 4 x 2 tiles, W's tiles multicast to each pair
    (256, 128, 512, False, True, 3, 4, 2, False),
    # cooperative 128-row tiles, both consumers on each: 2 x 2 tiles over 3 programs, forward with
    # the residual and the transposed form
    (256, 128, 512, False, True, 3, None, 1, True),
    (256, 192, 256, True, False, 2, 1, 1, True),
])
def test_lora_matmul_matches_float32_products(tokens, k, n, transpose, residual, stages, programs, cluster,
                                              cooperative):
    x, w, xa, sb, res = _inputs(tokens, k, n, transpose, residual)
    out = lm.lora_matmul(x, w, xa, sb, res, transpose=transpose, stages=stages, programs=programs,
                         cluster=cluster, cooperative=cooperative, interpret=INTERPRET)
    f32 = lambda a: np.asarray(a, np.float32)
    w_, sb_ = (f32(w).T, f32(sb).T) if transpose else (f32(w), f32(sb))
    frozen, adapter = f32(x) @ w_, f32(xa) @ sb_
    assert np.abs(adapter).mean() > 0.5 * np.abs(frozen).mean()
    want = frozen + adapter + (f32(res) if residual else 0.0)
    assert out.dtype == jnp.bfloat16 and out.shape == (tokens, n)
    np.testing.assert_allclose(f32(out), want, rtol=1e-2, atol=3e-2)  # one bf16 rounding of the sum


def test_lora_matmul_refuses_shapes_by_name():
    assert lm.supports(8192, 2048, 2048, 64, jnp.bfloat16) is None
    assert "N = 320" in lm.supports(8192, 2048, 320, 64, jnp.bfloat16)
    assert "K = 100" in lm.supports(8192, 100, 2048, 64, jnp.bfloat16)
    assert "tokens = 100" in lm.supports(100, 2048, 2048, 64, jnp.bfloat16)
    assert "adapter K = 16" in lm.supports(8192, 2048, 2048, 16, jnp.bfloat16)
    assert "float32" in lm.supports(8192, 2048, 2048, 64, jnp.float32)
    assert "cluster = 2" in lm.supports(64, 2048, 2048, 64, jnp.bfloat16, cluster=2)
    assert "tokens = 64 is not a multiple of 128" in lm.supports(64, 2048, 2048, 64, jnp.bfloat16, cooperative=True)
    assert "cooperative" in lm.supports(8192, 2048, 2048, 64, jnp.bfloat16, cluster=2, cooperative=True)
    x, w, xa, sb, res = _inputs(64, 64, 256, False, True)
    with pytest.raises(ValueError, match=r"residual has shape \(64, 128\), expected \(64, 256\)"):
        lm.lora_matmul(x, w, xa, sb, res[:, :128], interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"sb has shape \(64, 256\), expected \(256, 64\)"):
        lm.lora_matmul(x, w.T, xa, sb, transpose=True, interpret=INTERPRET)  # sB not transposed
    with pytest.raises(ValueError, match="at least one program, got programs=0"):
        lm.lora_matmul(x, w, xa, sb, programs=0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="at least two stages"):
        lm.lora_matmul(x, w, xa, sb, stages=1, interpret=INTERPRET)


def test_lora_matmul_lowers_for_an_h200():
    """Compiled for a GPU the kernel goes through Mosaic GPU's layout inference and SMEM budget,
    which interpret mode skips: lowered here, from the CPU, at the 1B step's o_proj shapes (4
    stages and two 64 × 256 staging buffers: 224 KiB of SMEM), forward with the residual, the
    backward's transposed form, 2-CTA clusters, and cooperative 128-row tiles (3 stages: 208 KiB);
    and `lora_matmul_activation_grad` at the 1B step's down_proj shapes."""
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    for transpose, residual, cluster, cooperative in ((False, True, 1, False), (True, False, 1, False),
                                                      (False, True, 2, False), (False, True, 1, True)):
        sb = s(2048, 64) if transpose else s(64, 2048)
        fn = functools.partial(lm.lora_matmul, transpose=transpose, cluster=cluster, cooperative=cooperative,
                               stages=3 if cooperative else 4)
        text = lower_for_h200(fn, s(8192, 2048), s(2048, 2048), s(8192, 64), sb, s(8192, 2048) if residual else None)
        assert "jaxtune_lora_matmul" in text
    # down_proj's backward with the activation's (1B: F 8192, D 2048), both tilings
    for cooperative in (True, False):
        fn = functools.partial(lm.lora_matmul_activation_grad, hidden_act="silu", chunk=128, cooperative=cooperative,
                               stages=3 if cooperative else 4)
        text = lower_for_h200(fn, s(8192, 2048), s(8192, 2048), s(8192, 64), s(8192, 64), s(8192, 16384))
        assert "jaxtune_lora_matmul_activation_grad" in text


def _activation_grad_want(x, w, xa, sb, gate_up, chunk):
    """float32 `[dg | du]` in the joint layout for dh = x@Wᵀ + xa@sBᵀ and h = silu(g)·u."""
    f32 = lambda a: np.asarray(a, np.float32)
    dh = f32(x) @ f32(w).T + f32(xa) @ f32(sb).T
    t, f = dh.shape
    joint = f32(gate_up).reshape(t, f // chunk, 2, chunk)
    g, u = joint[:, :, 0].reshape(t, f), joint[:, :, 1].reshape(t, f)
    s = 1 / (1 + np.exp(-g))
    dg, du = dh * u * s * (1 + g * (1 - s)), dh * g * s
    return np.stack([dg.reshape(t, f // chunk, chunk), du.reshape(t, f // chunk, chunk)], axis=2).reshape(t, 2 * f)


@pytest.mark.parametrize("tokens,k,f,chunk,stages,programs,cooperative", [
    # 2 x 2 cooperative tiles over 3 programs; chunks of 128 (a tile spans two), 64 (four)
    (256, 128, 512, 128, 3, None, True),
    (256, 192, 512, 64, 2, 1, True),  # one program walks all four tiles: the staging pairs' phases carry
    (128, 128, 512, 256, 3, None, False),  # ping-pong 64-row tiles, the chunk as wide as a tile
])
def test_lora_matmul_activation_grad_matches_float32(tokens, k, f, chunk, stages, programs, cooperative):
    """down_proj's backward with the gated activation's in its epilogue: dh is never rounded, g and u
    come from (and dg, du go to) the joint layout, chunk by chunk."""
    x, w, xa, sb, _ = _inputs(tokens, k, f, True, False)
    gate_up = jax.random.normal(jax.random.key(7), (tokens, 2 * f)).astype(jnp.bfloat16) * 2
    out = lm.lora_matmul_activation_grad(x, w, xa, sb, gate_up, hidden_act="silu", chunk=chunk, stages=stages,
                                         programs=programs, cooperative=cooperative, interpret=INTERPRET)
    assert out.dtype == jnp.bfloat16 and out.shape == (tokens, 2 * f)
    want = _activation_grad_want(x, w, xa, sb, gate_up, chunk)
    swapped = _activation_grad_want(x, w, xa, sb, gate_up[:, ::-1], chunk)  # gate and up mixed up: must fail
    got = np.asarray(out, np.float32)
    assert np.abs(got - swapped).max() > 0.5
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=3e-2)  # bf16 g and u, one rounding


def test_lora_matmul_activation_grad_refuses_by_name():
    x, w, xa, sb, _ = _inputs(128, 128, 512, True, False)
    gu = jnp.zeros((128, 1024), jnp.bfloat16)
    call = functools.partial(lm.lora_matmul_activation_grad, hidden_act="silu", chunk=128, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"gate_up has shape \(128, 512\), expected \(128, 1024\)"):
        call(x, w, xa, sb, gu[:, :512])
    with pytest.raises(ValueError, match="chunk = 96 must be a multiple of 64"):
        call(x, w, xa, sb, gu, chunk=96)
    with pytest.raises(ValueError, match="activation 'gelu_new'"):
        call(x, w, xa, sb, gu, hidden_act="gelu_new")

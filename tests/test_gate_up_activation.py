"""The LoRA gate/up projections + activation kernel (Mosaic GPU): g and u in the joint layout and h
against float32 products of the same bf16 inputs, the adapter term included; shapes it cannot take
refused by name.

On CPU the kernel runs in Mosaic GPU's interpret mode (SMEM, TMA, barriers and wgmma simulated; the
interpreter also checks that every barrier phase is observed and none skipped); on a Hopper GPU
compiled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels import gate_up_activation_mosaic as gu
from jaxtune.kernels.activation_math import REFERENCE
from h200_lowering import lower_for_h200
from test_flash_attention import INTERPRET


def _inputs(tokens, hidden, mlp, adapter_k=gu.ADAPTER_K):
    keys = jax.random.split(jax.random.key(0), 5)
    rand = lambda i, shape, scale: (jax.random.normal(keys[i], shape) * scale).astype(jnp.bfloat16)
    # The adapters' term is as large as the frozen one, so leaving it out (or adding it to the
    # wrong rows or columns) cannot pass. A dense sB: the kernel must use all of xa's K.
    return (rand(0, (tokens, hidden), 1.0), rand(1, (tokens, adapter_k), 1.0),
            rand(2, (hidden, mlp), hidden**-0.5), rand(3, (hidden, mlp), hidden**-0.5),
            rand(4, (adapter_k, 2 * mlp), adapter_k**-0.5))


def _joint(gate, up, chunk):
    """gate and up `[T, F]` side by side chunk by chunk: `[T, 2F]`."""
    t, f = gate.shape
    return np.stack([gate.reshape(t, f // chunk, chunk), up.reshape(t, f // chunk, chunk)], axis=2).reshape(t, 2 * f)


@pytest.mark.parametrize("tokens,hidden,mlp,chunk,act,stages,slots,programs,cluster", [
    (64, 64, 128, 128, "silu", 2, 1, None, 1),  # one tile, two K steps (one frozen, the adapters')
    # 4 x 6 tiles over 3 programs of 8 tiles each, so both consumers take four; two tiles per chunk;
    # 6 K steps through 3 ring slots, so slots and phases carry from tile to tile
    (256, 320, 768, 256, "gelu_pytorch_tanh", 3, 2, 3, 1),
    # 5 programs asked for 2 x 2 tiles: 4 run, one tile each (the second consumers idle)
    (128, 128, 256, 128, "silu", 5, 1, 5, 1),
    # 2-CTA clusters: 2 pairs of programs over 4 x 2 tiles, the kernels' tiles multicast to each pair
    (256, 128, 256, 128, "silu", 3, 1, 4, 2),
])
def test_gate_up_activation_matches_float32_products(tokens, hidden, mlp, chunk, act, stages, slots, programs,
                                                     cluster):
    x, xa, w_g, w_u, sb = args = _inputs(tokens, hidden, mlp)
    joint, h = gu.gate_up_activation(*args, hidden_act=act, chunk=chunk, stages=stages, store_slots=slots,
                                     cluster=cluster, programs=programs, interpret=INTERPRET)
    f32 = lambda a: np.asarray(a, np.float32)
    sb_joint = f32(sb).reshape(-1, mlp // chunk, 2, chunk)
    sb_g, sb_u = sb_joint[:, :, 0].reshape(-1, mlp), sb_joint[:, :, 1].reshape(-1, mlp)
    want_g = f32(x) @ f32(w_g) + f32(xa) @ sb_g
    want_u = f32(x) @ f32(w_u) + f32(xa) @ sb_u
    assert np.abs(f32(xa) @ sb_g).mean() > 0.5 * np.abs(f32(x) @ f32(w_g)).mean()
    assert joint.dtype == jnp.bfloat16 and joint.shape == (tokens, 2 * mlp)
    np.testing.assert_allclose(f32(joint), _joint(want_g, want_u, chunk), rtol=1e-2, atol=2e-2)  # bf16 rounding
    # h from the rounded g and u, as the unfused model forms it
    got = f32(joint).reshape(tokens, mlp // chunk, 2, chunk)
    g, u = got[:, :, 0].reshape(tokens, mlp), got[:, :, 1].reshape(tokens, mlp)
    want_h = np.asarray(REFERENCE[act](jnp.asarray(g)) * u)
    assert h.dtype == jnp.bfloat16 and h.shape == (tokens, mlp)
    np.testing.assert_allclose(f32(h), want_h, rtol=1e-2, atol=1e-2)


def test_gate_up_activation_refuses_shapes_by_name():
    assert gu.supports(8192, 2048, 8192, 128, 64, jnp.bfloat16, "silu") is None
    assert "adapter K = 32" in gu.supports(8192, 2048, 8192, 128, 32, jnp.bfloat16, "silu")
    assert "tokens = 100" in gu.supports(100, 2048, 8192, 128, 64, jnp.bfloat16, "silu")
    assert "chunk = 96" in gu.supports(8192, 2048, 8192, 96, 64, jnp.bfloat16, "silu")
    assert "float32" in gu.supports(8192, 2048, 8192, 128, 64, jnp.float32, "silu")
    with pytest.raises(ValueError, match="mlp = 192 is not a multiple of 128"):
        gu.gate_up_activation(*_inputs(128, 64, 192), hidden_act="silu", chunk=128, interpret=INTERPRET)
    with pytest.raises(ValueError, match="at least one program, got programs=0"):
        gu.gate_up_activation(*_inputs(128, 64, 128), hidden_act="silu", chunk=128, programs=0, interpret=INTERPRET)
    assert "cluster = 2" in gu.supports(64, 2048, 8192, 128, 64, jnp.bfloat16, "silu", cluster=2)
    with pytest.raises(ValueError, match="cluster = 2 \\(1, or 2 with an even number of 64-row tiles\\)"):
        gu.gate_up_activation(*_inputs(64, 64, 128), hidden_act="silu", chunk=128, cluster=2, interpret=INTERPRET)
    with pytest.raises(ValueError, match="at least two stages"):
        gu.gate_up_activation(*_inputs(128, 64, 128), hidden_act="silu", chunk=128, stages=1, interpret=INTERPRET)


def test_gate_up_activation_lowers_for_an_h200():
    """Compiled for a GPU the kernel goes through Mosaic GPU's layout inference and SMEM budget,
    which interpret mode skips: lowered here, from the CPU, at the 1B step's shapes (4 stages and two
    store slots per consumer: 192 KiB of SMEM; 5 and one: 216 KiB; 2-CTA clusters). Ranks of 16 in
    an unpadded K failed this (see ADAPTER_K)."""
    shapes = [(8192, 2048), (8192, 64), (2048, 8192), (2048, 8192), (64, 16384)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    for stages, slots, cluster in ((4, 2, 1), (5, 1, 1), (4, 1, 2)):
        fn = functools.partial(gu.gate_up_activation, hidden_act="silu", chunk=128, stages=stages, store_slots=slots,
                               cluster=cluster)
        assert "jaxtune_gate_up_activation" in lower_for_h200(fn, *args)

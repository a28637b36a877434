"""The LoRA gate/up projections + activation kernel (Mosaic GPU): g, u and h against float32
products of the same bf16 inputs, the adapter term included; shapes it cannot take refused by name.

On CPU the kernel runs in Mosaic GPU's interpret mode (SMEM, TMA, barriers and wgmma simulated);
on a Hopper GPU compiled.
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
    keys = jax.random.split(jax.random.key(0), 6)
    rand = lambda i, shape, scale: (jax.random.normal(keys[i], shape) * scale).astype(jnp.bfloat16)
    # The adapters' term is as large as the frozen one, so leaving it out (or adding it to the
    # wrong rows or columns) cannot pass. Dense sB's: the kernel must use all of xa's K.
    return (rand(0, (tokens, hidden), 1.0), rand(1, (tokens, adapter_k), 1.0),
            rand(2, (hidden, mlp), hidden**-0.5), rand(3, (hidden, mlp), hidden**-0.5),
            rand(4, (adapter_k, mlp), adapter_k**-0.5), rand(5, (adapter_k, mlp), adapter_k**-0.5))


@pytest.mark.parametrize("tokens,hidden,mlp,act,stages,programs", [
    (128, 64, 128, "silu", 3, None),               # one tile, one K step
    # 2 x 3 tiles over 4 programs (two walk two tiles, two one: the sB tiles and the store slots
    # are reused across tiles), 5 K steps through 2 buffers, bands of 16 tiles cut short
    (256, 320, 384, "gelu_pytorch_tanh", 2, 4),
])
def test_gate_up_activation_matches_float32_products(tokens, hidden, mlp, act, stages, programs):
    x, xa, w_g, w_u, sb_g, sb_u = args = _inputs(tokens, hidden, mlp)
    g, u, h = gu.gate_up_activation(*args, hidden_act=act, stages=stages, programs=programs,
                                    interpret=INTERPRET)
    f32 = lambda a: np.asarray(a, np.float32)
    want_g = f32(x) @ f32(w_g) + f32(xa) @ f32(sb_g)
    want_u = f32(x) @ f32(w_u) + f32(xa) @ f32(sb_u)
    assert np.abs(f32(xa) @ f32(sb_g)).mean() > 0.5 * np.abs(f32(x) @ f32(w_g)).mean()
    for got, want in ((g, want_g), (u, want_u)):
        assert got.dtype == jnp.bfloat16 and got.shape == (tokens, mlp)
        np.testing.assert_allclose(f32(got), want, rtol=1e-2, atol=2e-2)  # bf16 rounding of the result
    # h from the rounded g and u, as the unfused model forms it
    want_h = np.asarray(REFERENCE[act](jnp.asarray(f32(g))) * f32(u))
    np.testing.assert_allclose(f32(h), want_h, rtol=1e-2, atol=1e-2)


def test_gate_up_activation_refuses_shapes_by_name():
    assert gu.supports(8192, 2048, 8192, 64, jnp.bfloat16, "silu") is None
    assert "adapter K = 32" in gu.supports(8192, 2048, 8192, 32, jnp.bfloat16, "silu")
    assert "tokens = 100" in gu.supports(100, 2048, 8192, 64, jnp.bfloat16, "silu")
    assert "float32" in gu.supports(8192, 2048, 8192, 64, jnp.float32, "silu")
    with pytest.raises(ValueError, match="mlp = 200 is not a multiple of 128"):
        gu.gate_up_activation(*_inputs(128, 64, 200), hidden_act="silu", interpret=INTERPRET)
    with pytest.raises(ValueError, match="at least one program, got programs=0"):
        gu.gate_up_activation(*_inputs(128, 64, 128), hidden_act="silu", programs=0, interpret=INTERPRET)


def test_gate_up_activation_lowers_for_an_h200():
    """Compiled for a GPU the kernel goes through Mosaic GPU's layout inference and SMEM budget,
    which interpret mode skips: lowered here, from the CPU, at the 1B step's shapes (2 and 3
    stages: 176 and 224 KiB of SMEM; 4 would not fit). Ranks of 16 in an unpadded K failed this
    (see ADAPTER_K)."""
    shapes = [(8192, 2048), (8192, 64), (2048, 8192), (2048, 8192), (64, 8192), (64, 8192)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    for stages in (2, 3):
        fn = functools.partial(gu.gate_up_activation, hidden_act="silu", stages=stages)
        assert "jaxtune_gate_up_activation" in lower_for_h200(fn, *args)

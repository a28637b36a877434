"""The Mosaic GPU (Hopper) forward, `BlockSizes(forward="mosaic")`: values, log-sum-exp and the
gradients it feeds the Triton backward, against the float32 reference; unsupported cases refused.

On CPU the kernel runs in Mosaic GPU's interpret mode (SMEM, TMA, barriers and wgmma simulated).
Inputs are bf16 (wgmma takes 2-byte operands), so the bar is bf16-level agreement.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels.flash_attention import (BlockSizes, _mosaic_problems, _resolve_forward, flash_attention,
                                             flash_attention_reference)
from test_flash_attention import INTERPRET, _inputs, _value_and_grads, rel_err

MOSAIC = dataclasses.replace(BlockSizes.tiles(64, 64), forward="mosaic")


@pytest.mark.parametrize("b,s,h,kh,d,causal", [
    (1, 128, 2, 1, 64, True),     # MQA, one program (two consumer warpgroups), the causal diagonal
    (1, 384, 4, 2, 128, False),   # GQA, full attention, three 128-key blocks through two buffers
    (1, 384, 2, 2, 64, True),     # causal over three programs: 1, 2 and 3 key blocks, masked on the last
])
def test_mosaic_forward_matches_the_reference_and_feeds_the_backward(b, s, h, kh, d, causal):
    q, k, v, do, w = _inputs(0, b, s, s, h, kh, d, jnp.bfloat16)
    o, lse, grads = _value_and_grads(flash_attention, q, k, v, do, w, causal=causal, block_sizes=MOSAIC,
                                     interpret=INTERPRET)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ro, rlse, rgrads = _value_and_grads(flash_attention_reference, *f32, do, w, causal=causal)
    assert rel_err(o, ro) < 1e-2
    np.testing.assert_allclose(lse, rlse, atol=1e-4)
    for got, want in zip(grads, rgrads):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("kwargs,named", [
    (dict(segment_ids=jnp.zeros((1, 128), jnp.int32)), "segment ids"),
    (dict(window=32), "sliding window"),
    (dict(q_offset=64), "offsets"),
])
def test_mosaic_forward_refuses_what_it_cannot_do(kwargs, named):
    q, k, v, *_ = _inputs(0, 1, 128, 128, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(NotImplementedError, match=named):
        flash_attention(q, k, v, block_sizes=MOSAIC, interpret=INTERPRET, **kwargs)


def test_mosaic_forward_refuses_lengths_that_need_padding_and_float32():
    q, k, v, *_ = _inputs(0, 1, 100, 100, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="lengths 100/100"):
        flash_attention(q, k, v, block_sizes=MOSAIC, interpret=INTERPRET)
    q, k, v, *_ = _inputs(0, 1, 192, 192, 2, 2, 64, jnp.bfloat16)  # whole 64-tiles, half a program
    with pytest.raises(NotImplementedError, match="lengths 192/192"):
        flash_attention(q, k, v, block_sizes=MOSAIC, interpret=INTERPRET)
    q, k, v, *_ = _inputs(0, 1, 128, 128, 2, 2, 64, jnp.float32)
    with pytest.raises(NotImplementedError, match="dtype float32"):
        flash_attention(q, k, v, block_sizes=MOSAIC, interpret=INTERPRET)
    with pytest.raises(ValueError, match="forward='cuda'"):
        BlockSizes(forward="cuda")


def test_auto_takes_the_mosaic_forward_only_on_hopper_where_the_call_fits():
    """`forward="auto"` (the default): Mosaic on a Hopper GPU for a call it can run, Triton for
    anything else or off Hopper; an explicit "mosaic" that cannot run is refused, never rerouted."""
    q, k, *_ = _inputs(0, 1, 256, 256, 2, 2, 128, jnp.bfloat16)
    auto = BlockSizes()
    assert auto.forward == "auto"
    fits = _mosaic_problems(q, k, None, None, None, 0, 0, auto)
    packed = _mosaic_problems(q, k, jnp.zeros((1, 256), jnp.int32), None, None, 0, 0, auto)
    assert fits == [] and packed == ["segment ids"]
    assert _resolve_forward(auto, fits, hopper=True).forward == "mosaic"
    assert _resolve_forward(auto, fits, hopper=False).forward == "triton"
    assert _resolve_forward(auto, packed, hopper=True).forward == "triton"
    with pytest.raises(NotImplementedError, match="segment ids"):
        _resolve_forward(MOSAIC, packed, hopper=True)
    q256, k256, *_ = _inputs(0, 1, 128, 128, 1, 1, 256, jnp.bfloat16)
    assert _mosaic_problems(q256, k256, None, None, None, 0, 0, auto) == ["head_dim 256 (64 or 128)"]

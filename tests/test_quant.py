"""NF4 and int8 frozen bases: the code book, blocks, packing, double quantisation, storage cost,
the quantised linear, QLoRA training; and bit-for-bit agreement with bitsandbytes where it runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxtune import lora, quant
from jaxtune.model.config import ModelConfig
from jaxtune.model.linear import dense, linear
from jaxtune.model.params import abstract_params, init_params, param_specs
from test_lora import CFG, ids, run, train


def reference_nf4(flat: np.ndarray):
    """The block definition written out plainly: per block of 64, absmax and the nearest code."""
    pad = -flat.size % 64
    blocks = np.pad(flat.astype(np.float32), (0, pad)).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / absmax[:, None]
    idx = np.abs(scaled[..., None] - quant.NF4_CODE).argmin(-1)
    return idx.reshape(-1)[:flat.size], absmax


def test_code_book_is_qlora_nf4():
    code = quant.NF4_CODE
    assert code.shape == (16,) and np.all(np.diff(code) > 0)
    assert code[0] == -1.0 and code[7] == 0.0 and code[15] == 1.0
    # asymmetric: 8 non-negative levels (incl. exact 0) and 7 negative, from N(0,1) quantiles (QLoRA §3)
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7
    np.testing.assert_allclose(code[8], 0.07958029955625534, rtol=0)
    dyn = quant.DYNAMIC_CODE
    assert dyn.shape == (256,) and np.all(np.diff(dyn) > 0) and dyn[-1] == 1.0 and 0.0 in dyn


@pytest.mark.parametrize("shape", [(64, 96), (5, 7, 3)])  # the second is not a multiple of 64
def test_nf4_matches_the_block_definition(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * np.linspace(0.1, 3, shape[-1])
    leaf = quant.nf4_quantize_tensor(jnp.asarray(x), double_quant=False)
    ref_idx, ref_absmax = reference_nf4(x.reshape(-1))
    idx = np.asarray(quant.nf4_code_indices(leaf)).reshape(-1)[:x.size]
    assert (idx == ref_idx).mean() > 0.999  # nearest-code ties are the only allowed difference
    np.testing.assert_array_equal(leaf.absmax, ref_absmax)
    assert leaf.codes.dtype == jnp.uint8 and leaf.codes.shape == (math.ceil(x.size / 64), 32)
    # two codes per byte, the first in the high nibble
    np.testing.assert_array_equal(np.asarray(leaf.codes).reshape(-1)[:x.size // 2],
                                  (ref_idx[0:x.size // 2 * 2:2] << 4) | ref_idx[1:x.size // 2 * 2:2])
    back = np.asarray(quant.nf4_dequantize(leaf))
    assert back.shape == shape and back.dtype == np.float32
    np.testing.assert_array_equal(back.reshape(-1), quant.NF4_CODE[ref_idx] * np.repeat(ref_absmax, 64)[:x.size])


def test_nf4_double_quant_stays_close_and_keeps_dtype():
    x = jax.random.normal(jax.random.key(0), (3, 256, 96), jnp.bfloat16)
    plain = quant.quantize_kernel(x, 1, quant.QuantConfig(bits=4, double_quant=False))
    double = quant.quantize_kernel(x, 1, quant.QuantConfig(bits=4, double_quant=True))
    assert double.absmax.dtype == jnp.uint8 and double.absmax_scale.shape == (3, 2)
    assert double.absmax_offset.shape == (3,)
    np.testing.assert_array_equal(plain.codes, double.codes)
    # absmax error: at most half the widest gap of the dynamic map (or the distance from -1 to its
    # lowest code, since it has +1 but not -1), times the second-level scale
    err = np.abs(np.asarray(quant.nf4_absmax(double)) - np.asarray(plain.absmax))
    worst = max(np.diff(quant.DYNAMIC_CODE).max() / 2, 1 + quant.DYNAMIC_CODE[0])
    scale = np.repeat(np.asarray(double.absmax_scale), 256, -1)[:, :err.shape[1]]
    assert np.all(err <= worst * scale * 1.0001)
    w = quant.nf4_dequantize(double)
    assert w.dtype == jnp.bfloat16 and w.shape == x.shape
    rel = float(jnp.linalg.norm((w - x).astype(jnp.float32)) / jnp.linalg.norm(x.astype(jnp.float32)))
    assert rel < 0.12  # NF4 on Gaussian weights: ~0.1 relative RMS error


def test_int8_rowwise_roundtrip():
    x = np.random.default_rng(1).standard_normal((2, 24, 4, 6)).astype(np.float32)
    leaf = quant.quantize_kernel(jnp.asarray(x), 1, quant.QuantConfig(bits=8))
    assert leaf.codes.dtype == jnp.int8 and leaf.absmax.shape == (2, 4, 6)
    np.testing.assert_array_equal(leaf.absmax, np.abs(x).max(axis=1))
    assert np.abs(np.asarray(leaf.codes)).max() == 127
    err = np.abs(np.asarray(quant.dequantize(leaf)) - x)
    assert np.all(err <= np.abs(x).max(axis=1, keepdims=True) / 254 * 1.0001)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_is_dense_on_the_dequantized_weight_and_differentiable(bits):
    w = jax.random.normal(jax.random.key(0), (24, 4, 6))
    leaf = quant.quantize_kernel(w, 1, quant.QuantConfig(bits=bits), stacked=False)
    x = jax.random.normal(jax.random.key(1), (2, 3, 24))
    spec = "btd,dnh->btnh"
    np.testing.assert_allclose(linear(x, leaf, spec, jnp.float32),
                               dense(x, quant.dequantize(leaf), spec, jnp.float32), rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(linear(x, leaf, spec, jnp.bfloat16).astype(jnp.float32)))(x)
    assert grad.shape == x.shape and np.all(np.isfinite(grad))


def test_frozen_base_costs_about_half_a_byte_per_parameter():
    # Llama-3.1-8B shapes, abstractly: what the device will hold for the quantised projections.
    llama8b = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    abstract = traverse_util.flatten_dict(abstract_params(llama8b, jnp.bfloat16))
    for qcfg, expected in [(quant.QuantConfig(4, True), 0.5 + 1 / 64 + 4 / (64 * 256)),
                           (quant.QuantConfig(4, False), 0.5 + 4 / 64),
                           (quant.QuantConfig(8), 1.0)]:  # + one float32 per output feature
        total_bytes = total_params = 0
        for path in quant.quantized_paths(llama8b):
            x = abstract[path]
            in_ndim = param_specs(llama8b)[path].in_ndim
            leaf = jax.eval_shape(lambda x: quant.quantize_kernel(x, in_ndim, qcfg), x)
            total_bytes += quant.stored_bytes(leaf)
            total_params += math.prod(x.shape)
        assert total_params > 6.9e9
        assert total_bytes / total_params == pytest.approx(expected, rel=2e-3), qcfg
    # the goal for QLoRA with double quantisation: ≈ 0.53 bytes per parameter
    assert 0.5 + 1 / 64 + 4 / (64 * 256) < 0.53


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_stream_equals_quantize_and_model_runs(bits):
    params = init_params(CFG, jax.random.key(0))
    qcfg = quant.QuantConfig(bits=bits)
    whole = quant.quantize(params, CFG, qcfg)
    host = [(p, np.asarray(x)) for p, x in traverse_util.flatten_dict(params).items()]
    uploaded = []  # what goes to the device: never a whole stacked kernel, one layer's tensor at a time

    def put(array):
        uploaded.append(array.shape)
        return jax.device_put(array)

    streamed = traverse_util.unflatten_dict(dict(quant.quantize_stream(host, CFG, qcfg, put=put)))
    kernel_shapes = {tuple(traverse_util.flatten_dict(params)[p].shape) for p in quant.quantized_paths(CFG)}
    assert not kernel_shapes & set(uploaded)
    assert uploaded.count((CFG.hidden_size, CFG.intermediate_size)) == 2 * CFG.num_layers  # gate, up
    assert jax.tree.structure(whole) == jax.tree.structure(streamed)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(streamed)):
        np.testing.assert_array_equal(a, b)
    flat = traverse_util.flatten_dict(whole)
    assert isinstance(flat[("layers", "mlp", "down_proj", "kernel")], quant.NF4 if bits == 4 else quant.Int8)
    assert isinstance(flat[("lm_head", "kernel")], jax.Array)  # kept in full precision, as bitsandbytes
    # the model on NF4 leaves is the model on their dequantised weights
    np.testing.assert_allclose(run(whole, ids()), run(lora.merge(whole), ids()), rtol=1e-5, atol=1e-5)


def test_qlora_lowers_the_loss_about_as_lora_does():
    params = init_params(CFG, jax.random.key(0), jnp.bfloat16)
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_linear=True)
    lora_losses, _ = train(lora.apply(params, cfg, CFG, jax.random.key(1)), cfg)
    quantized = quant.quantize(params, CFG, quant.QuantConfig(bits=4))
    qlora_losses, final = train(lora.apply(quantized, cfg, CFG, jax.random.key(1)), cfg)
    assert isinstance(lora.lora_leaves(final)[("layers", "mlp", "up_proj", "kernel")].base, quant.NF4)
    lora_drop, qlora_drop = lora_losses[0] - lora_losses[-1], qlora_losses[0] - qlora_losses[-1]
    assert lora_drop > 1.0 and qlora_drop > 0.8 * lora_drop, (lora_losses, qlora_losses)


# --- bitsandbytes, where it installs (CPU backend of bitsandbytes >= 0.45) ------------------------

@pytest.fixture(scope="module")
def bnb():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    return torch, bnb.functional


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_equal_bitsandbytes(bnb, double_quant):
    torch, F = bnb
    x = np.random.default_rng(2).standard_normal((96, 200)).astype(np.float32) * 0.05  # 300 blocks
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4",
                                    compress_statistics=double_quant)
    ours = quant.nf4_quantize_tensor(jnp.asarray(x), double_quant)
    np.testing.assert_array_equal(np.asarray(ours.codes).reshape(-1), packed.numpy().reshape(-1))
    if double_quant:
        # The mean (offset) may differ in the last bit (summation order), and bitsandbytes' CPU
        # 8-bit search rounds values within ~1% of a gap from a midpoint either way; ours takes
        # the nearest code, as its CUDA kernel's search does. So: codes off by at most one step,
        # rarely, and the same absmax after dequantisation up to that step.
        np.testing.assert_allclose(ours.absmax_offset, state.offset.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours.absmax_scale, state.state2.absmax.numpy(), rtol=1e-6)
        diff = np.abs(np.asarray(ours.absmax, np.int32) - state.absmax.numpy().astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    else:
        np.testing.assert_array_equal(ours.absmax, state.absmax.numpy())
    theirs = F.dequantize_4bit(packed, state).numpy()
    if double_quant:
        np.testing.assert_allclose(quant.nf4_absmax(ours), F.dequantize_blockwise(state.absmax, state.state2).numpy()
                                   + state.offset.numpy(), rtol=0, atol=0.015 * state.state2.absmax.numpy().max())
    else:
        np.testing.assert_array_equal(quant.nf4_dequantize(ours), theirs)
    np.testing.assert_array_equal(quant.DYNAMIC_CODE, F.create_dynamic_map().numpy())


def test_int8_equals_bitsandbytes(bnb):
    torch, F = bnb
    w_hf = np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32)  # [out, in]
    codes, stats, _ = F.int8_vectorwise_quant(torch.from_numpy(w_hf.copy()))
    ours = quant.int8_quantize_tensor(jnp.asarray(w_hf.T), in_ndim=1)  # ours is [in, out]
    np.testing.assert_array_equal(np.asarray(ours.codes).T, codes.numpy())
    np.testing.assert_array_equal(ours.absmax, stats.numpy())
    np.testing.assert_allclose(np.asarray(quant.dequantize(ours)).T,
                               F.int8_vectorwise_dequant(codes, stats).numpy(), rtol=1e-6)

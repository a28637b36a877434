"""The residual stream's RMSNorm through our Pallas kernels (kernels/rms_norm.py, wired in by
jaxtune/model/norm.py): the kernels against their jnp reference and against autodiff, and the
whole model's loss and gradients against the plain form, unsharded and sharded.

On CPU the kernels run in Pallas interpret mode (`KERNELS = "interpret"`); `test_lowers_to_triton`
lowers them for an abstract H200, so a primitive without a Triton lowering fails here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h200_lowering import lower_for_h200
from jaxtune import lora
from jaxtune.kernels import rms_norm as kernel
from jaxtune.model import norm
from jaxtune.model.config import ModelConfig
from jaxtune.model.params import init_params
from jaxtune.model.transformer import forward

EPS = 1e-5
INTERPRET = jax.default_backend() == "cpu"  # compiled on a GPU


def _arrays(rows, width, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    h = (jax.random.normal(keys[0], (rows, width)) * 3.0).astype(dtype)
    scale = (1.0 + 0.5 * jax.random.normal(keys[1], (width,))).astype(dtype)
    dy = jax.random.normal(keys[2], (rows, width)).astype(dtype)
    dres = jax.random.normal(keys[3], (rows, width)).astype(dtype)
    return h, scale, dy, dres


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,width,blocks", [
    (24, 64, kernel.Blocks()),  # 3 programs of 8 rows
    (7, 32, kernel.Blocks()),  # 7 of 1
    (24, 64, kernel.Blocks(elements=64, warps=8)),  # 24 of 1, on 8 warps
])
def test_kernels_match_reference(dtype, rows, width, blocks):
    h, scale, dy, dres = _arrays(rows, width, dtype)
    y, rstd = kernel.forward(h, scale, eps=EPS, blocks=blocks, interpret=INTERPRET)
    want_y, want_rstd = kernel.forward_reference(h, scale, EPS)
    assert y.dtype == dtype and rstd.dtype == jnp.float32 and rstd.shape == (rows,)
    np.testing.assert_allclose(rstd, want_rstd, rtol=1e-6)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: a sum's order can flip one rounding
    assert _rel(y, want_y) < tol
    for d_residual in (dres, None):
        got = kernel.backward(h, rstd, scale, dy, d_residual, blocks=blocks, interpret=INTERPRET)
        assert got.dtype == dtype
        assert _rel(got, kernel.backward_reference(h, want_rstd, scale, dy, d_residual)) < tol


def test_backward_is_the_gradient_of_the_forward():
    """float32: the kernel's backward is autodiff's vjp of the forward, plus the residual term."""
    h, scale, dy, dres = _arrays(16, 64, jnp.float32, seed=3)
    _, rstd = kernel.forward(h, scale, eps=EPS, interpret=INTERPRET)
    _, vjp = jax.vjp(lambda h: kernel.forward_reference(h, scale, EPS)[0], h)
    want = vjp(dy)[0] + dres
    np.testing.assert_allclose(kernel.backward(h, rstd, scale, dy, dres, interpret=INTERPRET), want, rtol=1e-5, atol=1e-5)
    assert _rel(vjp(dy)[0], dres) > 0.1  # both terms matter: leaving either out cannot pass


def test_supports_and_block_rows():
    assert kernel.supports(8192, 2048, jnp.bfloat16) is None
    assert "width 3072" in kernel.supports(8192, 3072, jnp.bfloat16)
    assert "int32" in kernel.supports(8192, 2048, jnp.int32)
    blocks = kernel.Blocks()
    assert blocks.rows(8192, 2048) == 4 and blocks.rows(8192, 4096) == 2 and blocks.num_warps(4096) == 8
    assert blocks.rows(24, 64) == 8 and blocks.rows(7, 64) == 1
    assert kernel.Blocks(elements=2048, warps=8).rows(8192, 2048) == 1
    with pytest.raises(ValueError, match="Blocks.warps=6 must be a power of two"):
        kernel.Blocks(warps=6)
    with pytest.raises(ValueError, match="width 48 is not a power of two"):
        kernel.forward(jnp.ones((4, 48)), jnp.ones((48,)), eps=EPS, interpret=INTERPRET)


CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def _loss_and_grads(params, batch, mode, monkeypatch, remat=None):
    monkeypatch.setattr(norm, "KERNELS", mode)
    loss = lambda p: jnp.sum(forward(p, CFG, batch, remat=remat) ** 2)
    if mode == "interpret":
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        if remat is None:  # under remat the backward runs the forward kernels again
            assert jaxpr.count("jaxtune_rms_norm_fwd") == 2 * CFG.num_layers + 1  # every residual norm
        assert "jaxtune_rms_norm_bwd" in jaxpr
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("adapter,remat", [
    (False, None),  # full fine-tuning: the norms' scales get gradients too
    (True, "save_attention_block"),  # LoRA under the 8B case's remat policy (the forward kernels rerun)
])
def test_model_matches_the_plain_form(adapter, remat, monkeypatch):
    params = init_params(CFG, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 1.5 if x.ndim == 1 else x, params)  # scales away from 1
    if adapter:
        from test_lora import randomize_adapters

        params = randomize_adapters(lora.apply(params, lora.LoraConfig(r=4, alpha=8.0, target_linear=True), CFG,
                                               jax.random.key(1)))
    batch = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 8)))
    got = _loss_and_grads(params, batch, "interpret", monkeypatch, remat)
    want = _loss_and_grads(params, batch, "off", monkeypatch, remat)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w) + 1e-7
    scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(got[1]) if "layernorm" in str(path)]
    assert scales and all(np.linalg.norm(s) > 0 for s in scales)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="builds a data × fsdp × tensor mesh of 2 × 2 × 2: needs 8 devices (the CPU suite forces 8)")
def test_sharded_model_matches_unsharded(monkeypatch):
    """Over data, fsdp and tensor (rows split by batch: the kernels per shard in shard_map)."""
    from test_lora import assert_sharded_model_matches_unsharded, randomize_adapters

    monkeypatch.setattr(norm, "KERNELS", "interpret")
    adapted = randomize_adapters(lora.apply(init_params(CFG, jax.random.key(0)),
                                            lora.LoraConfig(r=4, alpha=8.0, target_linear=True), CFG, jax.random.key(1)))
    assert_sharded_model_matches_unsharded(adapted, CFG, traced_in_backward="jaxtune_rms_norm_bwd")


@pytest.mark.skipif(len(jax.devices()) < 8, reason="builds a data × sequence mesh of 2 × 4: needs 8 devices (the CPU suite forces 8)")
def test_rows_split_by_length_match_unsplit(monkeypatch):
    """Context parallelism splits the residual stream's tokens over the mesh's `sequence` axis
    (with batch over data, and the embed dimension whole): the kernels run per shard on those rows,
    and h's value, the norm and h's gradient (norm + residual path) equal the unsharded ones."""
    from jaxtune.mesh import make_mesh
    from jaxtune.model.transformer import RESIDUAL
    from jaxtune.sharding import activation_sharding, merged_rules

    monkeypatch.setattr(norm, "KERNELS", "interpret")
    keys = jax.random.split(jax.random.key(5), 3)
    h = jax.random.normal(keys[0], (4, 16, 32), jnp.float32)
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (32,))
    w = jax.random.normal(keys[2], (4, 16, 32))

    def loss(h):
        h_out, y = norm.residual_rms_norm(h, scale, EPS, RESIDUAL)
        return jnp.sum(y * w) + jnp.sum(jnp.sin(h_out))

    mesh = make_mesh({"data": 2, "sequence": 4})
    with activation_sharding(mesh, merged_rules()):
        traced = str(jax.make_jaxpr(jax.grad(loss))(h))
        assert "jaxtune_rms_norm_bwd" in traced and "shard_map" in traced
        sharded = jax.jit(jax.value_and_grad(loss))(h)
    monkeypatch.setattr(norm, "KERNELS", "off")
    plain = jax.jit(jax.value_and_grad(loss))(h)
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(sharded[1], plain[1], rtol=1e-5, atol=1e-6)


def test_lowers_to_triton():
    """Both kernels lower to one Triton call each for an H200, from this CPU, at the 1B and 8B widths."""
    for rows, width in [(8192, 2048), (4096, 4096)]:
        h = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16)
        scale = jax.ShapeDtypeStruct((width,), jnp.bfloat16)
        rstd = jax.ShapeDtypeStruct((rows,), jnp.float32)
        for hlo in (lower_for_h200(lambda h, s: kernel.forward(h, s, eps=EPS), h, scale),
                    lower_for_h200(lambda *z: kernel.backward(*z), h, rstd, scale, h, h)):
            assert hlo.count("__gpu$xla.gpu.triton") == 1

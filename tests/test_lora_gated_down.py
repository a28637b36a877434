"""The gated MLP's activation and LoRA down_proj as one function (jaxtune/lora_gated_down.py) and
its backward kernel (kernels/lora_activation_grad.py): the kernel against its jnp reference, and
the whole block against autodiff of the per-projection form, plain and sharded.

On CPU the Pallas kernel runs in interpret mode (`KERNELS = "interpret"`); `test_lowers_to_triton`
lowers it for an abstract H200, so a primitive without a Triton lowering fails here too.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h200_lowering import lower_for_h200
from jaxtune import lora, lora_gated_down
from jaxtune.kernels import lora_activation_grad as kernel
from jaxtune.kernels.activation_math import ACTIVATIONS
from jaxtune.model import mlp as mlp_module


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rank", [8, 16])
def test_kernel_matches_reference(dtype, rank):
    n, f = 48, 320  # 3 row blocks of 16; columns shrink to 64 (320 = 5 × 64)
    ks = jax.random.split(jax.random.key(0), 5)
    g, u, dhb = (jax.random.normal(k, (n, f), dtype) * 2 for k in ks[:3])
    dha = jax.random.normal(ks[3], (n, rank), dtype)
    a = (jax.random.normal(ks[4], (f, rank)) * 0.3).astype(dtype)
    for act in ACTIVATIONS:
        got = kernel.activation_grad(g, u, dhb, dha, a, act, interpret=True)
        want = kernel.activation_grad_reference(g, u, dhb, dha, a, act)
        tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: a rounding step either side of a tie
        for x, y in zip(got, want):
            assert x.dtype == dtype and x.shape == (n, f)
            assert _rel(x, y) < tol, (act, _rel(x, y))


def test_supports_and_block_fitting():
    assert kernel.BlockSizes().fit(8192, 8192) == kernel.BlockSizes(16, 128, 4)
    assert kernel.BlockSizes().fit(4096, 14336) == kernel.BlockSizes(16, 128, 4)
    assert kernel.BlockSizes().fit(48, 96) == kernel.BlockSizes(16, 32, 4)
    assert kernel.supports(8192, 5632, jnp.bfloat16, "silu")
    assert not kernel.supports(40, 128, jnp.bfloat16, "silu")  # 40 rows: no block of >= 16 divides
    assert not kernel.supports(64, 100, jnp.bfloat16, "silu")  # 100 columns: none of >= 32
    assert not kernel.supports(64, 128, jnp.int32, "silu")
    assert not kernel.supports(64, 128, jnp.bfloat16, "gelu_new")
    with pytest.raises(ValueError, match="power of two"):
        kernel.BlockSizes(block_rows=24)
    with pytest.raises(ValueError, match="at least 16"):
        kernel.BlockSizes(block_rows=8)


def _leaf(key, din, dout, r, dropout=0.0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return lora.LoRA(base=(jax.random.normal(k1, (din, dout)) * din ** -0.5).astype(dtype),
                     a=jax.random.normal(k2, (din, r)) * din ** -0.5, b=jax.random.normal(k3, (r, dout)) * 0.3,
                     magnitude=None, dropout_key=None, scale=2.0, dropout=dropout)


def _mlp_params(d=32, f=128, r=8, dtype=jnp.float32, gate_dropout=0.0):
    ks = jax.random.split(jax.random.key(7), 3)
    return {"gate_proj": {"kernel": _leaf(ks[0], d, f, r, gate_dropout, dtype)},
            "up_proj": {"kernel": _leaf(ks[1], d, f, r, dtype=dtype)},
            "down_proj": {"kernel": _leaf(ks[2], f, d, r, dtype=dtype)}}


def _block_loss(params, x, dtype, act="silu", fused=True, dropout_key=None, residual=None):
    if dropout_key is not None:  # set inside: the differentiated params stay float arrays
        params = jax.tree.map(lambda w: w.replace(dropout_key=dropout_key) if isinstance(w, lora.LoRA) and w.dropout else w,
                              params, is_leaf=lambda w: isinstance(w, lora.LoRA))
    y = mlp_module.gated_mlp(x, params, act, dtype, fused=fused, residual=residual)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(y.shape[-1]))


def _pallas_names(fn, *args) -> list[str]:
    text = str(jax.make_jaxpr(lambda p, x: fn(p, x, *args[2:]))(*args[:2]))
    return [name for name in ("jaxtune_lora_activation_grad",) if name in text]


@pytest.mark.parametrize("mode", ["off", "interpret"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_block_matches_autodiff_of_the_projections(monkeypatch, mode, act):
    monkeypatch.setattr(lora_gated_down, "KERNELS", mode)
    params, x = _mlp_params(), jax.random.normal(jax.random.key(1), (2, 16, 32))
    grad = jax.value_and_grad(_block_loss, argnums=(0, 1))
    (got_loss, got), (want_loss, want) = grad(params, x, jnp.float32, act), grad(params, x, jnp.float32, act, False)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(a, b) < 1e-5
    # the kernel runs in the backward exactly when asked to
    names = _pallas_names(jax.grad(_block_loss), params, x, jnp.float32, act)
    assert names == ([] if mode == "off" else ["jaxtune_lora_activation_grad"])


def test_block_in_bf16_is_as_close_to_float32_as_autodiff(monkeypatch):
    """In bf16 both forms round differently; against float32 the fused one must not be worse."""
    monkeypatch.setattr(lora_gated_down, "KERNELS", "interpret")
    params, x = _mlp_params(), jax.random.normal(jax.random.key(1), (2, 16, 32))
    bf16 = jax.tree.map(lambda z: z.astype(jnp.bfloat16), params)
    grad = jax.grad(_block_loss, argnums=(0, 1))
    truth = jax.tree.leaves(grad(params, x, jnp.float32, "silu", False))
    fused = jax.tree.leaves(grad(bf16, x.astype(jnp.bfloat16), jnp.bfloat16))
    plain = jax.tree.leaves(grad(bf16, x.astype(jnp.bfloat16), jnp.bfloat16, "silu", False))
    for t, f_, p in zip(truth, fused, plain):
        err = lambda z: np.linalg.norm(np.asarray(z, np.float32) - np.asarray(t)) / np.linalg.norm(np.asarray(t))
        assert err(f_) <= 1.2 * err(p) + 1e-3, (err(f_), err(p))


def test_dropout_on_gate_and_frozen_down_gradient(monkeypatch):
    """Dropout on gate's adapter (the caller's business) and a differentiated down_proj base (the
    custom VJP's `dw`) give autodiff's gradients."""
    monkeypatch.setattr(lora_gated_down, "KERNELS", "interpret")
    params, key = _mlp_params(gate_dropout=0.3), jax.random.key(3)
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    grad = jax.grad(_block_loss)
    got, want = grad(params, x, jnp.float32, "silu", True, key), grad(params, x, jnp.float32, "silu", False, key)
    assert _rel(got["gate_proj"]["kernel"].a, grad(params, x, jnp.float32)["gate_proj"]["kernel"].a) > 1e-2
    down_base = lambda g: g["down_proj"]["kernel"].base
    assert float(jnp.max(jnp.abs(down_base(want)))) > 0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(a, b) < 1e-5


def test_takes_only_plain_lora_down_without_dropout(monkeypatch):
    monkeypatch.setattr(lora_gated_down, "KERNELS", "interpret")
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    uses_kernel = lambda p: bool(_pallas_names(jax.grad(_block_loss), p, x, jnp.float32, "silu", True,
                                               jax.random.key(0)))
    base = _mlp_params()
    assert uses_kernel(base)
    assert not uses_kernel({**base, "down_proj": {"kernel": base["down_proj"]["kernel"].replace(dropout=0.1)}})
    dora = base["down_proj"]["kernel"].replace(magnitude=jnp.ones((32,)))
    assert not uses_kernel({**base, "down_proj": {"kernel": dora}})
    assert not uses_kernel({**base, "down_proj": {"kernel": base["down_proj"]["kernel"], "bias": jnp.zeros((32,))}})
    assert not uses_kernel({**base, "down_proj": {"kernel": base["down_proj"]["kernel"].base}})
    # gate and up need no adapter of their own
    assert uses_kernel({**base, "gate_proj": {"kernel": base["gate_proj"]["kernel"].base}})


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (8 forced CPU devices in the suite)")
def test_sharded_block_matches_unsharded(monkeypatch):
    """The block over data × fsdp × tensor (the kernel per shard: tokens split over data and fsdp,
    the mlp dimension over tensor, each shard with its rows of A_down) gives the unsharded loss and
    gradients. (The whole model on the same mesh: test_lora.py's sharded tests.)"""
    monkeypatch.setattr(lora, "JOINT_GATE_UP", False)
    monkeypatch.setattr(lora_gated_down, "KERNELS", "interpret")
    params, x = _mlp_params(), jax.random.normal(jax.random.key(1), (4, 16, 32))
    text = _assert_sharded_block_matches_unsharded(params, x, {"data": 2, "fsdp": 2, "tensor": 2})
    assert "jaxtune_lora_activation_grad" in text


def _assert_sharded_block_matches_unsharded(params, x, mesh_sizes: dict) -> str:
    """The block's loss and gradients under activation sharding on a mesh of `mesh_sizes` equal the
    unsharded ones, the kernel running per shard (`shard_map` in the backward); returns that
    backward's jaxpr text."""
    from jaxtune.mesh import make_mesh
    from jaxtune.sharding import activation_sharding, merged_rules

    grad = jax.value_and_grad(_block_loss, argnums=(0, 1))
    devices = jax.devices()[:int(np.prod(list(mesh_sizes.values())))]
    with activation_sharding(make_mesh(mesh_sizes, devices), merged_rules()):
        text = str(jax.make_jaxpr(lambda p, x: jax.grad(_block_loss)(p, x, jnp.float32))(params, x))
        assert "shard_map" in text
        got_loss, got = jax.jit(grad, static_argnums=2)(params, x, jnp.float32)
    want_loss, want = jax.jit(grad, static_argnums=2)(params, x, jnp.float32)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(a, b) < 1e-5
    return text


def test_lowers_to_triton():
    """The kernel lowers to one Triton call for an H200, from this CPU, at the 1B and 8B shapes."""
    for n, f, r in [(8192, 8192, 16), (4096, 14336, 8)]:
        big, thin = jax.ShapeDtypeStruct((n, f), jnp.bfloat16), jax.ShapeDtypeStruct((n, r), jnp.bfloat16)
        hlo = lower_for_h200(lambda *z: kernel.activation_grad(*z, "silu"), big, big, big, thin,
                             jax.ShapeDtypeStruct((f, r), jnp.bfloat16))
        assert hlo.count("__gpu$xla.gpu.triton") == 1


# --- gate and up through one matmul (lora.JOINT_GATE_UP) ---------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_joint_kernel_matches_reference(dtype):
    """Gate and up side by side chunk by chunk (`[N, F/c, 2c]`): the kernel against its reference,
    and that reference against the two-array one on the same columns."""
    n, chunks, c, r = 48, 3, 32, 8
    ks = jax.random.split(jax.random.key(2), 4)
    gu = jax.random.normal(ks[0], (n, chunks, 2 * c), dtype) * 2
    dhb = jax.random.normal(ks[1], (n, chunks * c), dtype)
    dha = jax.random.normal(ks[2], (n, r), dtype)
    a = (jax.random.normal(ks[3], (chunks * c, r)) * 0.3).astype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for act in ACTIVATIONS:
        got = kernel.activation_grad_joint(gu, dhb, dha, a, act, interpret=True)
        want = kernel.activation_grad_joint_reference(gu, dhb, dha, a, act)
        assert got.dtype == dtype and got.shape == gu.shape and _rel(got, want) < tol, (act, _rel(got, want))
        dg, du = kernel.activation_grad_reference(gu[..., :c].reshape(n, -1), gu[..., c:].reshape(n, -1), dhb, dha, a, act)
        assert _rel(want[..., :c].reshape(n, -1), dg) == 0 and _rel(want[..., c:].reshape(n, -1), du) == 0
    assert kernel.supports_joint(n, chunks, c, dtype, "silu")
    assert not kernel.supports_joint(n, chunks, 48, dtype, "silu")  # not a power of two
    assert not kernel.supports_joint(n, chunks, 16, dtype, "silu")  # below the 32-column block
    with pytest.raises(ValueError, match="check `supports_joint` first"):
        kernel.activation_grad_joint(gu[:40], dhb[:40], dha[:40], a, "silu", interpret=True)


def _joint_kernel_traced(params, x, dtype=jnp.float32, dropout_key=None) -> bool:
    text = str(jax.make_jaxpr(lambda p, x: jax.grad(_block_loss)(p, x, dtype, "silu", True, dropout_key))(params, x))
    return "jaxtune_lora_activation_grad_joint" in text


@pytest.mark.parametrize("mode", ["off", "interpret"])
def test_joint_gate_up_matches_autodiff_of_the_projections(monkeypatch, mode):
    """With `JOINT_GATE_UP` the block's loss and every gradient equal autodiff's of the
    per-projection form, the activation's backward kernel (or its reference) on the joint array."""
    monkeypatch.setattr(lora, "JOINT_GATE_UP", True)
    monkeypatch.setattr(lora, "GATE_UP_CHUNK", 32)
    monkeypatch.setattr(lora_gated_down, "KERNELS", mode)
    params, x = _mlp_params(), jax.random.normal(jax.random.key(1), (2, 64, 32))  # 128 tokens >= 4 x 32 inputs
    grad = jax.value_and_grad(_block_loss, argnums=(0, 1))
    (got_loss, got), (want_loss, want) = grad(params, x, jnp.float32), grad(params, x, jnp.float32, "silu", False)
    # The loss sums 4096 float32 terms of either sign to ≈ -434: the order of the joint product's
    # sums moves it by ≈ 1e-6 relative on some CPUs (1.9e-6 on this session's), the gradients' bar.
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(a, b) < 1e-5
    text = str(jax.make_jaxpr(lambda p, x: jax.grad(_block_loss)(p, x, jnp.float32))(params, x))
    assert "2,64,4,64]" in text  # gate and up as one [B, T, F/c, 2c] product
    assert _joint_kernel_traced(params, x) == (mode == "interpret")


def test_joint_gate_up_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(lora, "JOINT_GATE_UP", True)
    monkeypatch.setattr(lora, "GATE_UP_CHUNK", 32)
    monkeypatch.setattr(lora_gated_down, "KERNELS", "interpret")
    params, x = _mlp_params(), jax.random.normal(jax.random.key(1), (2, 64, 32))
    assert _joint_kernel_traced(params, x)
    monkeypatch.setattr(lora, "JOINT_GATE_UP", False)
    assert not _joint_kernel_traced(params, x)  # off
    monkeypatch.setattr(lora, "JOINT_GATE_UP", True)
    assert not _joint_kernel_traced(params, x[:, :16])  # 32 tokens: the fused [x | xa] product does not pay
    assert not _joint_kernel_traced(_mlp_params(f=80), x)  # 80 columns: not whole chunks of 32
    assert not _joint_kernel_traced(_mlp_params(gate_dropout=0.2), x, dropout_key=jax.random.key(0))  # own masks
    assert not _joint_kernel_traced({**params, "up_proj": {"kernel": params["up_proj"]["kernel"].base}}, x)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (8 forced CPU devices in the suite)")
def test_joint_gate_up_only_where_its_chunks_split_as_the_mlp_dim(monkeypatch):
    from jaxtune.mesh import make_mesh
    from jaxtune.sharding import activation_sharding, merged_rules

    monkeypatch.setattr(lora, "JOINT_GATE_UP", True)
    monkeypatch.setattr(lora, "GATE_UP_CHUNK", 32)
    monkeypatch.setattr(lora_gated_down, "KERNELS", "interpret")
    with activation_sharding(make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4]), merged_rules()):
        x4 = jax.random.normal(jax.random.key(1), (2, 128, 32))  # 128 tokens per device
        assert _joint_kernel_traced(_mlp_params(f=128), x4)
        # 96 mlp columns split over 2 devices, but 3 chunks of 32 do not: the two projections
        assert not _joint_kernel_traced(_mlp_params(f=96), x4)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (8 forced CPU devices in the suite)")
def test_joint_gate_up_sharded_matches_unsharded(monkeypatch):
    """The block with gate and up as one product over data × tensor: the chunks split over tensor
    keep each gate column with its up column (the kernel per shard), loss and gradients as unsharded."""
    monkeypatch.setattr(lora, "JOINT_GATE_UP", True)
    monkeypatch.setattr(lora, "GATE_UP_CHUNK", 32)
    monkeypatch.setattr(lora_gated_down, "KERNELS", "interpret")
    params, x = _mlp_params(), jax.random.normal(jax.random.key(1), (4, 64, 32))  # 128 tokens per device
    text = _assert_sharded_block_matches_unsharded(params, x, {"data": 2, "tensor": 2})
    assert "jaxtune_lora_activation_grad_joint" in text  # the joint kernel, traced under the mesh


def test_joint_kernel_lowers_to_triton():
    """The joint kernel lowers to one Triton call for an H200, from this CPU, at the 1B shape."""
    n, f, r, c = 8192, 8192, 16, 128
    hlo = lower_for_h200(lambda *z: kernel.activation_grad_joint(*z, "silu"),
                         jax.ShapeDtypeStruct((n, f // c, 2 * c), jnp.bfloat16), jax.ShapeDtypeStruct((n, f), jnp.bfloat16),
                         jax.ShapeDtypeStruct((n, r), jnp.bfloat16), jax.ShapeDtypeStruct((f, r), jnp.bfloat16))
    assert hlo.count("__gpu$xla.gpu.triton") == 1

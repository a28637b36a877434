"""RMSNorm / residual add + RMSNorm kernels vs their plain-jnp references: values and grads.

On CPU the Pallas kernels run in interpret mode; on a GPU (`JAX_PLATFORMS=cuda pytest ...`) the
same tests run the compiled Triton kernels. Gradients are checked twice: against `jax.grad` of the
reference (what the model used before), and, tighter, against a float64 model of the exact
gradient of the reference's arithmetic (its casts to x's dtype included), which the kernel should
meet up to its own final rounding.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtune.kernels import rms_norm as rn
from jaxtune.kernels.rms_norm import (
    BlockSizes,
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    supports,
)

INTERPRET = jax.default_backend() == "cpu"
F32, BF16 = jnp.float32, jnp.bfloat16


def rel_err(a, b):
    """Relative L2 error of a kernel result against a reference (NaN/inf fail outright)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "NaN/inf in result"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(shape, dtype, scale_dtype=F32, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], shape, F32).astype(dtype)
    delta = (0.5 * jax.random.normal(k[1], shape, F32)).astype(dtype)
    scale = (1.0 + 0.2 * jax.random.normal(k[2], shape[-1:], F32)).astype(scale_dtype)
    # Loss weights: the cotangents of s (from its other uses) and of y.
    ws = jax.random.normal(k[3], shape, F32)
    wy = jax.random.normal(k[4], shape, F32)
    return h, delta, scale, ws, wy


def _loss(fn, ws, wy):
    """Scalar loss using both outputs of an add_rms_norm-like fn(h, delta, scale) -> (s, y)."""

    def loss(h, delta, scale):
        s, y = fn(h, delta, scale)
        return jnp.sum(s.astype(F32) * ws) + jnp.sum(y.astype(F32) * wy)

    return loss


def _mismatch(a, exact64, dtype):
    """Fraction of elements of `a` that differ from the float64 `exact64` rounded to `dtype`."""
    expected = np.asarray(exact64).astype(dtype)
    return float(np.mean(np.asarray(a) != expected))


def _exact_y(x, scale, eps):
    """float64 model of `rms_norm_reference` with its roundings: cast(n)·cast(scale), rounded."""
    x64 = np.asarray(x, np.float64)
    n = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return n.astype(x.dtype).astype(np.float64) * np.asarray(scale.astype(x.dtype), np.float64)


def _exact_grads(x, scale, dy, ds, eps):
    """float64 model of d/dx and d/dscale of `rms_norm_reference` (plus ds), given cotangents.

    y = cast(n)·cast(scale): the casts pass the gradient through, but the product dy·cast(scale)
    is rounded to x's dtype, and dscale multiplies by the rounded n."""
    dtype = x.dtype
    dn = np.asarray((dy.astype(F32) * scale.astype(dtype).astype(F32)).astype(dtype), np.float64)
    n_rounded = np.asarray(rms_norm_reference(x, jnp.ones(x.shape[-1:], dtype), eps), np.float64)
    x64 = np.asarray(x, np.float64)
    r = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    n = x64 * r
    dx = r * (dn - n * np.mean(dn * n, axis=-1, keepdims=True))
    if ds is not None:
        dx = dx + np.asarray(ds, np.float64)
    dy64 = np.asarray(dy, np.float64)
    dscale = (dy64 * n_rounded).reshape(-1, x.shape[-1]).sum(0)
    return dx, dscale


# (shape, block_rows, bwd_programs, eps, scale dtype). Default block_rows at D=128 is 32, at 256 16.
CASES = [
    pytest.param((64, 128), None, None, 1e-6, F32, id="rows-multiple"),
    pytest.param((37, 128), None, None, 1e-6, F32, id="rows-ragged"),
    # eps = 0: the masked rows of the last block would give 0·inf = NaN; it must not leak.
    pytest.param((37, 256), 8, 2, 0.0, F32, id="ragged-loop-eps0"),
    pytest.param((2, 9, 256), 4, 3, 1e-5, BF16, id="3d-ragged-bf16scale"),
    pytest.param((4, 8, 128), 4, 3, 1e-6, F32, id="3d-multiple-loop"),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,block_rows,programs,eps,scale_dtype", CASES)
def test_add_rms_norm(shape, block_rows, programs, eps, scale_dtype, dtype):
    h, delta, scale, ws, wy = _inputs(shape, dtype, scale_dtype)
    blocks = None if programs is None else BlockSizes(bwd_programs=programs)
    kern = lambda h, d, sc: add_rms_norm(h, d, sc, eps, interpret=INTERPRET, block_rows=block_rows,
                                         block_sizes=blocks)
    ref = lambda h, d, sc: add_rms_norm_reference(h, d, sc, eps)
    (s, y), (s_ref, y_ref) = kern(h, delta, scale), ref(h, delta, scale)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == shape
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))

    grad = lambda fn: jax.jit(jax.grad(_loss(fn, ws, wy), argnums=(0, 1, 2)))(h, delta, scale)
    dh, ddelta, dscale = grad(kern)
    dh_ref, _, dscale_ref = grad(ref)
    assert dh.dtype == dtype and dscale.dtype == scale_dtype
    np.testing.assert_array_equal(np.asarray(dh, np.float32), np.asarray(ddelta, np.float32))
    dh_exact, dscale_exact = _exact_grads(s_ref, scale, wy.astype(dtype), ws.astype(dtype), eps)

    if dtype == F32:
        assert rel_err(y, y_ref) < 1e-6
        assert rel_err(dh, dh_ref) < 1e-5
        assert rel_err(dscale, dscale_ref) < 1e-5
        assert rel_err(dh, dh_exact) < 1e-5
    else:
        # y: the same roundings as the reference (an f32 ulp in rsqrt may flip a bf16 rounding).
        assert rel_err(y, y_ref) < 4e-3
        # The reference rounds ds + cast(dx) twice and sums dscale in bf16; the kernel once / in f32.
        assert rel_err(dh, dh_ref) < 1e-2
        assert rel_err(dscale, dscale_ref) < 2e-2
        # Against the float64 model rounded once to bf16 the kernel is bit-exact (a rounding
        # left out, of n before the scale or of dy·scale, changes ~25% of the elements); 1% is
        # slack for an f32 ulp of rsqrt on the GPU.
        assert _mismatch(y, _exact_y(s_ref, scale, eps), dtype) < 0.01
        assert _mismatch(dh, dh_exact, dtype) < 0.01
    # dscale is summed in float32 from the exact products (tight in bf16 too, unless the scale is
    # stored in bf16); using the unrounded n instead of cast(n) would miss this by ~1e-3.
    assert rel_err(dscale, dscale_exact) < (4e-3 if scale_dtype == BF16 else 1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,block_rows,programs,eps,scale_dtype", CASES[1:4])
def test_rms_norm(shape, block_rows, programs, eps, scale_dtype, dtype):
    x, _, scale, _, wy = _inputs(shape, dtype, scale_dtype, seed=1)
    blocks = None if programs is None else BlockSizes(bwd_programs=programs)
    kern = lambda x, sc: rms_norm(x, sc, eps, interpret=INTERPRET, block_rows=block_rows, block_sizes=blocks)
    ref = lambda x, sc: rms_norm_reference(x, sc, eps)
    y, y_ref = kern(x, scale), ref(x, scale)
    assert y.dtype == dtype and y.shape == shape

    grad = lambda fn: jax.jit(jax.grad(lambda x, sc: jnp.sum(fn(x, sc).astype(F32) * wy), argnums=(0, 1)))(x, scale)
    (dx, dscale), (dx_ref, dscale_ref) = grad(kern), grad(ref)
    dx_exact, dscale_exact = _exact_grads(x, scale, wy.astype(dtype), None, eps)
    tol = 1e-5 if dtype == F32 else 4e-3
    assert rel_err(y, y_ref) < tol
    assert rel_err(dx, dx_ref) < tol  # no extra rounding here: matches jax.grad in bf16 too
    if dtype == F32:
        assert rel_err(dx, dx_exact) < 1e-5
    else:  # bit-exact against the float64 model, as in test_add_rms_norm
        assert _mismatch(y, _exact_y(x, scale, eps), dtype) < 0.01
        assert _mismatch(dx, dx_exact, dtype) < 0.01
    assert rel_err(dscale, dscale_ref) < (1e-5 if dtype == F32 else 2e-2)
    assert rel_err(dscale, dscale_exact) < (4e-3 if scale_dtype == BF16 else 1e-5)


# --------------------------------------------------------------------------------------------
# One pallas_call per direction; symbolic zeros drop unused inputs/outputs
# --------------------------------------------------------------------------------------------


def _pallas_eqns(jaxpr):
    """Every pallas_call equation in a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
            continue
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    found += _pallas_eqns(sub)
    return found


def test_one_pallas_call_each_way():
    h, delta, scale, ws, wy = _inputs((16, 128), BF16)
    kern = lambda h, d, sc: add_rms_norm(h, d, sc, 1e-6, interpret=INTERPRET)
    fwd = _pallas_eqns(jax.make_jaxpr(kern)(h, delta, scale))
    assert [len(e.outvars) for e in fwd] == [2]  # s and y from one kernel
    both = _pallas_eqns(jax.make_jaxpr(jax.grad(_loss(kern, ws, wy), argnums=(0, 1, 2)))(h, delta, scale))
    assert len(both) == 2  # the forward, and one backward writing dh and the dscale partials
    assert [len(e.invars) for e in both] == [3, 4] and [len(e.outvars) for e in both] == [2, 2]

    norm = lambda x, sc: rms_norm(x, sc, 1e-6, interpret=INTERPRET)
    assert len(_pallas_eqns(jax.make_jaxpr(norm)(h, scale))) == 1
    grad = jax.grad(lambda x, sc: jnp.sum(norm(x, sc).astype(F32) * wy), argnums=(0, 1))
    assert len(_pallas_eqns(jax.make_jaxpr(grad)(h, scale))) == 2


def test_frozen_scale_and_unused_outputs():
    """LoRA freezes the scale: no dscale partials. s unused: no ds read. y unused: no backward kernel."""
    h, delta, scale, ws, wy = _inputs((37, 128), F32)
    kern = lambda h, d, sc: add_rms_norm(h, d, sc, 1e-6, interpret=INTERPRET, block_rows=8)
    ref = lambda h, d, sc: add_rms_norm_reference(h, d, sc, 1e-6)

    # Scale frozen, delta not differentiated.
    g = lambda fn: jax.grad(lambda h: _loss(fn, ws, wy)(h, delta, scale))
    eqns = _pallas_eqns(jax.make_jaxpr(g(kern))(h))
    assert [len(e.outvars) for e in eqns] == [2, 1]  # backward writes dh only
    assert rel_err(g(kern)(h), g(ref)(h)) < 1e-5

    # Only y used: ds is a symbolic zero, the backward reads dy, s and the scale.
    only_y = lambda fn: jax.grad(lambda h, sc: jnp.sum(fn(h, delta, sc)[1] * wy), argnums=(0, 1))
    assert [len(e.invars) for e in _pallas_eqns(jax.make_jaxpr(only_y(kern))(h, scale))] == [3, 3]
    for a, b in zip(only_y(kern)(h, scale), only_y(ref)(h, scale)):
        assert rel_err(a, b) < 1e-5

    # Only s used: dy is a symbolic zero, dh = ds, dscale = 0, no backward kernel at all.
    only_s = lambda fn: jax.grad(lambda h, sc: jnp.sum(fn(h, delta, sc)[0] * ws), argnums=(0, 1))
    assert len(_pallas_eqns(jax.make_jaxpr(only_s(kern))(h, scale))) == 1
    dh, dscale = only_s(kern)(h, scale)
    np.testing.assert_array_equal(dh, ws)
    np.testing.assert_array_equal(dscale, np.zeros_like(scale))


def test_supports():
    assert supports((8, 128), BF16)
    assert supports((2, 3, 4096), F32)
    assert supports((5, 8192), jnp.float16)
    assert supports((1, 16), BF16)
    assert supports((0, 2048), BF16)  # no rows: handled (by the reference)
    assert not supports((8, 96), BF16)  # not a power of two
    assert not supports((8, 3000), BF16)
    assert not supports((8, 16384), BF16)  # the backward's block would not fit in registers
    assert not supports((8, 8), BF16)
    assert not supports((8, 128), jnp.int32)
    assert not supports((), BF16)


def test_rejects_unsupported():
    x = jnp.ones((4, 96), F32)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm(x, jnp.ones((96,)), 1e-6, interpret=INTERPRET)
    with pytest.raises(ValueError, match="scale must be"):
        rms_norm(jnp.ones((4, 128)), jnp.ones((64,)), 1e-6, interpret=INTERPRET)
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(jnp.ones((4, 128)), jnp.ones((4, 128), BF16), jnp.ones((128,)), 1e-6, interpret=INTERPRET)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_rows=3)


def test_default_blocks():
    """~4K elements per block (at least one row), as the module documents."""
    assert BlockSizes.get_default(128).block_rows == 32
    assert BlockSizes.get_default(2048).block_rows == 2
    assert BlockSizes.get_default(8192).block_rows == 1
    assert rn._bwd_programs(BlockSizes(bwd_programs=7), n_blocks=3) == 3

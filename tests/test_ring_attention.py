"""Ring attention on 8 CPU devices vs full attention (the flash kernel's jnp reference).

Inputs are made in natural token order; the zigzag cases permute q, k, v and segment ids with
`zigzag_permutation` before the ring and un-permute the output, so values and grads (dq, dk, dv)
compare directly with the reference on the whole sequence.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtune.kernels.flash_attention import BlockSizes, flash_attention_reference
from jaxtune.kernels.ring_attention import (
    ring_attention,
    zigzag_inverse_permutation,
    zigzag_permutation,
)

from jaxtune.mesh import make_mesh
from test_flash_attention import rel_err

INTERPRET = jax.default_backend() == "cpu"
# Smallest tiles: shard chunks here are 8..32 tokens long.
TINY = BlockSizes.tiles(16, 16)


def _inputs(seed, b, s, h, kh, d, n_seg):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.float32)
    seg = None
    if n_seg:  # packed: sorted ids, so segments are contiguous runs that cross shard borders
        seg = jnp.sort(jax.random.randint(ks[4], (b, s), 0, n_seg, dtype=jnp.int32), axis=1)
    return q, k, v, do, seg


SEQ2_DATA2_TENSOR2 = {"sequence": 2, "data": 2, "tensor": 2}  # heads (H=4, KH=2) split too
SEQ4_DATA2 = {"sequence": 4, "data": 2}
# (mesh, layout, S, segments (0: none), causal, window)
CASES = {
    "seq2-data2-tensor2-contiguous": (SEQ2_DATA2_TENSOR2, "contiguous", 64, 3, True, None),
    "seq2-data2-tensor2-zigzag": (SEQ2_DATA2_TENSOR2, "zigzag", 64, 3, True, None),
    "seq4-data2-contiguous": (SEQ4_DATA2, "contiguous", 64, 3, True, None),
    "seq4-data2-zigzag": (SEQ4_DATA2, "zigzag", 64, 3, True, None),
    "seq8-contiguous": ({"sequence": 8}, "contiguous", 128, 4, True, None),
    "seq8-zigzag": ({"sequence": 8}, "zigzag", 128, 4, True, None),
    "seq4-data2-zigzag-bidirectional": (SEQ4_DATA2, "zigzag", 64, 0, False, None),
    "seq4-fsdp2-zigzag-window": ({"sequence": 4, "fsdp": 2}, "zigzag", 64, 3, True, 20),
    "seq1-data8-zigzag": ({"sequence": 1, "data": 8}, "zigzag", 32, 2, True, None),
    "seq2-data4-contiguous-window": ({"sequence": 2, "data": 4}, "contiguous", 64, 0, True, 24),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_full_attention(case):
    mesh_shape, layout, s, n_seg, causal, window = CASES[case]
    mesh = make_mesh(mesh_shape)
    n = mesh.shape["sequence"]
    b = max(2, mesh.shape["data"] * mesh.shape["fsdp"])
    q, k, v, do, seg = _inputs(zlib.crc32(case.encode()) % 1000, b, s, 4, 2, 16, n_seg)
    if seg is not None and n > 1:  # the point of the test: a segment spans a shard border
        shard = np.asarray(seg).reshape(b, n, s // n)
        assert (shard[:, 1:, 0] == shard[:, :-1, -1]).any()

    if layout == "zigzag":
        perm, inv = zigzag_permutation(s, n), zigzag_inverse_permutation(s, n)
    else:
        perm = inv = np.arange(s)
    seg_p = None if seg is None else seg[:, perm]

    def ring(q, k, v):
        out = ring_attention(
            q[:, perm],
            k[:, perm],
            v[:, perm],
            seg_p,
            mesh=mesh,
            layout=layout,
            causal=causal,
            window=window,
            interpret=INTERPRET,
            block_sizes=TINY,
        )
        return out[:, inv]

    def full(q, k, v):
        return flash_attention_reference(q, k, v, segment_ids=seg, causal=causal, window=window)

    @jax.jit
    def value_and_grads(q, k, v):
        out, vjp = jax.vjp(ring, q, k, v)
        return out, vjp(do)

    @jax.jit  # the reference on its own, unsharded; an eager vjp compiles op by op (seconds on CPU)
    def reference(q, k, v):
        out, vjp = jax.vjp(full, q, k, v)
        return out, vjp(do)

    o1, g1 = value_and_grads(q, k, v)
    o2, g2 = reference(q, k, v)
    assert rel_err(o1, o2) <= 1e-5, ("out", rel_err(o1, o2))
    for name, a, r in zip(("dq", "dk", "dv"), g1, g2):
        assert a.shape == r.shape
        assert rel_err(a, r) <= 1e-5, (name, rel_err(a, r))


def test_bf16_zigzag_keeps_dtype_and_sharding():
    """bf16 in, bf16 out and grads, sharded like q; close to fp32 attention on the same inputs."""
    mesh = make_mesh(SEQ4_DATA2)
    s, n = 64, 4
    q, k, v, do, seg = _inputs(3, 2, s, 4, 2, 16, 3)
    perm = zigzag_permutation(s, n)
    q, k, v, do, seg = (x[:, perm] for x in (q, k, v, do, seg))  # zigzag order throughout
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    spec = jax.sharding.PartitionSpec("data", "sequence", None, None)
    qb, kb, vb = (jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (qb, kb, vb))

    @jax.jit
    def value_and_grads(q, k, v):
        ring = lambda q, k, v: ring_attention(
            q, k, v, seg, mesh=mesh, interpret=INTERPRET, block_sizes=TINY
        )
        out, vjp = jax.vjp(ring, q, k, v)
        return out, vjp(do.astype(jnp.bfloat16))

    o1, g1 = value_and_grads(qb, kb, vb)
    assert o1.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g1)
    assert o1.sharding.is_equivalent_to(qb.sharding, o1.ndim)
    # fp32 reference in natural order from the same (rounded) inputs
    inv = zigzag_inverse_permutation(s, n)
    nat = [x.astype(jnp.float32)[:, inv] for x in (qb, kb, vb)]
    full = lambda q, k, v: flash_attention_reference(q, k, v, segment_ids=seg[:, inv])

    @jax.jit  # one program, not an op-by-op eager vjp
    def reference(q, k, v, do):
        out, vjp = jax.vjp(full, q, k, v)
        return out, vjp(do)

    o2, g2 = reference(*nat, do[:, inv])
    assert rel_err(o1[:, inv], o2) < 1e-2
    for a, r in zip(g1, g2):
        assert rel_err(a[:, inv], r) < 2e-2


def test_zigzag_permutation_layout():
    perm = zigzag_permutation(
        16, 2
    )  # 4 chunks of 4: device 0 gets chunks 0 and 3, device 1 gets 1, 2
    np.testing.assert_array_equal(perm, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    for s, n in ((64, 4), (128, 8), (6, 1)):
        perm, inv = zigzag_permutation(s, n), zigzag_inverse_permutation(s, n)
        np.testing.assert_array_equal(np.arange(s)[perm][inv], np.arange(s))
        np.testing.assert_array_equal(np.sort(perm), np.arange(s))
    with pytest.raises(ValueError, match="divisible by 2"):
        zigzag_permutation(12, 4)


def test_shape_errors():
    mesh = make_mesh({"sequence": 4, "data": 2})
    q = jnp.zeros((2, 20, 4, 16))  # 20 splits into 4 shards, not into 8 zigzag chunks
    k = jnp.zeros((2, 20, 2, 16))
    with pytest.raises(ValueError, match="S % 8"):
        ring_attention(q, k, k, mesh=mesh, layout="zigzag", interpret=INTERPRET)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, k, k, mesh=mesh, layout="striped", interpret=INTERPRET)
    with pytest.raises(ValueError, match="batch 3"):
        ring_attention(
            jnp.zeros((3, 32, 4, 16)),
            jnp.zeros((3, 32, 2, 16)),
            jnp.zeros((3, 32, 2, 16)),
            mesh=mesh,
            layout="contiguous",
            interpret=INTERPRET,
        )

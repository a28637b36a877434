"""Flash attention kernel vs its plain-jnp reference: values, lse and grads (dq, dk, dv).

On CPU the Pallas kernels run in interpret mode; on a GPU (`JAX_PLATFORMS=cuda pytest ...`) the
same tests run the compiled Triton kernels.
"""

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels import flash_attention as fa_mod
from jaxtune.kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference

INTERPRET = jax.default_backend() == "cpu"

# Small tiles so that a short sequence still spans several blocks (exercises the schedule,
# the causal split and the online softmax across blocks).
SMALL = BlockSizes.tiles(32, 16)
TALL = BlockSizes.tiles(16, 32)
GROUP_LOOP = dataclasses.replace(SMALL, dkv_per_query_head=False)  # GQA dK/dV: one program loops over the group
BLOCKS_FASTEST = dataclasses.replace(SMALL, bwd_heads_fastest=False)  # backward grids: blocks, not heads, fastest
HEADS_FASTEST = dataclasses.replace(TALL, fwd_heads_fastest=True)  # forward grid too: heads fastest


def rel_err(a, b):
    """Relative L2 error of a kernel result against a reference (NaN/inf fail outright)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "NaN/inf in result"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _segments(key, b, s, kind, n):
    if kind == "none":
        return None
    ids = jax.random.randint(key, (b, s), 0, n, dtype=jnp.int32)
    return jnp.sort(ids, axis=1) if kind == "packed" else ids


def _value_and_grads(fn, q, k, v, do, w, **kw):
    """out, lse and d/d(q, k, v) of sum(out·do) + sum(lse·w) (lse rows that are -inf excluded).

    Jitted as one program: eager autodiff re-traces the kernel's custom_vjp on every call and
    runs the reference op by op, each op compiled on its own (seconds per call on CPU). Array
    keywords (segment ids, traced windows) stay traced inputs, as in the model.
    """
    arrays = {name: x for name, x in kw.items() if isinstance(x, jax.Array)}
    static = {name: x for name, x in kw.items() if name not in arrays}

    @jax.jit
    def run(q, k, v, do, w, arrays):
        def loss(q, k, v):
            o, lse = fn(q, k, v, return_lse=True, **static, **arrays)
            lse_f = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(lse_f * w), (o, lse)

        (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return o, lse, grads

    return run(q, k, v, do, w, arrays)


def _inputs(seed, b, sq, skv, h, kh, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, sq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, skv, kh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, skv, kh, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, sq, h, d), jnp.float32)
    w = jax.random.normal(ks[4], (b, h, sq), jnp.float32)
    return q, k, v, do, w


def _check_against_reference(q, k, v, do, w, tol, **kw):
    blocks = kw.pop("block_sizes")
    o1, l1, g1 = _value_and_grads(
        flash_attention, q, k, v, do, w, block_sizes=blocks, interpret=INTERPRET, **kw
    )
    o2, l2, g2 = _value_and_grads(flash_attention_reference, q, k, v, do, w, **kw)
    empty = np.isneginf(np.asarray(l2))
    np.testing.assert_array_equal(np.isneginf(np.asarray(l1)), empty)
    assert rel_err(o1, o2) <= tol, ("out", rel_err(o1, o2))
    assert rel_err(np.where(empty, 0, l1), np.where(empty, 0, l2)) <= tol
    for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


# (B, Sq, Skv, H, KH, D, causal, segments, n_segments, blocks)
SWEEP = {
    "mha-causal-tiny-default-blocks": (3, 16, 16, 2, 2, 64, True, "none", 0, None),
    "gqa2-causal-odd-len": (2, 50, 50, 4, 2, 64, True, "none", 0, SMALL),
    "mqa-full-d128": (2, 64, 64, 4, 1, 128, False, "none", 0, SMALL),
    # two long segments: most block pairs lie inside one segment and take the unmasked loop
    "causal-packed-long-segments-d128": (1, 96, 96, 2, 2, 128, True, "packed", 2, SMALL),
    "causal-many-segments-tall-tiles-heads-fastest": (2, 77, 77, 4, 2, 64, True, "packed", 12, HEADS_FASTEST),
    "gqa3-full-unsorted-segments": (1, 33, 33, 6, 2, 64, False, "random", 3, SMALL),
    "gqa4-causal-backward-blocks-fastest": (1, 96, 96, 8, 2, 64, True, "none", 0, BLOCKS_FASTEST),
    "gqa4-causal-packed-dkv-group-loop": (2, 50, 50, 8, 2, 64, True, "packed", 4, GROUP_LOOP),
    "mqa-full-dkv-group-loop": (1, 40, 72, 4, 1, 32, False, "none", 0, GROUP_LOOP),
    "sq-ne-skv-d40": (2, 40, 72, 4, 2, 40, False, "none", 0, SMALL),
}


@pytest.mark.parametrize("case", list(SWEEP), ids=list(SWEEP))
def test_matches_reference_f32(case):
    b, sq, skv, h, kh, d, causal, seg_kind, n_seg, blocks = SWEEP[case]
    q, k, v, do, w = _inputs(zlib.crc32(case.encode()) % 1000, b, sq, skv, h, kh, d, jnp.float32)
    seg = _segments(jax.random.key(7), b, sq, seg_kind, n_seg)
    _check_against_reference(
        q, k, v, do, w, 1e-5, causal=causal, segment_ids=seg, block_sizes=blocks
    )


@pytest.mark.slow
def test_default_blocks_padded_packed_f32():
    q, k, v, do, w = _inputs(3, 1, 200, 200, 4, 4, 64, jnp.float32)
    seg = _segments(jax.random.key(1), 1, 200, "packed", 3)
    _check_against_reference(q, k, v, do, w, 1e-5, causal=True, segment_ids=seg, block_sizes=None)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    q, k, v, do, w = _inputs(5, 2, 64, 64, 4, 2, 64, dtype)
    seg = _segments(jax.random.key(2), 2, 64, "packed", 3)
    kw = dict(causal=True, segment_ids=seg)
    o1, l1, g1 = _value_and_grads(
        flash_attention, q, k, v, do, w, block_sizes=SMALL, interpret=INTERPRET, **kw
    )
    # Reference in fp32 from the same (rounded) inputs.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    o2, l2, g2 = _value_and_grads(flash_attention_reference, q32, k32, v32, do, w, **kw)
    assert o1.dtype == dtype and all(g.dtype == dtype for g in g1)
    assert rel_err(o1, o2) < 1e-2
    assert rel_err(l1, l2) < 1e-3
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 2e-2


def _merge(parts):
    """Log-sum-exp merge of per-kv-block (out, lse) pairs, as ring attention does it; rows empty
    in every block stay 0 (jnp.logaddexp(-inf, -inf) would have a NaN gradient)."""
    lse_all = jnp.stack([l for _, l in parts])  # [n, B, H, S]
    empty = jnp.isneginf(lse_all)
    m = jnp.max(lse_all, axis=0)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    wgt = jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, 0.0, lse_all) - m))
    tot = jnp.sum(wgt, axis=0)
    wgt = wgt / jnp.where(tot == 0.0, 1.0, tot)
    return sum(o * wi.transpose(0, 2, 1)[..., None] for (o, _), wi in zip(parts, wgt))


def test_ring_blocks_merge_to_full_attention():
    """Causal attention over 2 chunks computed block pair by block pair (offsets + kv segment ids),
    merged by log-sum-exp, equals full attention in value and gradient (through the lse)."""
    b, s, h, kh, d, n = 1, 64, 4, 2, 64, 2
    c = s // n
    q, k, v, do, _ = _inputs(11, b, s, s, h, kh, d, jnp.float32)
    seg = _segments(jax.random.key(4), b, s, "packed", 2)

    @jax.jit
    def ring(q, k, v, offsets):
        outs = []
        for qi in range(n):
            parts = []
            for kj in range(n):  # includes the fully masked future blocks: they must merge as zeros
                sl_q, sl_k = slice(qi * c, (qi + 1) * c), slice(kj * c, (kj + 1) * c)
                parts.append(
                    flash_attention(
                        q[:, sl_q],
                        k[:, sl_k],
                        v[:, sl_k],
                        segment_ids=seg[:, sl_q],
                        kv_segment_ids=seg[:, sl_k],
                        q_offset=offsets[qi],
                        kv_offset=offsets[kj],
                        causal=True,
                        return_lse=True,
                        block_sizes=SMALL,
                        interpret=INTERPRET,
                    )
                )
            outs.append(_merge(parts))
        return jnp.concatenate(outs, axis=1)

    offsets = jnp.arange(n, dtype=jnp.int32) * c  # traced, as under shard_map
    full = lambda q, k, v: flash_attention_reference(q, k, v, segment_ids=seg, causal=True)

    @jax.jit  # one program: an eager reference vjp compiles op by op (seconds on CPU)
    def value_and_grads(q, k, v, do, offsets):
        o1, vjp1 = jax.vjp(lambda q, k, v: ring(q, k, v, offsets), q, k, v)
        o2, vjp2 = jax.vjp(full, q, k, v)
        return o1, vjp1(do), o2, vjp2(do)

    o1, g1, o2, g2 = value_and_grads(q, k, v, do, offsets)
    assert rel_err(o1, o2) <= 1e-5
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-5


def test_fully_masked_rows_give_zero_and_neg_inf_lse():
    q, k, v, do, w = _inputs(13, 2, 32, 32, 2, 2, 64, jnp.float32)

    def check(**kw):
        arrays = {name: x for name, x in kw.items() if isinstance(x, jax.Array)}
        static = {name: x for name, x in kw.items() if name not in arrays}

        @jax.jit  # one program, not an eager re-trace of the custom_vjp (see _value_and_grads)
        def run(q, k, v, do, w, arrays):
            (o, lse), vjp = jax.vjp(
                lambda q, k, v: flash_attention(
                    q, k, v, return_lse=True, block_sizes=SMALL, interpret=INTERPRET, **static, **arrays
                ),
                q,
                k,
                v,
            )
            return o, lse, vjp((do, w))

        o, lse, grads = run(q, k, v, do, w, arrays)
        assert np.all(np.asarray(o) == 0.0)
        assert np.all(np.isneginf(np.asarray(lse)))
        for g in grads:
            assert np.all(np.asarray(g) == 0.0)

    # kv block entirely in the future of the query block (a ring step past the diagonal).
    check(causal=True, q_offset=0, kv_offset=32)
    # no key shares the query's segment.
    check(
        causal=False,
        segment_ids=jnp.full((2, 32), 5, jnp.int32),
        kv_segment_ids=jnp.arange(64, dtype=jnp.int32).reshape(2, 32) % 4,
    )


def test_some_rows_empty_match_reference():
    """Rows 0..6 see no key (the kv block starts 7 positions later): they are 0, the rest exact."""
    q, k, v, do, w = _inputs(17, 1, 48, 48, 2, 1, 64, jnp.float32)
    _check_against_reference(
        q, k, v, do, w, 1e-5, causal=True, q_offset=100, kv_offset=107, block_sizes=SMALL
    )


def _sched(causal=False, window=None, seg=None, rows_are_q=True):
    flags = fa_mod._Flags(causal=causal, segmented=seg is not None, windowed=window is not None)
    win = jnp.int32(2**31 - 1 if window is None else window)
    return np.asarray(
        fa_mod._schedule(
            batch=1,
            sq=128,
            skv=128,
            block_q=32,
            block_kv=32,
            delta=jnp.int32(0),
            window=win,
            flags=flags,
            q_seg=seg,
            kv_seg=seg,
            rows_are_q=rows_are_q,
        )
    )[0, :, :4]


def test_schedule_skips_masked_blocks():
    """Loop bounds, not only masks, drop the blocks that causal/window/segment masking empties;
    rows are (lo, full_lo, full_hi, hi): [full_lo, full_hi) runs without masks."""
    # forward, causal: query block i sees kv blocks [0, i] and only the diagonal needs the mask.
    np.testing.assert_array_equal(
        _sched(causal=True), [[0, 1, 1, 1], [0, 0, 1, 2], [0, 0, 2, 3], [0, 0, 3, 4]]
    )
    # dK/dV, causal: kv block j is seen by query blocks [j, 4), the diagonal one masked.
    np.testing.assert_array_equal(
        _sched(causal=True, rows_are_q=False),
        [[0, 1, 4, 4], [1, 2, 4, 4], [2, 3, 4, 4], [3, 4, 4, 4]],
    )
    # causal + window 70: query block 3 (96..127) skips kv block... none, masks 0-1 and 3.
    np.testing.assert_array_equal(_sched(causal=True, window=70)[3], [0, 2, 3, 4])
    # causal + window 40: kv block 0 is out of reach of query block 3; nothing is fully visible.
    np.testing.assert_array_equal(_sched(causal=True, window=40)[3], [1, 4, 4, 4])
    # packed [0, 40) + [40, 128), not causal: block-uniform pairs run unmasked, others are skipped.
    seg = jnp.where(jnp.arange(128) < 40, 0, 1)[None].astype(jnp.int32)
    np.testing.assert_array_equal(
        _sched(seg=seg), [[0, 0, 1, 2], [0, 4, 4, 4], [1, 2, 4, 4], [1, 2, 4, 4]]
    )
    # unsorted ids 0 | 0,1 | 0 | 2: query block 0 skips kv block 3; its full pairs (kv 0 and 2)
    # are not one run around the mixed kv block 1, so its whole range is masked.
    seg = jnp.asarray([[0] * 32 + [0] * 16 + [1] * 16 + [0] * 32 + [2] * 32], jnp.int32)
    np.testing.assert_array_equal(_sched(seg=seg)[0], [0, 3, 3, 3])


def test_sliding_window_traced():
    """Sliding window passed as a traced scalar (per-layer windows under scan), GQA, odd length;
    one compiled function serves every window, including <= 0 (= no window, as in the model)."""
    q, k, v, do, w = _inputs(21, 1, 80, 80, 4, 2, 64, jnp.float32)
    run = jax.jit(
        lambda win: _value_and_grads(
            flash_attention,
            q,
            k,
            v,
            do,
            w,
            causal=True,
            window=win,
            block_sizes=SMALL,
            interpret=INTERPRET,
        )
    )
    for window in (1, 20, 50, 0):
        o1, l1, g1 = run(jnp.int32(window))
        o2, l2, g2 = _value_and_grads(  # the window traced here too: one compiled reference
            flash_attention_reference, q, k, v, do, w, causal=True, window=jnp.int32(window)
        )
        for a, b in zip((o1, l1, *g1), (o2, l2, *g2)):
            assert rel_err(a, b) <= 1e-5, window


@pytest.mark.parametrize("bad", ["rank", "kv_heads", "head_dim", "segments", "dtype"])
def test_shape_errors_are_clear(bad):
    q = jnp.zeros((2, 16, 4, 64), jnp.float32)
    k = jnp.zeros((2, 16, 2, 64), jnp.float32)
    seg = None
    if bad == "rank":
        q = q[0]
    elif bad == "kv_heads":
        k = jnp.zeros((2, 16, 3, 64), jnp.float32)
    elif bad == "head_dim":
        k = jnp.zeros((2, 16, 2, 32), jnp.float32)
    elif bad == "segments":
        seg = jnp.zeros((2, 15), jnp.int32)
    elif bad == "dtype":
        k = k.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"shape=|dtype="):
        flash_attention(q, k, k if bad != "dtype" else k, segment_ids=seg, interpret=INTERPRET)


@pytest.mark.parametrize("field,value", [("block_q", 48), ("block_kv_dkv", 8), ("forward", "cuda")])
def test_block_size_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(f"BlockSizes.{field}={value!r}")):
        BlockSizes(**{field: value})


def test_exp2_choice():
    # Compiled 16-bit kernels use the one-instruction ex2.approx (RESULTS.md: 3-5% fwd+bwd on an
    # H200); fp32 inputs keep the exact path, and interpret mode cannot run inline PTX.
    flags = fa_mod._Flags(causal=True, segmented=False, windowed=False)
    compiled = fa_mod._Static(sm_scale=1.0, flags=flags, blocks=BlockSizes(), interpret=False)
    assert fa_mod._exp2_for(compiled, jnp.bfloat16) is fa_mod._ex2_approx
    assert fa_mod._exp2_for(compiled, jnp.float16) is fa_mod._ex2_approx
    assert fa_mod._exp2_for(compiled, jnp.float32) is jnp.exp2
    assert fa_mod._exp2_for(dataclasses.replace(compiled, interpret=True), jnp.bfloat16) is jnp.exp2


def _jaxprs(jaxpr):
    """`jaxpr` and every jaxpr nested in its equations' params."""
    yield jaxpr
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _jaxprs(sub)


def test_backward_takes_d_from_the_dq_kernel():
    """FlashAttention-2's D = rowsum(O∘dO) comes out of the dQ kernel (which loads dO anyway) and
    goes into the dK/dV kernel, rather than from a pass of its own over O and dO before them
    (0.5 ms of the 1B LoRA step on an H200). Its values (with an lse cotangent, and rows that see
    no key) are checked through the gradients against the reference above."""
    q, k, v, do, _ = _inputs(3, 1, 64, 64, 4, 2, 64, jnp.float32)

    def grads(q, k, v, do):
        attend = lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=SMALL, interpret=INTERPRET)
        return jax.vjp(attend, q, k, v)[1](do.astype(q.dtype))

    jaxpr = jax.make_jaxpr(grads)(q, k, v, do).jaxpr
    for body in _jaxprs(jaxpr):
        calls = {e.params["name"]: e for e in body.eqns if e.primitive.name == "pallas_call"}
        if "jaxtune_flash_bwd_dq" in calls:
            break
    else:
        raise AssertionError("no dQ kernel in the backward")
    dq_call, dkv_call = calls["jaxtune_flash_bwd_dq"], calls["jaxtune_flash_bwd_dkv"]
    d = dq_call.outvars[1]
    assert (d.aval.shape, d.aval.dtype) == ((1, 4, 64), jnp.float32)
    # D reaches the dK/dV kernel (through reshapes to its [B, KH, G, S] view), and nothing in the
    # backward multiplies two q-shaped arrays (O∘dO) outside the kernels.
    reached = {d}
    for e in body.eqns[body.eqns.index(dq_call) + 1:body.eqns.index(dkv_call)]:
        if e.primitive.name == "reshape" and e.invars[0] in reached:
            reached.add(e.outvars[0])
    assert reached & set(dkv_call.invars)
    products = [e for b in _jaxprs(jaxpr) for e in b.eqns if e.primitive.name == "mul"
                and all(getattr(x.aval, "shape", ())[-3:] == q.shape[-3:] for x in e.invars)]
    assert not products, products

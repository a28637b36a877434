"""Logits of `load_pretrained(...)` vs transformers' PyTorch models on tiny random checkpoints.

Relative error is max|ours - theirs| / max|theirs| over the whole logits tensor.
"""

import numpy as np
import pytest

import jaxtune

torch = pytest.importorskip("torch")
import tiny_hf  # noqa: E402

pytestmark = pytest.mark.torch


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(0)
    return rng.integers(0, tiny_hf.BASE["vocab_size"], size=(3, 13))  # odd length, batch > 1


@pytest.mark.parametrize("case", sorted(tiny_hf.CASES))
def test_logits_match_transformers_float32(case, ids, tmp_path):
    torch_model = tiny_hf.save_model(case, tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path), dtype="float32")
    err = rel_err(model(ids), tiny_hf.torch_logits(torch_model, ids))
    assert err <= 1e-5, f"{case}: max relative error {err:.2e}"


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_logits_bfloat16_within_documented_tolerance(case, ids, tmp_path):
    # bf16 has an 8-bit mantissa; over 3 layers the logits drift by about 1e-2 of their scale.
    # We require our bf16 run to be as close to the float32 truth as PyTorch's own bf16 run
    # is (with a 1.5x margin for different rounding order), and under 3e-2 in any case.
    torch_model = tiny_hf.save_model(case, tmp_path)
    truth = tiny_hf.torch_logits(torch_model, ids)
    ours = jaxtune.load_pretrained(str(tmp_path), dtype="bfloat16")
    theirs_err = rel_err(tiny_hf.torch_logits(torch_model.to(torch.bfloat16), ids), truth)
    ours_err = rel_err(ours(ids), truth)
    assert ours_err <= max(1.5 * theirs_err, 1e-3) and ours_err <= 3e-2, (ours_err, theirs_err)


@pytest.mark.parametrize("case", ["llama", "mistral-window", "qwen3"])
def test_packed_row_equals_sequences_run_alone(case, tmp_path):
    tiny_hf.save_model(case, tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 97, size=7), rng.integers(0, 97, size=9)
    packed = np.concatenate([a, b])[None]
    segment_ids = np.array([[1] * 7 + [2] * 9])
    positions = np.array([list(range(7)) + list(range(9))])
    logits = np.asarray(model(packed, segment_ids=segment_ids, positions=positions))[0]
    alone_a = np.asarray(model(a[None]))[0]
    alone_b = np.asarray(model(b[None]))[0]
    np.testing.assert_allclose(logits[:7], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[7:], alone_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["mistral-window", "qwen2-window"])
def test_pallas_attention_backend_matches_xla_on_packed_rows(case, tmp_path):
    # The model with our flash kernel (interpret mode on CPU) gives the XLA path's logits on packed
    # rows with per-layer sliding windows.
    tiny_hf.save_model(case, tmp_path)
    xla = jaxtune.load_pretrained(str(tmp_path))
    pallas = jaxtune.load_pretrained(str(tmp_path), attention="pallas")
    ids = np.arange(16)[None] % 97
    seg = np.array([[1] * 9 + [2] * 7])
    pos = np.array([list(range(9)) + list(range(7))])
    np.testing.assert_allclose(np.asarray(pallas(ids, seg, pos)), np.asarray(xla(ids, seg, pos)), rtol=1e-5, atol=1e-5)

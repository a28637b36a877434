"""Sample packing: whole sequences only, labels aligned, efficient, and the same logits as unpacked."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_fixtures import ALPACA_ROWS, data_config, write_jsonl

from jaxtune.data import IGNORE_INDEX, TokenizedRows, build_examples, prepare_datasets
from jaxtune.data.packing import efficiency, pack
from jaxtune.data.rows import RowsBuilder


def random_rows(lengths, vocab=64, seed=0) -> TokenizedRows:
    """Rows of random tokens; each row's first third is masked, like a prompt."""
    rng = np.random.default_rng(seed)
    builder = RowsBuilder()
    for length in lengths:
        ids = rng.integers(1, vocab, size=length).astype(np.int32)
        labels = ids.copy()
        labels[: length // 3] = IGNORE_INDEX
        builder.add(ids, labels)
    return builder.build()


def alpaca_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token lengths like Alpaca's under a Llama tokenizer: median ~110, a long tail to ~1k."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(110), 0.6, size=n), 20, 1500).astype(np.int64)


def test_every_sequence_placed_once_and_whole():
    lengths = np.random.default_rng(1).integers(1, 300, size=2000)
    grouping = pack(lengths, 512)
    assert sorted(grouping.group_rows.tolist()) == list(range(len(lengths)))
    per_group = [int(lengths[grouping.rows_of(g)].sum()) for g in range(len(grouping))]
    assert max(per_group) <= 512
    # Best fit decreasing never leaves two groups that could have been one.
    assert sum(sorted(per_group)[:2]) > 512


def test_packing_is_deterministic():
    lengths = alpaca_like_lengths(3000)
    a, b = pack(lengths, 2048), pack(lengths, 2048)
    assert np.array_equal(a.group_offsets, b.group_offsets) and np.array_equal(a.group_rows, b.group_rows)


@pytest.mark.parametrize("sequence_len", [1024, 2048, 4096])
def test_efficiency_on_alpaca_like_lengths_is_at_least_95_percent(sequence_len):
    lengths = alpaca_like_lengths(20_000)
    lengths = lengths[lengths <= sequence_len]  # longer rows were dropped by the length rule
    grouping = pack(lengths, sequence_len)
    assert efficiency(lengths, grouping, sequence_len) >= 0.95


def test_sequence_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="cannot fit"):
        pack(np.array([10, 600]), 512)


def test_packed_example_layout_labels_aligned_positions_restart():
    rows = random_rows([7, 3, 12, 5, 9, 4], seed=2)
    examples = build_examples(rows, sequence_len=16, sample_packing=True, pad_id=0)
    seen = []
    for g in range(len(examples)):
        ex = examples[g]
        assert {k: v.shape for k, v in ex.items()} == {k: (16,) for k in ex}
        assert all(v.dtype == np.int32 for v in ex.values())
        segments = ex["segment_ids"]
        n = int(segments.max())
        assert list(np.unique(segments[segments > 0])) == list(range(1, n + 1))
        used = int(np.count_nonzero(segments))
        assert np.all(segments[:used] > 0) and np.all(segments[used:] == 0)  # padding only at the end
        assert np.all(ex["labels"][used:] == IGNORE_INDEX) and np.all(ex["positions"][used:] == 0)
        for s in range(1, n + 1):
            where = np.flatnonzero(segments == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert np.array_equal(ex["positions"][where], np.arange(len(where)))
            ids, labels = ex["input_ids"][where], ex["labels"][where]
            matches = [i for i in range(len(rows)) if np.array_equal(rows.row(i)[0], ids)]
            assert len(matches) == 1, "a packed sequence is not exactly one whole row"
            assert np.array_equal(rows.row(matches[0])[1], labels)  # labels moved with their tokens
            seen.append(matches[0])
    assert sorted(seen) == list(range(len(rows)))


def test_unpacked_examples_hold_one_row_each():
    rows = random_rows([7, 3, 12])
    examples = build_examples(rows, sequence_len=16, sample_packing=False, pad_id=5)
    assert len(examples) == 3
    ex = examples[1]
    assert ex["input_ids"][:3].tolist() == rows.row(1)[0].tolist()
    assert ex["input_ids"][3:].tolist() == [5] * 13
    assert ex["segment_ids"].tolist() == [1] * 3 + [0] * 13


def test_prepare_packs_and_reports_efficiency(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS * 10)
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}],
                                        sample_packing=True, sequence_len=512))
    assert len(data.train) < 40 and data.report.train.rows == 40
    assert data.report.train.efficiency == pytest.approx(data.train.efficiency)
    assert f"packing efficiency: {100 * data.train.efficiency:.1f}%" in "\n".join(data.report.lines())


def test_packed_logits_equal_per_sequence_logits():
    import jax
    import jax.numpy as jnp

    from jaxtune.model.config import ModelConfig
    from jaxtune.model.params import init_params
    from jaxtune.model.transformer import forward

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    params = init_params(cfg, jax.random.key(0))
    rows = random_rows([9, 5, 12, 3, 7], vocab=64, seed=3)
    S = 24
    examples = build_examples(rows, sequence_len=S, sample_packing=True, pad_id=0)
    assert len(examples) < len(rows)  # something was actually packed
    packed = [examples[g] for g in range(len(examples))]
    # Jitted: eager, the forward compiles and runs op by op (6 s here against 4 s jitted).
    stacked = {k: jnp.asarray(np.stack([e[k] for e in packed])) for k in ("input_ids", "segment_ids", "positions")}
    packed_logits = jax.jit(lambda p, ids, seg, pos: forward(p, cfg, ids, segment_ids=seg, positions=pos))(
        params, stacked["input_ids"], stacked["segment_ids"], stacked["positions"])
    # The reference runs each sequence alone, from position 0, with no segment ids: padding after
    # it cannot change its logits under causal attention.
    alone = np.zeros((len(rows), S), np.int32)
    for i in range(len(rows)):
        alone[i, : rows.lengths[i]] = rows.row(i)[0]
    alone_logits = np.asarray(jax.jit(lambda p, ids: forward(p, cfg, ids))(params, jnp.asarray(alone)))
    compared = 0
    for g, ex in enumerate(packed):
        for s in range(1, int(ex["segment_ids"].max()) + 1):
            where = np.flatnonzero(ex["segment_ids"] == s)
            (i,) = [i for i in range(len(rows)) if np.array_equal(alone[i, : len(where)], ex["input_ids"][where])
                    and rows.lengths[i] == len(where)]
            np.testing.assert_allclose(np.asarray(packed_logits[g, where]), alone_logits[i, : len(where)],
                                       atol=1e-5, rtol=1e-5)
            compared += 1
    assert compared == len(rows)

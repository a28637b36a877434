"""The grain loader: batch contract, seeded per-epoch shuffle, process shards, resumable position;
and the held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_fixtures import ALPACA_ROWS, data_config, write_jsonl

from jaxtune.data import FIELDS, IGNORE_INDEX, build_examples, make_loader, prepare_datasets
from jaxtune.data.rows import RowsBuilder
from jaxtune.errors import DataError


def numbered_examples(n: int, sequence_len: int = 8):
    """Unpacked examples whose first token is the example's index + 1 (to identify it)."""
    builder = RowsBuilder()
    for i in range(n):
        ids = np.array([i + 1, 1000 + i, 2000 + i], dtype=np.int32)
        builder.add(ids, ids.copy())
    return build_examples(builder.build(), sequence_len, sample_packing=False, pad_id=0)


def ids_of(batch) -> list[int]:
    return (batch["input_ids"][:, 0] - 1).tolist()


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batch_contract():
    loader = make_loader(numbered_examples(10), batch_size=4, seed=0, shard_index=0, shard_count=1)
    batch = next(loader)
    assert set(batch) == set(FIELDS)
    for name in FIELDS:
        assert batch[name].shape == (4, 8) and batch[name].dtype == np.int32
    # Labels are the input ids themselves (not shifted), -100 on padding.
    assert np.array_equal(batch["labels"][:, :3], batch["input_ids"][:, :3])
    assert np.all(batch["labels"][:, 3:] == IGNORE_INDEX) and np.all(batch["segment_ids"][:, 3:] == 0)


def test_epochs_cover_every_example_once_and_reshuffle():
    loader = make_loader(numbered_examples(12), batch_size=3, seed=7, num_epochs=2, shard_index=0, shard_count=1)
    order = [i for batch in loader for i in ids_of(batch)]
    first, second = order[:12], order[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second and first != list(range(12))


def test_same_seed_same_order_different_seed_different_order():
    def order(seed):
        loader = make_loader(numbered_examples(20), batch_size=5, seed=seed, shard_index=0, shard_count=1)
        return [ids_of(b) for b in take(loader, 4)]

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_no_shuffle_keeps_stored_order():
    loader = make_loader(numbered_examples(6), batch_size=2, shuffle=False, shard_index=0, shard_count=1)
    assert [ids_of(b) for b in take(loader, 3)] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_process_shards_in_process_order_are_the_single_process_rows(micro_batches):
    """Micro-batch m of step k, processes' rows placed in process order, is micro-batch m of
    step k of one process feeding all the rows: every device sees the same rows either way."""
    def batches(index, count, rows_per_micro):
        loader = make_loader(numbered_examples(48), batch_size=rows_per_micro * micro_batches, seed=3, num_epochs=1,
                             shard_index=index, shard_count=count, micro_batches=micro_batches)
        return [np.asarray(ids_of(b)).reshape(micro_batches, rows_per_micro) for b in loader]

    whole = batches(0, 1, 6)
    shards = [batches(i, 3, 2) for i in range(3)]
    assert len(whole) == len(shards[0]) == 48 // (6 * micro_batches)
    for step, global_batch in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([shard[step] for shard in shards], axis=1), global_batch)
    flat = [i for shard in shards for batch in shard for i in batch.ravel()]
    assert sorted(flat) == list(range(48))


def test_get_state_set_state_resumes_at_the_next_batch():
    examples = numbered_examples(30)
    loader = make_loader(examples, batch_size=4, seed=5, shard_index=0, shard_count=1)
    take(loader, 5)
    state = loader.get_state()
    json.dumps(state)  # small and serialisable, for the checkpoint
    expected = [ids_of(b) for b in take(loader, 6)]  # crosses into the second epoch
    resumed = make_loader(examples, batch_size=4, seed=5, shard_index=0, shard_count=1)
    resumed.set_state(state)
    assert [ids_of(b) for b in take(resumed, 6)] == expected


def test_incomplete_final_batch_padded_with_empty_rows_when_not_dropped():
    loader = make_loader(numbered_examples(5), batch_size=2, shuffle=False, num_epochs=1,
                         drop_remainder=False, shard_index=0, shard_count=1)
    batches = list(loader)
    assert loader.steps_per_epoch == 3 and len(batches) == 3
    last = batches[-1]
    assert last["input_ids"][0, 0] == 5 and np.all(last["segment_ids"][1] == 0)
    assert np.all(last["labels"][1] == IGNORE_INDEX)


def test_fewer_examples_than_one_batch_is_an_error():
    with pytest.raises(DataError, match="3 examples are fewer than one batch of 8"):
        make_loader(numbered_examples(3), batch_size=4, shard_index=0, shard_count=2)


@pytest.mark.parametrize("val_set_size, eval_rows", [(0.25, 5), (3, 3)])
def test_val_set_size_fraction_or_count_holds_rows_out(tmp_path, val_set_size, eval_rows):
    rows = [{**r, "output": f"{r['output']} {i}"} for i, r in enumerate(ALPACA_ROWS * 5)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}],
                                        val_set_size=val_set_size))
    assert (len(data.eval), len(data.train)) == (eval_rows, 20 - eval_rows)
    def as_set(examples):
        return {tuple(np.asarray(examples.rows.row(i)[0]).tolist()) for i in range(len(examples.rows))}
    assert not as_set(data.eval) & as_set(data.train)
    assert len(as_set(data.eval) | as_set(data.train)) == 20


def test_val_set_size_larger_than_the_data(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    with pytest.raises(DataError, match="would hold out 4 of 4 training rows"):
        prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}], val_set_size=4))


def test_test_datasets_are_the_eval_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    held = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[:2])
    data = prepare_datasets(data_config(tmp_path, [{"path": str(train), "type": "alpaca"}],
                                        test_datasets=[{"path": str(held), "type": "alpaca"}]))
    assert (len(data.train), len(data.eval)) == (4, 2)
    assert [c.name.split(" ")[0] for c in data.report.datasets] == ["datasets[0]", "test_datasets[0]"]

"""The training batch stream, on grain: seeded per-epoch shuffle, epochs, per-process shards,
and a position that can be saved and restored.

Batch contract (the trainer relies on it). Each batch is a dict of four numpy int32 arrays,
all of shape [batch_size, sequence_len]:

    input_ids    token ids; padding positions hold the tokenizer's pad (or eos) id
    labels       the SAME tokens as input_ids where the token is trained, -100 where it is not
                 (prompt, untrained turn, padding). Labels are NOT shifted: the loss at position
                 t predicts labels[t + 1] from the logits at t, and only where
                 segment_ids[t + 1] == segment_ids[t] != 0, so no sequence predicts the first
                 token of the next one packed after it.
    segment_ids  1, 2, ... for the 1st, 2nd, ... sequence packed in the row; 0 for padding.
                 Attention is causal and within equal segment ids only.
    positions    RoPE positions, restarting at 0 at the first token of every sequence.

Every row is exactly `sequence_len` long (static shapes: one compilation). `batch_size` is the
number of rows this process feeds per step (micro_batch_size times its local data-parallel
devices, times gradient_accumulation_steps if the trainer takes all micro-batches at once).

Order. Examples are shuffled with `seed` (a fresh permutation each epoch, same permutations on
every process), cut into consecutive blocks of `batch_size / micro_batches` rows, and the blocks
are dealt out round-robin to processes (`jax.process_index()` of `jax.process_count()`); each
process stacks `micro_batches` of its blocks into one batch. Placed in process order, the
processes' rows of micro-batch m are exactly the rows of micro-batch m of a single-process run
with as many devices: a run sees the same rows on the same devices whatever its process count
(so 2 processes of 1 GPU train bit for bit as 1 process of 2 GPUs, given deterministic kernels).
An incomplete final batch is dropped (`drop_remainder=True`) or padded with empty rows (all
labels -100, segment 0), which carry no loss.

Position. `get_state()` returns a small JSON-able dict (grain's iterator state); `set_state()`
on a loader built with the same arguments resumes at exactly the next batch.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from jaxtune.data.examples import FIELDS, Examples
from jaxtune.data.masking import IGNORE_INDEX
from jaxtune.errors import DataError


class Loader:
    """An iterator of batches (dicts of int32 [batch_size, sequence_len]) over `examples`."""

    def __init__(self, examples: Examples, *, batch_size: int, seed: int = 42, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 shard_index: int | None = None, shard_count: int | None = None,
                 micro_batches: int = 1, prefetch_threads: int = 4):
        """`num_epochs=None` repeats forever (the trainer stops at its step count). `micro_batches`:
        how many micro-batches (gradient accumulation) one batch of `batch_size` rows holds."""
        if shard_index is None or shard_count is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        if batch_size < 1 or micro_batches < 1 or batch_size % micro_batches:
            raise ValueError(f"batch_size must be a positive multiple of micro_batches; got {batch_size=}, "
                             f"{micro_batches=}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
        self.examples = examples
        self.batch_size = batch_size
        self.shard_count = shard_count
        self.drop_remainder = drop_remainder
        per_step = batch_size * shard_count
        if drop_remainder and len(examples) < per_step:
            raise DataError(f"{len(examples)} examples are fewer than one batch of {per_step} "
                            f"({batch_size} rows x {shard_count} processes); add data or lower "
                            "micro_batch_size")
        source: Any = examples if drop_remainder else _PaddedToWholeBatches(examples, per_step)
        dataset = grain.MapDataset.source(source)
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.repeat(num_epochs)
        dataset = dataset.batch(batch_size // micro_batches, drop_remainder=True, batch_fn=_stack)
        dataset = dataset[shard_index::shard_count]
        if micro_batches > 1:
            dataset = dataset.batch(micro_batches, drop_remainder=True, batch_fn=_concatenate)
        self._dataset = dataset
        options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * prefetch_threads)
        self._iterator = iter(dataset.to_iter_dataset(read_options=options))

    @property
    def steps_per_epoch(self) -> int:
        """Batches this process yields per pass over the examples."""
        n = len(self.examples)
        if self.drop_remainder:
            return n // (self.batch_size * self.shard_count)
        return math.ceil(n / (self.batch_size * self.shard_count))

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        """The position of the next batch, to save with a checkpoint."""
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        """Resume at a position from `get_state` (of a loader built with the same arguments)."""
        self._iterator.set_state(state)


def make_loader(examples: Examples, *, batch_size: int, seed: int = 42, shuffle: bool = True,
                num_epochs: int | None = None, drop_remainder: bool = True,
                shard_index: int | None = None, shard_count: int | None = None, micro_batches: int = 1) -> Loader:
    """A `Loader`; see its module docstring for the batch contract and order."""
    return Loader(examples, batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                  drop_remainder=drop_remainder, shard_index=shard_index, shard_count=shard_count,
                  micro_batches=micro_batches)


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([r[name] for r in rows]) for name in FIELDS}


def _concatenate(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b[name] for b in blocks]) for name in FIELDS}


class _PaddedToWholeBatches:
    """`examples` followed by empty rows up to a multiple of `multiple` (for evaluation)."""

    def __init__(self, examples: Examples, multiple: int):
        self.examples = examples
        self.length = math.ceil(len(examples) / multiple) * multiple
        S = examples.sequence_len
        self.empty = {"input_ids": np.full(S, examples.pad_id, np.int32),
                      "labels": np.full(S, IGNORE_INDEX, np.int32),
                      "segment_ids": np.zeros(S, np.int32), "positions": np.zeros(S, np.int32)}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if index < len(self.examples):
            return self.examples[index]
        return {k: v.copy() for k, v in self.empty.items()}

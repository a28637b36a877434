"""Sample packing: group whole sequences into rows of `sequence_len` tokens, best-fit decreasing.

Sequences are placed longest first, each into the open row with the least room that still fits
it (best fit), else into a new row. No sequence is ever split: every sequence is at most
`sequence_len` long (the length rule ran before), so it always fits an empty row. Best-fit
decreasing wastes at most a small fraction of a row per row; on instruction-tuning length mixes
it fills well over 95% of positions (see `benchmarks/RESULTS.md`).

A packing is stored as groups: `group_offsets` (int64 [num_groups + 1]) into `group_rows`
(int64, row indices), the same ragged layout as `TokenizedRows`. Unpacked data is the trivial
grouping, one row per group.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Grouping:
    """Which rows share each training example."""

    group_offsets: np.ndarray  # int64 [num_groups + 1]
    group_rows: np.ndarray  # int64 [num_rows_used], row indices, group g at offsets[g]:offsets[g+1]

    def __len__(self) -> int:
        return len(self.group_offsets) - 1

    def rows_of(self, group: int) -> np.ndarray:
        return self.group_rows[self.group_offsets[group]:self.group_offsets[group + 1]]


def one_row_per_group(num_rows: int) -> Grouping:
    """The grouping of unpacked data."""
    return Grouping(np.arange(num_rows + 1, dtype=np.int64), np.arange(num_rows, dtype=np.int64))


def pack(lengths: np.ndarray, capacity: int) -> Grouping:
    """Best-fit-decreasing packing of sequences with `lengths` into rows of `capacity` tokens.

    Deterministic: ties are broken by row index. Groups list their rows longest first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > capacity:
        raise ValueError(f"a sequence of {lengths.max()} tokens cannot fit rows of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    # Open rows as (free space, row id), sorted, so the best fit is one bisect away.
    open_rows: list[tuple[int, int]] = []
    members: list[list[int]] = []
    for index in order.tolist():
        length = int(lengths[index])
        slot = bisect.bisect_left(open_rows, (length, -1))
        if slot < len(open_rows):
            free, group = open_rows.pop(slot)
        else:
            free, group = capacity, len(members)
            members.append([])
        members[group].append(index)
        if free - length > 0:
            bisect.insort(open_rows, (free - length, group))
    group_offsets = np.zeros(len(members) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in members], out=group_offsets[1:])
    group_rows = np.fromiter((i for m in members for i in m), dtype=np.int64, count=int(group_offsets[-1]))
    return Grouping(group_offsets, group_rows)


def efficiency(lengths: np.ndarray, grouping: Grouping, capacity: int) -> float:
    """Share of the grouping's positions that hold tokens (1.0 = no padding)."""
    if len(grouping) == 0:
        return 0.0
    used = int(np.asarray(lengths, dtype=np.int64)[grouping.group_rows].sum())
    return used / (len(grouping) * capacity)

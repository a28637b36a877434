"""Training examples: fixed-length rows built on demand from tokenised rows and their grouping.

Example g is the rows of group g laid end to end and padded to `sequence_len`:

    input_ids   [S] int32  tokens; padding holds `pad_id`
    labels      [S] int32  input_ids where trained, -100 where masked or padding (NOT shifted)
    segment_ids [S] int32  1, 2, ... for the 1st, 2nd, ... sequence of the row; 0 for padding
    positions   [S] int32  0, 1, ... restarting at 0 for each sequence; 0 for padding

Building rows on demand keeps the cache at the size of the tokens (no padding stored) and lets
the loader shuffle examples without touching token data. `Examples` is a random-access source
(`__len__`, `__getitem__`), which is what `grain.MapDataset.source` takes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxtune.data.masking import IGNORE_INDEX
from jaxtune.data.packing import Grouping, efficiency
from jaxtune.data.rows import TokenizedRows

FIELDS = ("input_ids", "labels", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Examples:
    """Fixed-length training examples over `rows`, one per group of `grouping`."""

    rows: TokenizedRows
    grouping: Grouping
    sequence_len: int
    pad_id: int

    def __post_init__(self):
        g = self.grouping
        if len(g.group_rows) == 0:
            return
        if np.any(np.diff(g.group_offsets) <= 0):
            raise ValueError("every group must hold at least one row")
        per_group = np.add.reduceat(self.rows.lengths[g.group_rows], g.group_offsets[:-1])
        if int(per_group.max()) > self.sequence_len:
            raise ValueError(f"a group holds {int(per_group.max())} tokens, more than "
                             f"sequence_len {self.sequence_len}")

    def __len__(self) -> int:
        return len(self.grouping)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range ({len(self)} examples)")
        S = self.sequence_len
        input_ids = np.full(S, self.pad_id, dtype=np.int32)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int32)
        segment_ids = np.zeros(S, dtype=np.int32)
        positions = np.zeros(S, dtype=np.int32)
        cursor = 0
        for segment, row in enumerate(self.grouping.rows_of(index), start=1):
            ids, row_labels = self.rows.row(int(row))
            end = cursor + len(ids)
            input_ids[cursor:end] = ids
            labels[cursor:end] = row_labels
            segment_ids[cursor:end] = segment
            positions[cursor:end] = np.arange(len(ids), dtype=np.int32)
            cursor = end
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids,
                "positions": positions}

    @property
    def num_tokens(self) -> int:
        return int(self.rows.lengths[self.grouping.group_rows].sum())

    @property
    def efficiency(self) -> float:
        """Share of positions that hold tokens rather than padding."""
        return efficiency(self.rows.lengths, self.grouping, self.sequence_len)

    def save(self, folder: Path) -> None:
        self.rows.save(folder)
        np.save(folder / "group_offsets.npy", self.grouping.group_offsets)
        np.save(folder / "group_rows.npy", self.grouping.group_rows)

    @classmethod
    def load(cls, folder: Path, sequence_len: int, pad_id: int) -> Examples:
        grouping = Grouping(np.load(folder / "group_offsets.npy", mmap_mode="r"),
                            np.load(folder / "group_rows.npy", mmap_mode="r"))
        return cls(TokenizedRows.load(folder), grouping, sequence_len, pad_id)

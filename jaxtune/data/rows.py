"""Tokenised rows of varying length, stored flat: one token array plus row boundaries.

Ragged rows in two flat int32 arrays (`input_ids`, `labels`) and an int64 `offsets` array
(row i is `[offsets[i], offsets[i+1])`) take no per-row Python objects, save and memory-map as
plain `.npy` files, and slice without copying, so a cache of millions of rows opens instantly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_ARRAYS = ("input_ids", "labels", "offsets")


@dataclasses.dataclass(frozen=True)
class TokenizedRows:
    """Rows of tokens and labels (labels are input ids where trained, -100 elsewhere)."""

    input_ids: np.ndarray  # int32 [total_tokens]
    labels: np.ndarray  # int32 [total_tokens]
    offsets: np.ndarray  # int64 [num_rows + 1], offsets[0] == 0

    def __post_init__(self):
        if self.input_ids.shape != self.labels.shape:
            raise ValueError(f"{self.input_ids.shape=} != {self.labels.shape=}")
        if len(self.offsets) == 0 or self.offsets[0] != 0 or self.offsets[-1] != len(self.input_ids):
            raise ValueError(f"offsets must run from 0 to {len(self.input_ids)}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 [num_rows]: tokens per row."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trained_tokens(self) -> int:
        return int(np.count_nonzero(self.labels != -100))

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of row i, as views."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.labels[start:end]

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenizedRows:
        """The rows at `indices`, in that order (a copy)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Gather all token positions at once: for each selected row, its start plus 0..len-1.
        starts = np.repeat(self.offsets[:-1][indices] - offsets[:-1], lengths)
        positions = starts + np.arange(offsets[-1], dtype=np.int64)
        return TokenizedRows(self.input_ids[positions], self.labels[positions], offsets)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path) -> TokenizedRows:
        """Rows saved by `save`, memory-mapped (read-only)."""
        return cls(*(np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS))

    @classmethod
    def empty(cls) -> TokenizedRows:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence[TokenizedRows]) -> TokenizedRows:
        if not parts:
            return cls.empty()
        shifts = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        return cls(np.concatenate([p.input_ids for p in parts]).astype(np.int32),
                   np.concatenate([p.labels for p in parts]).astype(np.int32),
                   offsets.astype(np.int64))


class RowsBuilder:
    """Collects rows one at a time and builds `TokenizedRows` once at the end."""

    def __init__(self):
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def add(self, input_ids: np.ndarray, labels: np.ndarray) -> None:
        self._ids.append(input_ids)
        self._labels.append(labels)

    def __len__(self) -> int:
        return len(self._ids)

    def build(self) -> TokenizedRows:
        if not self._ids:
            return TokenizedRows.empty()
        offsets = np.zeros(len(self._ids) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in self._ids], out=offsets[1:])
        return TokenizedRows(np.concatenate(self._ids).astype(np.int32, copy=False),
                             np.concatenate(self._labels).astype(np.int32, copy=False), offsets)

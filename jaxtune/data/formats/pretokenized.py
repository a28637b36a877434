"""Rows that are already tokens: `input_ids` and, optionally, `labels` (-100 where masked).

Without `labels` every token is trained, as in Axolotl. Ids outside the vocabulary and labels
of a different length are malformed rows, caught here rather than as an index error on device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxtune.data.formats.base import EncodedRow, RowError, RowFormat
from jaxtune.data.masking import IGNORE_INDEX


class PretokenizedFormat(RowFormat):
    name = "pretokenized"

    def __init__(self, *args):
        super().__init__(*args)
        self.vocab_size = len(self.tokenizer)

    def encode(self, rows):
        out: list[EncodedRow | RowError] = []
        for row in rows:
            try:
                ids, labels = check_token_ids(row.get("input_ids"), row.get("labels"), self.vocab_size)
            except RowError as e:
                out.append(e)
                continue
            out.append(EncodedRow(ids, ids.copy() if self.cfg.train_on_inputs else labels))
        return out


def check_token_ids(input_ids: Any, labels: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) as int32 arrays, checked; labels default to input_ids."""
    if input_ids is None:
        raise RowError("input_ids", "missing field 'input_ids'")
    try:
        ids = np.asarray(input_ids, dtype=np.int64)
    except (TypeError, ValueError):
        raise RowError("input_ids", "field 'input_ids' must be a list of integers") from None
    if ids.ndim != 1:
        raise RowError("input_ids", "field 'input_ids' must be a flat list of integers")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise RowError("input_ids", f"token id {bad} is outside the vocabulary (size {vocab_size})")
    if labels is None:
        return ids.astype(np.int32), ids.astype(np.int32)
    try:
        lab = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise RowError("labels", "field 'labels' must be a list of integers") from None
    if lab.shape != ids.shape:
        raise RowError("labels", f"field 'labels' has {lab.size} entries for {ids.size} input_ids")
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= vocab_size))
    if bad.any():
        raise RowError("labels", f"label {int(lab[bad][0])} is neither -100 nor a token id")
    return ids.astype(np.int32), lab.astype(np.int32)

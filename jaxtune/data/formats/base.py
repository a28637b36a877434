"""What a dataset format is: raw rows in, token ids and labels out, malformed rows named.

A format is built once per dataset (it resolves its columns, template and tokens up front, so a
config mistake fails before any row is read) and then encodes rows in batches, because the Rust
tokenizer is fastest on a batch. A malformed row is returned as a `RowError` naming the field;
the caller adds the file and row index and decides, per `skip_bad_rows`, whether to stop.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
from typing import Any

import numpy as np

from jaxtune.config.dataset_schema import DatasetConfig
from jaxtune.config.schema import Config


class RowError(Exception):
    """One malformed row: the field at fault and what is wrong with it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class EncodedRow:
    """One row as tokens. Labels equal input_ids where trained and -100 elsewhere (not shifted)."""

    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T]


class RowFormat(abc.ABC):
    """Turns raw rows of one dataset into `EncodedRow`s."""

    name: str = ""

    def __init__(self, ds: DatasetConfig, cfg: Config, tokenizer, key: str):
        self.ds = ds
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.key = key  # e.g. "datasets[0]", for config error messages
        # Format-specific things worth reporting, e.g. chat turns with no end-of-turn token.
        self.counters: collections.Counter[str] = collections.Counter()

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] += n

    @abc.abstractmethod
    def encode(self, rows: list[dict[str, Any]]) -> list[EncodedRow | RowError]:
        """One result per row, in order."""

    def eos_text(self) -> str:
        """The EOS token's text, appended to completions so the model learns to stop."""
        eos = self.tokenizer.eos_token
        if not eos:
            from jaxtune.errors import ConfigError

            raise ConfigError(f"{self.key}: type {self.name} appends an end-of-sequence token but the "
                              "tokenizer has none; set special_tokens.eos_token")
        return eos


def require_text(row: dict[str, Any], field: str, *, allow_empty: bool = False) -> str:
    """The string in `row[field]`; a RowError if it is missing, null or not a string."""
    if field not in row or row[field] is None:
        raise RowError(field, f"missing field '{field}'")
    value = row[field]
    if not isinstance(value, str):
        raise RowError(field, f"field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise RowError(field, f"field '{field}' is empty")
    return value


def optional_text(row: dict[str, Any], field: str) -> str:
    """`row[field]` if it is a string, '' if missing or null; a RowError for any other type."""
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(field, f"field '{field}' must be a string, got {type(value).__name__}")
    return value

"""One dataset entry from raw rows to tokenised rows: read, format, mask, apply the length rule.

Rows are read from the HF dataset in batches and handed to the entry's format. Each result is
then checked, in this order, and every outcome is counted in the dataset's `DatasetCounts`:
a malformed row stops the run with its file, row index and field (or, with `skip_bad_rows`, is
skipped); a row longer than `sequence_len` is dropped, truncated or stops the run, per
`excess_length_strategy`; a row in which no token carries a label is dropped (it would add
nothing to the loss, and a whole batch of them would divide by zero).

The tokenizer already runs each batch on all cores; encoding batches in worker threads on top of
that measured no faster on 2 cores (benchmarks/preprocess_throughput.py), so this stays serial.
"""

from __future__ import annotations

import numpy as np

from jaxtune.config.dataset_schema import DatasetConfig
from jaxtune.config.schema import Config
from jaxtune.data.formats import EncodedRow, RowError, make_format
from jaxtune.data.masking import IGNORE_INDEX
from jaxtune.data.report import DatasetCounts, merge_notes
from jaxtune.data.rows import RowsBuilder, TokenizedRows
from jaxtune.data.sources import load_source
from jaxtune.errors import DataError

READ_BATCH_ROWS = 1024  # rows per tokenizer call: large enough for the Rust threads to pay off


def encode_dataset(ds: DatasetConfig, cfg: Config, tokenizer, key: str
                   ) -> tuple[TokenizedRows, DatasetCounts]:
    """Tokenised, masked, length-checked rows of one dataset entry, and what happened to each row."""
    row_format = make_format(ds, cfg, tokenizer, key)  # config mistakes fail before any reading
    source = load_source(ds, key)
    counts = DatasetCounts(name=f"{key} ({ds.path})")
    builder = RowsBuilder()
    index = 0
    for rows in _row_batches(source):
        for result in row_format.encode(rows):
            _accept(result, index, ds, cfg, counts, builder)
            index += 1
    counts.rows_read = index
    merge_notes(counts, row_format.counters)
    rows = builder.build()
    counts.rows_kept = len(rows)
    counts.tokens = rows.num_tokens
    counts.trained_tokens = rows.num_trained_tokens
    return rows, counts


def _row_batches(source):
    """Lists of row dicts, READ_BATCH_ROWS at a time, from an HF dataset."""
    for batch in source.iter(batch_size=READ_BATCH_ROWS):
        columns = list(batch)
        yield [dict(zip(columns, values)) for values in zip(*batch.values())]


def _accept(result: EncodedRow | RowError, index: int, ds: DatasetConfig, cfg: Config,
            counts: DatasetCounts, builder: RowsBuilder) -> None:
    where = f"{ds.path}: row {index}"
    if isinstance(result, RowError):
        message = f"{where}: {result.message}" + (f" (type {ds.format_name})" if result.field else "")
        if not cfg.skip_bad_rows:
            raise DataError(message + "; fix the row or set skip_bad_rows: true to skip such rows")
        counts.note_bad_row(message)
        return
    ids, labels = result.input_ids, result.labels
    if len(ids) > cfg.sequence_len:
        if cfg.excess_length_strategy == "raise":
            raise DataError(f"{where}: {len(ids)} tokens, longer than sequence_len {cfg.sequence_len} "
                            "(excess_length_strategy: raise)")
        if cfg.excess_length_strategy == "drop":
            counts.dropped_too_long += 1
            return
        ids, labels = ids[:cfg.sequence_len], labels[:cfg.sequence_len]
        counts.truncated += 1
    if len(ids) == 0 or not np.any(labels != IGNORE_INDEX):
        counts.dropped_untrained += 1
        return
    builder.add(ids, labels)

"""The data pipeline end to end: datasets -> tokenised, masked rows -> held-out split -> packed
examples -> cache. `prepare_datasets(cfg)` is what `preprocess` and `train` call.

    tokenizer = load_tokenizer(cfg)
    data = prepare_datasets(cfg, tokenizer)        # reuses dataset_prepared_path/<key>/ if present
    data.train[0]  # {"input_ids", "labels", "segment_ids", "positions"}, each int32 [sequence_len]
    print("\\n".join(data.report.lines()))
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from jaxtune.config.dataset_schema import DatasetConfig
from jaxtune.config.schema import Config
from jaxtune.data.cache import cache_folder, cache_key, load_cached, save_cache
from jaxtune.data.encode import encode_dataset
from jaxtune.data.examples import Examples
from jaxtune.data.packing import one_row_per_group, pack
from jaxtune.data.report import DataReport, DatasetCounts, SplitStats
from jaxtune.data.rows import TokenizedRows
from jaxtune.data.tokenizer import load_tokenizer, pad_token_id
from jaxtune.errors import DataError


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Training and evaluation examples, what preprocessing counted, and where they are cached."""

    train: Examples
    eval: Examples | None
    report: DataReport
    cache_dir: Path
    from_cache: bool


def prepare_datasets(cfg: Config, tokenizer=None, *, use_cache: bool = True) -> PreparedData:
    """Build (or reuse from the cache) the examples of `cfg.datasets` and the evaluation split.

    The evaluation split is `test_datasets` if given, else `val_set_size` rows held out of the
    training rows at random (seeded by `cfg.seed`), else none. With `use_cache=False` the data is
    rebuilt and the cache rewritten.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    folder = cache_folder(cfg, cache_key(cfg, tokenizer))
    if use_cache and (cached := load_cached(folder)) is not None:
        train, evaluation, report = cached
        return PreparedData(train, evaluation, report, folder, from_cache=True)

    train_rows, counts = _encode_all(cfg.datasets, "datasets", cfg, tokenizer)
    eval_rows = None
    if cfg.test_datasets:
        eval_rows, eval_counts = _encode_all(cfg.test_datasets, "test_datasets", cfg, tokenizer)
        counts += eval_counts
    elif cfg.val_set_size:
        train_rows, eval_rows = split_held_out(train_rows, cfg.val_set_size, cfg.seed)
    pad = pad_token_id(tokenizer)
    train = build_examples(train_rows, cfg.sequence_len, cfg.sample_packing, pad)
    evaluation = None if eval_rows is None else build_examples(eval_rows, cfg.sequence_len,
                                                               cfg.sample_packing, pad)
    report = DataReport(counts, cfg.sequence_len, cfg.sample_packing, train=_stats(train_rows, train),
                        eval=None if evaluation is None else _stats(eval_rows, evaluation))
    save_cache(folder, train, evaluation, report, replace=not use_cache)
    return PreparedData(train, evaluation, report, folder, from_cache=False)


def build_examples(rows: TokenizedRows, sequence_len: int, sample_packing: bool, pad_id: int) -> Examples:
    """Rows grouped into fixed-length examples: packed best-fit-decreasing, or one per example."""
    grouping = pack(rows.lengths, sequence_len) if sample_packing else one_row_per_group(len(rows))
    return Examples(rows, grouping, sequence_len, pad_id)


def split_held_out(rows: TokenizedRows, val_set_size: float | int, seed: int
                   ) -> tuple[TokenizedRows, TokenizedRows]:
    """(train, eval): `val_set_size` rows (a fraction < 1, rounded up, or a count) drawn at random.

    Both keep the rows' original order; only membership is random.
    """
    n = len(rows)
    count = math.ceil(val_set_size * n) if isinstance(val_set_size, float) else int(val_set_size)
    if count < 1:
        raise DataError(f"val_set_size {val_set_size} of {n} training rows holds no rows; "
                        "raise it or set it to 0")
    if count >= n:
        raise DataError(f"val_set_size {val_set_size} would hold out {count} of {n} training rows, "
                        "leaving none to train on")
    chosen = np.random.default_rng(seed).permutation(n)
    return rows.select(np.sort(chosen[count:])), rows.select(np.sort(chosen[:count]))


def _encode_all(entries: tuple[DatasetConfig, ...], list_key: str, cfg: Config, tokenizer
                ) -> tuple[TokenizedRows, list[DatasetCounts]]:
    parts, counts = [], []
    for i, ds in enumerate(entries):
        rows, c = encode_dataset(ds, cfg, tokenizer, f"{list_key}[{i}]")
        parts.append(rows)
        counts.append(c)
    rows = TokenizedRows.concatenate(parts)
    if len(rows) == 0:
        details = "; ".join(line.strip() for c in counts for line in c.lines())
        raise DataError(f"{list_key}: no rows left after filtering ({details})")
    return rows, counts


def _stats(rows: TokenizedRows, examples: Examples) -> SplitStats:
    return SplitStats(rows=len(rows), examples=len(examples), tokens=rows.num_tokens,
                      trained_tokens=rows.num_trained_tokens, efficiency=examples.efficiency)

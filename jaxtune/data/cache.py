"""The preprocessed-data cache in `dataset_prepared_path`, keyed by what the data depends on.

The key hashes every input that changes the tokens, labels or packing: the dataset entries, the
data keys of the config (sequence_len, packing, masking, length rule, split), the tokenizer
(its full serialisation, special tokens and template), the size and modification time of each
local data file, the source of any user format function, and this cache's format version. Keys
that only change the loader (seed of the shuffle, batch size) are left out, so changing them
reuses the cache. A cache folder is written under a temporary name and renamed into place, so a
half-written cache is never read, and two processes preparing the same data do not collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from jaxtune.config.parse import to_plain
from jaxtune.config.schema import Config
from jaxtune.data.examples import Examples
from jaxtune.data.formats.segments import function_fingerprint
from jaxtune.data.report import DataReport
from jaxtune.data.sources import source_files

# Bump when the files written change, or when the same inputs would give different tokens,
# labels or packing (a masking or formatting fix), so old caches are rebuilt, not reused.
CACHE_FORMAT_VERSION = 1
_DATA_KEYS = ("sequence_len", "sample_packing", "train_on_inputs", "excess_length_strategy",
              "skip_bad_rows", "val_set_size", "chat_template", "chat_template_jinja", "eot_tokens",
              "special_tokens", "tokens")


def cache_key(cfg: Config, tokenizer) -> str:
    """A hex digest naming the prepared data for this config and tokenizer."""
    inputs = {
        "version": CACHE_FORMAT_VERSION,
        "config": {k: to_plain(getattr(cfg, k)) for k in _DATA_KEYS},
        # The seed only matters for data when it picks the held-out rows.
        "split_seed": cfg.seed if cfg.val_set_size else None,
        "datasets": [_dataset_inputs(ds) for ds in cfg.datasets],
        "test_datasets": [_dataset_inputs(ds) for ds in cfg.test_datasets],
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _dataset_inputs(ds) -> dict:
    files = []
    for path in source_files(ds):
        stat = path.stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    inputs = {"entry": to_plain(ds), "files": files}
    if ds.format_name == "function":
        inputs["function"] = function_fingerprint(ds.type)
    return inputs


def cache_folder(cfg: Config, key: str) -> Path:
    return Path(cfg.dataset_prepared_path) / key


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished cache of this format version."""
    try:
        return json.loads((folder / "meta.json").read_text()).get("version") == CACHE_FORMAT_VERSION
    except (OSError, ValueError):
        return False


def load_cached(folder: Path) -> tuple[Examples, Examples | None, DataReport] | None:
    """(train, eval, report) from a complete cache folder, or None if there is none."""
    if not is_complete(folder):
        return None
    meta = json.loads((folder / "meta.json").read_text())
    seq, pad = meta["sequence_len"], meta["pad_id"]
    train = Examples.load(folder / "train", seq, pad)
    evaluation = Examples.load(folder / "eval", seq, pad) if meta["has_eval"] else None
    return train, evaluation, DataReport.from_json(meta["report"])


def save_cache(folder: Path, train: Examples, evaluation: Examples | None, report: DataReport,
               *, replace: bool = False) -> None:
    """Write the cache atomically (into a temporary folder, then renamed into place); `replace`
    removes a complete cache already there (a forced rebuild)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train.save(tmp / "train")
    if evaluation is not None:
        evaluation.save(tmp / "eval")
    meta = {"version": CACHE_FORMAT_VERSION, "key": folder.name, "sequence_len": train.sequence_len,
            "pad_id": train.pad_id, "has_eval": evaluation is not None, "report": report.to_json()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if folder.exists() and (replace or not is_complete(folder)):  # rebuild, or an older format
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same cache first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)

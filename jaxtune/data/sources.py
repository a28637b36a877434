"""Open one `datasets:` entry as an HF `datasets.Dataset`: local files, folders or hub names.

`path` is tried as a local file (its extension, or `ds_type`, names the builder: json for
.json/.jsonl, parquet, csv, arrow, text), then as a local folder (a `save_to_disk` folder, or
data files HF `datasets` can infer a builder for), then as a hub dataset name. Paths are
relative to the working directory, as in Axolotl. Every failure is a `DataError` naming the
entry and what could not be read; with no network, a hub name says it could not be reached.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from jaxtune.config.dataset_schema import DatasetConfig
from jaxtune.errors import DataError

BUILDER_BY_EXTENSION = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                        ".arrow": "arrow", ".txt": "text"}


def load_source(ds: DatasetConfig, key: str) -> datasets.Dataset:
    """The rows of dataset entry `ds` (`key` names it in errors, e.g. 'datasets[0]')."""
    datasets.disable_progress_bars()  # preprocessing prints its own counts
    path = Path(ds.path)
    try:
        if path.is_file():
            dataset = _load_files(ds, [str(path)], key)
        elif path.is_dir():
            dataset = _load_folder(ds, path, key)
        elif _looks_like_local_path(ds.path):
            raise DataError(f"{key}.path {ds.path!r}: no such file or folder "
                            f"(relative paths are from {os.getcwd()})")
        else:
            dataset = _load_hub(ds, key)
    except DataError:
        raise
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{key}.split {ds.split!r}: {_first_line(e)}") from None
        raise DataError(f"{key}.path {ds.path!r}: cannot be read: {_first_line(e)}") from None
    except Exception as e:  # pyarrow and datasets raise many types for unreadable files
        raise DataError(f"{key}.path {ds.path!r}: cannot be read ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    if ds.shards is not None:
        dataset = dataset.shard(num_shards=ds.shards, index=ds.shards_idx or 0, contiguous=True)
    return dataset


def source_files(ds: DatasetConfig) -> list[Path]:
    """The local files behind `ds` (empty for a hub dataset); their size and mtime key the cache."""
    path = Path(ds.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        if ds.data_files is not None:
            return [path / f for f in _as_list(ds.data_files)]
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return []


def _load_files(ds: DatasetConfig, files: list[str], key: str) -> datasets.Dataset:
    builder = ds.ds_type or BUILDER_BY_EXTENSION.get(Path(files[0]).suffix.lower())
    if builder is None:
        raise DataError(f"{key}.path {files[0]!r}: cannot tell the file format from its extension; "
                        f"set ds_type to one of {', '.join(sorted(set(BUILDER_BY_EXTENSION.values())))}")
    return datasets.load_dataset(builder, data_files=files, split=ds.split)


def _load_folder(ds: DatasetConfig, path: Path, key: str) -> datasets.Dataset:
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        loaded = datasets.load_from_disk(str(path))  # written by Dataset.save_to_disk
        return loaded[ds.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if ds.data_files is not None:
        files = [str(path / f) for f in _as_list(ds.data_files)]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise DataError(f"{key}.data_files: {missing[0]!r} does not exist")
        return _load_files(ds, files, key)
    if ds.ds_type:
        files = [str(p) for p in source_files(ds)]
        return datasets.load_dataset(ds.ds_type, data_files=files, split=ds.split)
    return datasets.load_dataset(str(path), name=ds.name, split=ds.split)


def _load_hub(ds: DatasetConfig, key: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(ds.path, name=ds.name, split=ds.split, data_files=ds.data_files,
                                     revision=ds.revision)
    except (ConnectionError, OSError) as e:
        raise DataError(f"{key}.path {ds.path!r}: not a local file or folder, and the dataset could "
                        f"not be reached on the hub ({_first_line(e)})") from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"{key}.path {ds.path!r}: not a local file or folder, and not found on the "
                        f"hub ({_first_line(e)})") from None


def _looks_like_local_path(name: str) -> bool:
    """A path with a file extension or a leading ./, / or ~ is never a hub name (org/name)."""
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in BUILDER_BY_EXTENSION


def _as_list(files: str | tuple[str, ...]) -> list[str]:
    return [files] if isinstance(files, str) else list(files)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

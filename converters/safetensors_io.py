"""Reading and writing safetensors files tensor by tensor, bf16 included.

The format is an 8-byte little-endian header length, a JSON header (`{name: {dtype, shape,
data_offsets}}`, optional `__metadata__`), then the raw little-endian bytes. We read through
`np.memmap`, so a tensor's bytes are paged in only when it is converted and a checkpoint is never
held twice in host memory; we write one tensor at a time for the same reason. numpy lacks
bfloat16, so ml_dtypes supplies it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from jaxtune.errors import ConversionError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
SHARD_LIMIT_BYTES = 5 * 10**9  # HF's default max_shard_size of "5GB"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, dtype, shape and byte range."""

    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    def load(self) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until it is used)."""
        count = math.prod(self.shape)
        if self.end - self.start != count * self.dtype.itemsize:
            raise ConversionError(
                f"tensor {self.name} in {self.file}: header says {self.end - self.start} bytes for "
                f"shape {self.shape} {self.dtype}; the file is corrupt")
        if count == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.start, shape=self.shape)


def read_header(file: str) -> dict[str, TensorRef]:
    """The tensors of one safetensors file, by name."""
    try:
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ConversionError(f"{file} is not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > os.path.getsize(file) - 8:
                raise ConversionError(f"{file} is not a safetensors file (header length {header_len} too large)")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read safetensors header of {file}: {e}") from e
    data_start = 8 + header_len
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ConversionError(f"tensor {name} in {file} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        refs[name] = TensorRef(name, file, _DTYPES[info["dtype"]], tuple(info["shape"]),
                               data_start + start, data_start + end)
    return refs


def checkpoint_tensors(folder: str) -> dict[str, TensorRef]:
    """Every tensor of an HF checkpoint folder: `model.safetensors`, or the shards of its index."""
    index = os.path.join(folder, INDEX_NAME)
    single = os.path.join(folder, SINGLE_NAME)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        refs: dict[str, TensorRef] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(folder, shard)
            if not os.path.exists(path):
                raise ConversionError(f"{index} lists shard {shard}, which is missing from {folder}")
            for name, ref in read_header(path).items():
                if name in refs:
                    raise ConversionError(f"tensor {name} appears in both {refs[name].file} and {path}")
                refs[name] = ref
        for name, shard in weight_map.items():
            if name not in refs or os.path.basename(refs[name].file) != shard:
                raise ConversionError(f"{index} maps {name} to {shard}, but that shard does not hold it")
        return refs
    if os.path.exists(single):
        return read_header(single)
    pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
    if pickles:
        raise ConversionError(
            f"{folder} holds only PyTorch pickle weights ({', '.join(sorted(pickles))}); jaxtune reads "
            "safetensors only, since unpickling can run arbitrary code. Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)")
    raise ConversionError(f"no {SINGLE_NAME} or {INDEX_NAME} in {folder}")


def write_file(path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
                produce: Iterator[np.ndarray]) -> None:
    header, offset = {}, 0
    for name, shape, dtype in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), array in zip(tensors, produce, strict=True):
            array = np.ascontiguousarray(array)
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"tensor {name}: produced {array.shape} {array.dtype}, declared {shape} {dtype}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def write_checkpoint(folder: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
                     produce: Iterable[np.ndarray], shard_limit: int = SHARD_LIMIT_BYTES) -> list[str]:
    """Write tensors (declared up front, produced one by one in order) as HF safetensors shards.

    One file is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. Returns the file names written.
    """
    shards: list[list] = [[]]
    size = 0
    for entry in tensors:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > shard_limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    produce = iter(produce)
    for name, shard in zip(names, shards):
        write_file(os.path.join(folder, name), shard, (next(produce) for _ in shard))
    if len(shards) > 1:
        weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
        total = sum(math.prod(t[1]) * t[2].itemsize for t in tensors)
        with open(os.path.join(folder, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names

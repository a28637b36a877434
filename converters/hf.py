"""HF model folder ⇄ (ModelConfig, params pytree).

Reading: `config.json` goes through transformers' own config classes (no torch, no remote code)
and the family's converter turns it into a `ModelConfig`; tensors are read one at a time from
memory-mapped safetensors and checked against the params table (`jaxtune.model.params`): every
HF tensor must be consumed and every shape must match, or a `ConversionError` names the tensor and
the file. Writing is the exact inverse, so HF → jaxtune → HF reproduces every tensor bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Iterator

import jax
import numpy as np
import transformers

from jaxtune.converters.families import family
from jaxtune.converters.safetensors_io import checkpoint_tensors, write_checkpoint
from jaxtune.errors import ConversionError
from jaxtune.model.config import ModelConfig
from jaxtune.model.params import ParamSpec, Path, param_specs

# Buffers some older checkpoints saved that carry no weights (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One HF tensor and the param slot it fills."""

    hf_name: str
    path: Path
    layer: int | None  # index on the stacked `layers` axis, None for unstacked params


def read_json(path: str) -> dict:
    """A JSON file of a checkpoint or adapter folder; a ConversionError naming it if malformed."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def load_hf_config(folder: str) -> tuple[ModelConfig, transformers.PretrainedConfig]:
    """The ModelConfig of an HF folder, and transformers' config object (kept for export)."""
    if not os.path.isdir(folder):
        raise ConversionError(f"model folder {folder} does not exist")
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"no config.json in model folder {folder}")
    raw = read_json(config_path)
    fam = family(raw.get("model_type"), where=config_path)
    try:
        hf = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ConversionError(f"{config_path}: transformers cannot parse it: {e}") from e
    try:
        return fam.model_config(hf), hf
    except (ValueError, TypeError, AttributeError) as e:
        raise ConversionError(f"{config_path}: {e}") from e


def key_table(cfg: ModelConfig) -> list[KeyEntry]:
    """Every HF tensor name `cfg`'s model has, in HF's order, with the param slot it fills."""
    fam = family(cfg.family)
    specs = param_specs(cfg)
    entries = []
    for pattern, path_str in fam.KEYS.items():
        path = tuple(path_str.split("/"))
        if path not in specs:
            continue  # a feature this config does not have (e.g. a bias)
        if "{}" in pattern:
            entries += [KeyEntry(pattern.format(i), path, i) for i in range(cfg.num_layers)]
        else:
            entries.append(KeyEntry(pattern, path, None))
    missing = set(specs) - {e.path for e in entries}
    if missing:  # a params table entry no key table fills: a bug in jaxtune, not user input
        raise AssertionError(f"family {cfg.family} key table misses params {sorted(missing)}")
    return sorted(entries, key=_hf_order)


def _hf_order(entry: KeyEntry) -> tuple:
    return (entry.layer is not None, entry.layer or 0, entry.hf_name)


def hf_shape(spec: ParamSpec, path: Path) -> tuple[int, ...]:
    """The HF tensor shape of one layer's slice of a param (Linear weights are [out, in])."""
    per_layer = spec.shape[1:] if spec.stacked else spec.shape
    if spec.in_ndim is not None:
        return (math.prod(per_layer[spec.in_ndim:]), math.prod(per_layer[:spec.in_ndim]))
    if path[-1] == "bias":
        return (math.prod(per_layer),)
    return per_layer


def to_param_layout(hf_array: np.ndarray, spec: ParamSpec) -> np.ndarray:
    per_layer = spec.shape[1:] if spec.stacked else spec.shape
    if spec.in_ndim is not None:
        hf_array = hf_array.T
    return hf_array.reshape(per_layer)


def to_hf_layout(param_slice: np.ndarray, spec: ParamSpec, path: Path) -> np.ndarray:
    if spec.in_ndim is not None:
        in_size = math.prod(param_slice.shape[:spec.in_ndim])
        return param_slice.reshape(in_size, -1).T
    return param_slice.reshape(hf_shape(spec, path))


def iter_params(folder: str, cfg: ModelConfig, dtype=None) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield `(path, host array)` for each param of the checkpoint in `folder`, one at a time.

    `dtype` None keeps the checkpoint's dtype (bit-exact round trips). Only the param being
    built and memory-mapped pages are resident, never a second copy of the model.
    """
    refs = checkpoint_tensors(folder)
    table = key_table(cfg)
    specs = param_specs(cfg)
    wanted = {e.hf_name for e in table}
    ignored = {n for n in refs if n.endswith(IGNORED_SUFFIXES)}
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in refs
    extra = sorted(set(refs) - wanted - ignored - ({"lm_head.weight"} if tied_head else set()))
    if extra:
        shown = ", ".join(f"{n} (in {os.path.basename(refs[n].file)})" for n in extra[:5])
        raise ConversionError(
            f"{folder}: {len(extra)} tensor(s) the {cfg.family} config does not account for: {shown}"
            f"{' ...' if len(extra) > 5 else ''}")
    missing = sorted(wanted - set(refs))
    if missing:
        raise ConversionError(
            f"{folder}: missing {len(missing)} tensor(s) for a {cfg.num_layers}-layer {cfg.family} model: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    by_path: dict[Path, list[KeyEntry]] = {}
    for entry in table:
        by_path.setdefault(entry.path, []).append(entry)
    for path, entries in by_path.items():
        spec = specs[path]
        out_dtype = np.dtype(dtype) if dtype is not None else refs[entries[0].hf_name].dtype
        out = np.empty(spec.shape, out_dtype)
        for entry in entries:
            ref = refs[entry.hf_name]
            expected = hf_shape(spec, path)
            if ref.shape != expected:
                raise ConversionError(
                    f"tensor {entry.hf_name} in {ref.file} has shape {ref.shape}; the config "
                    f"({os.path.join(folder, 'config.json')}) implies {expected}")
            value = to_param_layout(ref.load(), spec)
            if entry.layer is None:
                out[...] = value
            else:
                out[entry.layer] = value
        yield path, out
    if tied_head:
        _check_tied_head(refs, folder)


def _check_tied_head(refs, folder: str) -> None:
    head, embed = refs["lm_head.weight"], refs["model.embed_tokens.weight"]
    if head.shape != embed.shape or not np.array_equal(head.load(), embed.load()):
        raise ConversionError(
            f"{folder}: config.json sets tie_word_embeddings but lm_head.weight ({head.file}) differs "
            "from model.embed_tokens.weight; set tie_word_embeddings to false to load both")


def save_hf(folder: str, cfg: ModelConfig, params: dict, *, hf_config: transformers.PretrainedConfig | None = None,
            tokenizer_dir: str | None = None, shard_limit: int | None = None) -> list[str]:
    """Write params as an HF folder `AutoModelForCausalLM.from_pretrained` loads.

    `hf_config` (from `load_hf_config`) is written back as it was, so fields jaxtune does not model
    (token ids, ...) survive; without it the family builds one from `cfg`. Tokenizer files are
    copied from `tokenizer_dir`. Tensors keep the params' dtype. Returns the weight files written.
    """
    os.makedirs(folder, exist_ok=True)
    specs = param_specs(cfg)
    flat = {path: _leaf(params, path) for path in specs}
    dtypes = {np.dtype(leaf.dtype) for leaf in flat.values()}
    hf = hf_config if hf_config is not None else family(cfg.family).hf_config(cfg)
    hf.dtype = str(np.dtype(next(iter(dtypes)))) if len(dtypes) == 1 else "float32"
    hf.architectures = [family(cfg.family).ARCHITECTURE]
    hf.save_pretrained(folder)
    transformers.GenerationConfig.from_model_config(hf).save_pretrained(folder)
    table = key_table(cfg)
    declared = [(e.hf_name, hf_shape(specs[e.path], e.path), np.dtype(flat[e.path].dtype)) for e in table]

    def produce():
        for e in table:
            leaf = flat[e.path] if e.layer is None else flat[e.path][e.layer]
            yield to_hf_layout(np.asarray(jax.device_get(leaf)), specs[e.path], e.path)

    kwargs = {} if shard_limit is None else {"shard_limit": shard_limit}
    written = write_checkpoint(folder, declared, produce(), **kwargs)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(folder, name)):
                shutil.copy2(src, folder)
    return written


def _leaf(params: dict, path: Path):
    node = params
    for part in path:
        if not isinstance(node, dict) or part not in node:
            raise ConversionError(f"params have no leaf {'/'.join(path)}")
        node = node[part]
    return node

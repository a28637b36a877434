"""PEFT LoRA adapters in and out, and merged HF export.

An adapter folder is `adapter_config.json` + `adapter_model.safetensors`, with PEFT's tensor names:
`base_model.model.<HF module>.lora_A.weight` `[r, in]`, `...lora_B.weight` `[out, r]`,
`...lora_magnitude_vector` `[out]` (DoRA), and for `modules_to_save` the module's tensors under
their HF names (`base_model.model.model.embed_tokens.weight`). Module names come from the model
family's key table, so every family jaxtune converts has adapters too. `peft.PeftModel` and vLLM's
LoRA loader read what `export_peft` writes; `load_adapter` reads what PEFT writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util

from jaxtune import lora, quant
from jaxtune.converters.hf import hf_shape, key_table, read_json, save_hf, to_hf_layout, to_param_layout
from jaxtune.converters.safetensors_io import write_file, read_header
from jaxtune.errors import ConversionError
from jaxtune.model.config import ModelConfig
from jaxtune.model.params import Path, param_specs

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)
log = logging.getLogger(__name__)

# adapter_config.json fields whose non-default values change the computation in ways jaxtune
# does not implement: field → (its inert values, what it means).
_UNSUPPORTED = {
    "fan_in_fan_out": ((False, None), "fan-in/fan-out weights (GPT-2 Conv1D)"),
    "bias": (("none", None), "trained biases"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "layers_to_transform": ((None, []), "LoRA on a subset of layers"),
    "rank_pattern": (({}, None), "per-module ranks"),
    "alpha_pattern": (({}, None), "per-module alphas"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "target_parameters": ((None, []), "LoRA on raw parameters"),
    "trainable_token_indices": ((None,), "trainable token embeddings"),
    "layer_replication": ((None,), "layer replication"),
    "alora_invocation_tokens": ((None,), "activated LoRA"),
}


def _hf_module(hf_name: str) -> str:
    return hf_name.rpartition(".")[0]


# ---------------------------------------------------------------------------------------------
# Writing

def adapter_config(lora_cfg: lora.LoraConfig, target_modules: list[str],
                   base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json dict PEFT's `LoraConfig` (and vLLM) read."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": target_modules,
        "use_rslora": lora_cfg.use_rslora,
        "use_dora": lora_cfg.use_dora,
        "modules_to_save": list(lora_cfg.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def export_peft(out_dir: str, params: dict, model_cfg: ModelConfig, lora_cfg: lora.LoraConfig, *,
                base_model_name_or_path: str | None = None) -> list[str]:
    """Write `params`' adapters (and `modules_to_save` params) as a PEFT adapter folder.

    Tensors keep their dtype (float32 master weights from the trainer). Returns the files written.
    """
    specs = param_specs(model_cfg)
    flat = traverse_util.flatten_dict(params)
    adapters = {p: leaf for p, leaf in flat.items() if isinstance(leaf, lora.LoRA)}
    if not adapters:
        raise ConversionError("params hold no LoRA adapter to export; use the merged format for a full fine-tune")
    for path, leaf in adapters.items():  # adapter_config.json must describe the tensors written
        if (leaf.rank, leaf.scale, leaf.magnitude is not None) != (lora_cfg.r, lora_cfg.scale, lora_cfg.use_dora):
            raise ConversionError(
                f"the LoRA on {'/'.join(path)} has r={leaf.rank}, scale={leaf.scale}, DoRA={leaf.magnitude is not None}; "
                f"the LoraConfig being exported says r={lora_cfg.r}, scale={lora_cfg.scale}, DoRA={lora_cfg.use_dora}")
    saved = set(lora.modules_to_save_paths(lora_cfg, model_cfg))
    declared: list[tuple[str, tuple[int, ...], np.dtype]] = []
    producers = []
    targets = set()
    for entry in key_table(model_cfg):
        if entry.path in adapters:
            leaf, module = adapters[entry.path], _hf_module(entry.hf_name)
            targets.add(module.rpartition(".")[2])
            r, in_size = leaf.rank, math.prod(leaf.a.shape[1:-1])
            out_size = math.prod(leaf.b.shape[2:])
            declared.append((f"{PREFIX}{module}.lora_A.weight", (r, in_size), np.dtype(leaf.a.dtype)))
            producers.append(lambda leaf=leaf, i=entry.layer: _host(leaf.a[i]).reshape(-1, leaf.rank).T)
            declared.append((f"{PREFIX}{module}.lora_B.weight", (out_size, r), np.dtype(leaf.b.dtype)))
            producers.append(lambda leaf=leaf, i=entry.layer: _host(leaf.b[i]).reshape(leaf.rank, -1).T)
            if leaf.magnitude is not None:
                declared.append((f"{PREFIX}{module}.lora_magnitude_vector", (out_size,), np.dtype(leaf.magnitude.dtype)))
                producers.append(lambda leaf=leaf, i=entry.layer: _host(leaf.magnitude[i]).reshape(-1))
        elif entry.path in saved:
            value, spec = flat[entry.path], specs[entry.path]
            declared.append((PREFIX + entry.hf_name, hf_shape(spec, entry.path), np.dtype(value.dtype)))
            producers.append(lambda v=value, s=spec, e=entry: to_hf_layout(
                _host(v if e.layer is None else v[e.layer]), s, e.path))
    os.makedirs(out_dir, exist_ok=True)
    config = adapter_config(lora_cfg, sorted(targets), base_model_name_or_path)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    write_file(os.path.join(out_dir, WEIGHTS_NAME), declared, (np.ascontiguousarray(p()) for p in producers))
    return [CONFIG_NAME, WEIGHTS_NAME]


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------------------------
# Reading

def read_adapter_config(folder: str) -> tuple[lora.LoraConfig, dict]:
    """The LoraConfig of a PEFT adapter folder and its raw JSON, or a ConversionError saying what
    is missing or unsupported, naming the file."""
    if not os.path.isdir(folder):
        raise ConversionError(f"adapter folder {folder} does not exist")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(path):
        hint = " (it looks like a model folder, not an adapter)" if os.path.exists(os.path.join(folder, "config.json")) else ""
        raise ConversionError(f"no {CONFIG_NAME} in adapter folder {folder}{hint}")
    raw = read_json(path)
    if raw.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type is {raw.get('peft_type')!r}; jaxtune reads LORA adapters only")
    for key, (inert, meaning) in _UNSUPPORTED.items():
        if key in raw and raw[key] not in inert:
            raise ConversionError(f"{path}: {key}={raw[key]!r} ({meaning}) is not supported")
    targets = raw.get("target_modules") or ()
    try:
        cfg = lora.LoraConfig(
            r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout") or 0.0),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            modules_to_save=tuple(raw.get("modules_to_save") or ()),
            use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)))
    except KeyError as e:
        raise ConversionError(f"{path} has no {e.args[0]!r} field") from e
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from e
    return cfg, raw


_ADAPTER_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(\.weight)?)")


def load_adapter(folder: str, params: dict, model_cfg: ModelConfig) -> tuple[dict, lora.LoraConfig]:
    """Put the PEFT adapter in `folder` on `params` (dense or quantised bases).

    Returns the params with LoRA leaves on every adapted kernel and the adapter's
    `modules_to_save` tensors in place of the base's, and the adapter's LoraConfig (to continue
    training with the same settings). The tensors decide what is adapted; every adapted module
    must be present in every layer with shapes that fit the base, or a ConversionError names the
    tensor and the file.
    """
    cfg, raw = read_adapter_config(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(weights):
        pickles = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(folder, f))]
        if pickles:
            raise ConversionError(f"{folder} holds only a pickled adapter ({pickles[0]}); jaxtune reads safetensors "
                                  "only. Re-save it with PeftModel.save_pretrained(out, safe_serialization=True)")
        raise ConversionError(f"no {WEIGHTS_NAME} in adapter folder {folder}")
    refs = read_header(weights)
    specs = param_specs(model_cfg)
    by_hf_name = {e.hf_name: e for e in key_table(model_cfg)}
    by_module = {_hf_module(e.hf_name): e for e in by_hf_name.values() if e.hf_name.endswith(".weight")}
    parts: dict[Path, dict[str, dict[int, np.ndarray]]] = {}
    shown: dict[Path, str] = {}  # how to name a param in messages: its PEFT module, layer as *
    saved: dict[Path, dict[int | None, np.ndarray]] = {}
    for name, ref in refs.items():
        if not name.startswith(PREFIX):
            raise ConversionError(f"tensor {name} in {weights} is not a PEFT causal-LM adapter tensor "
                                  f"(names start with {PREFIX!r})")
        key = name[len(PREFIX):]
        if ".lora_embedding_" in key:
            raise ConversionError(f"tensor {name} in {weights}: LoRA on embeddings is not supported")
        match = _ADAPTER_KEY.fullmatch(key)
        if match:
            entry = by_module.get(match["module"])
            if entry is None or entry.layer is None:
                raise ConversionError(
                    f"tensor {name} in {weights} adapts {match['module']}, which is not a decoder-layer projection "
                    f"of this {model_cfg.num_layers}-layer {model_cfg.family} model")
            part = match["part"].split(".")[0]
            shown[entry.path] = PREFIX + match["module"].replace(f".{entry.layer}.", ".*.", 1)
            parts.setdefault(entry.path, {}).setdefault(part, {})[entry.layer] = _checked(
                ref, _expected_shape(part, specs[entry.path], cfg.r, entry.path), weights)
        elif key in by_hf_name:
            entry = by_hf_name[key]
            spec = specs[entry.path]
            value = _checked(ref, hf_shape(spec, entry.path), weights)
            saved.setdefault(entry.path, {})[entry.layer] = to_param_layout(value, spec)
            shown[entry.path] = PREFIX + (key if entry.layer is None else key.replace(f".{entry.layer}.", ".*.", 1))
        elif key in ("lm_head.weight", "model.embed_tokens.weight") and model_cfg.tie_word_embeddings:
            raise ConversionError(f"tensor {name} in {weights}: a trained {key.split('.')[-2]} copy (modules_to_save) "
                                  "on a model with tied embeddings is not supported")
        else:
            raise ConversionError(f"tensor {name} in {weights} matches no module of this {model_cfg.family} model")
    if not parts:
        raise ConversionError(f"{weights} holds no lora_A/lora_B tensors")
    flat = traverse_util.flatten_dict(params)
    for path, got in parts.items():
        flat[path] = _adapter_leaf(shown[path], got, flat.get(path), cfg, specs[path], model_cfg, weights)
    for path, values in saved.items():
        flat[path] = _assemble(shown[path], values, specs[path], model_cfg, weights)
    targets = sorted({p[-2] for p in parts})
    cfg = lora.LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=tuple(targets),
                          modules_to_save=cfg.modules_to_save, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    return traverse_util.unflatten_dict(flat), cfg


def _expected_shape(part: str, spec, r: int, path: Path) -> tuple[int, ...]:
    out_size, in_size = hf_shape(spec, path)
    return {"lora_A": (r, in_size), "lora_B": (out_size, r), "lora_magnitude_vector": (out_size,)}[part]


def _checked(ref, expected: tuple[int, ...], file: str) -> np.ndarray:
    if ref.shape != expected:
        raise ConversionError(f"tensor {ref.name} in {file} has shape {ref.shape}; the base model needs {expected} "
                              "(an adapter for a different model, or a rank that disagrees with adapter_config.json's r)")
    return np.array(ref.load())


def _stacked(name: str, part: str, by_layer: dict[int, np.ndarray], model_cfg: ModelConfig, file: str) -> list:
    missing = [i for i in range(model_cfg.num_layers) if i not in by_layer]
    if missing:
        raise ConversionError(f"{file}: {name} has {part} for layers {sorted(by_layer)} but not {missing}; "
                              "jaxtune needs an adapted module in every layer")
    return [by_layer[i] for i in range(model_cfg.num_layers)]


def _adapter_leaf(name: str, got: dict, base, cfg: lora.LoraConfig, spec, model_cfg: ModelConfig, file: str):
    if base is None or isinstance(base, lora.LoRA):
        raise ConversionError(f"{file}: the params have no plain base for {name}")
    for part in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if cfg.use_dora else ()):
        if part not in got:
            raise ConversionError(f"{file}: {name} has no {part} tensors")
    if "lora_magnitude_vector" in got and not cfg.use_dora:
        raise ConversionError(f"{file} has lora_magnitude_vector tensors but adapter_config.json has use_dora false")
    in_shape, out_shape = spec.shape[1:1 + spec.in_ndim], spec.shape[1 + spec.in_ndim:]
    a = np.stack([x.T.reshape(*in_shape, cfg.r) for x in _stacked(name, "lora_A", got["lora_A"], model_cfg, file)])
    b = np.stack([x.T.reshape(cfg.r, *out_shape) for x in _stacked(name, "lora_B", got["lora_B"], model_cfg, file)])
    magnitude = None
    if cfg.use_dora:
        magnitude = jnp.asarray(np.stack([x.reshape(out_shape) for x in _stacked(
            name, "lora_magnitude_vector", got["lora_magnitude_vector"], model_cfg, file)]))
    return lora.LoRA(base=base, a=jnp.asarray(a), b=jnp.asarray(b), magnitude=magnitude, dropout_key=None,
                     scale=cfg.scale, dropout=cfg.dropout)


def _assemble(name: str, values: dict, spec, model_cfg: ModelConfig, file: str) -> jax.Array:
    if not spec.stacked:
        return jnp.asarray(values[None])
    return jnp.asarray(np.stack(_stacked(name, "tensors", values, model_cfg, file)))


# ---------------------------------------------------------------------------------------------
# Merged export

QLORA_NOTE = (
    "Merged from a QLoRA run: the NF4/int8 base was dequantised and the LoRA update added in float32, "
    "then saved in {dtype}. Quantising this model again (load_in_4bit / load_in_8bit) rounds the merged "
    "weights to a new grid, so its outputs will differ from the trained model's (quantised base + adapter).")


def export_merged(out_dir: str, params: dict, model_cfg: ModelConfig, *, dtype=None,
                  hf_config: transformers.PretrainedConfig | None = None, tokenizer_dir: str | None = None) -> list[str]:
    """Write an HF model folder with every adapter merged (`W + s·BA`; DoRA as PEFT merges it) and
    every quantised base dequantised, in `dtype` (default: each base's own dtype).

    For a quantised base, writes the note above to `README.md` (if the folder has none) and logs
    it. Returns the files written.
    """
    quantised = any(quant.is_quantized(leaf) or (isinstance(leaf, lora.LoRA) and quant.is_quantized(leaf.base))
                    for leaf in traverse_util.flatten_dict(params).values())
    merged = lora.merge(params, dtype)
    written = save_hf(out_dir, model_cfg, merged, hf_config=hf_config, tokenizer_dir=tokenizer_dir)
    if quantised:
        leaves = jax.tree.leaves(merged)
        note = QLORA_NOTE.format(dtype=jnp.dtype(dtype).name if dtype is not None else jnp.dtype(leaves[0].dtype).name)
        log.warning(note)
        readme = os.path.join(out_dir, "README.md")
        if not os.path.exists(readme):
            with open(readme, "w") as f:
                f.write(note + "\n")
            written.append("README.md")
    return written

"""The model a run trains: base weights placed on the mesh, quantised and/or given LoRA adapters,
and which leaves are trainable. Shared by `train` and `export`, which must rebuild the same
params structure to restore a checkpoint.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh

from jaxtune import lora, quant
from jaxtune.config import Config
from jaxtune.converters.hf import iter_params, load_hf_config
from jaxtune.converters.peft import load_adapter
from jaxtune.model.config import ModelConfig
from jaxtune.sharding import MeshAxes, tree_shardings
from jaxtune.train.placement import place_params


@dataclasses.dataclass
class ModelSetup:
    model_cfg: ModelConfig
    hf_config: object  # transformers config of the base, written back on export
    params: dict  # full params pytree, placed on the mesh
    mask: dict  # bool per array leaf: trainable?
    shardings: dict  # NamedSharding per array leaf of params
    lora_cfg: lora.LoraConfig | None


def lora_config(cfg: Config) -> lora.LoraConfig:
    return lora.LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules, target_linear=cfg.lora_target_linear,
                           modules_to_save=cfg.lora_modules_to_save, use_rslora=cfg.peft_use_rslora,
                           use_dora=cfg.peft_use_dora)


def quant_config(cfg: Config) -> quant.QuantConfig | None:
    if cfg.load_in_4bit:
        return quant.QuantConfig(bits=4, double_quant=cfg.bnb_4bit_use_double_quant)
    if cfg.load_in_8bit:
        return quant.QuantConfig(bits=8)
    return None


def build_model(cfg: Config, mesh: Mesh, rules: dict[str, MeshAxes], compute_dtype) -> ModelSetup:
    """Load `base_model` into its shards. Full fine-tune: params in `param_dtype` (the float32
    master copy), all trainable. LoRA/QLoRA: frozen bases in the compute dtype (or NF4/int8,
    quantised tensor by tensor while loading), adapters new or from `lora_model_dir`."""
    model_cfg, hf_config = load_hf_config(cfg.base_model_config)
    if cfg.adapter is None:
        dtype = jnp.float32 if cfg.param_dtype == "float32" else jnp.bfloat16
        params = place_params(model_cfg, mesh, rules, iter_params(cfg.base_model, model_cfg, dtype=dtype))
        shardings = jax.tree.map(lambda x: x.sharding, params)
        return ModelSetup(model_cfg, hf_config, params, jax.tree.map(lambda _: True, params), shardings, None)

    host = iter_params(cfg.base_model, model_cfg, dtype=compute_dtype)
    qcfg = quant_config(cfg)
    if qcfg is not None:
        # Quantised on device slice by slice, then moved to their shards below.
        params = traverse_util.unflatten_dict(dict(quant.quantize_stream(host, model_cfg, qcfg)))
    else:
        params = place_params(model_cfg, mesh, rules, host)
    if cfg.lora_model_dir:
        params, lcfg = load_adapter(cfg.lora_model_dir, params, model_cfg)
    else:
        lcfg = lora_config(cfg)
        params = lora.apply(params, lcfg, model_cfg, jax.random.key(cfg.seed))
    shardings = tree_shardings(lora.logical_axes(params, model_cfg), params, mesh, rules)
    params = jax.device_put(params, shardings)
    return ModelSetup(model_cfg, hf_config, params, lora.trainable_mask(params, lcfg), shardings, lcfg)

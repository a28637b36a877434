"""`load_pretrained`: an HF model folder as a callable JAX model."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import transformers
from flax import traverse_util

from jaxtune.model.config import ModelConfig
from jaxtune.model.transformer import forward

if TYPE_CHECKING:
    from jaxtune.lora import LoraConfig


@dataclasses.dataclass
class PretrainedModel:
    """A model config, its params pytree, and a jitted forward pass."""

    config: ModelConfig
    params: dict
    hf_config: transformers.PretrainedConfig | None = None  # written back on export
    path: str | None = None
    compute_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    adapter_config: LoraConfig | None = None  # set when a PEFT adapter was loaded on top

    def __call__(self, input_ids, segment_ids=None, positions=None) -> jax.Array:
        """float32 logits `[B, S, V]` for int token ids `[B, S]`.

        `segment_ids` `[B, S]` packs several sequences in a row (tokens attend only within their
        segment); `positions` `[B, S]` are their RoPE positions (default 0..S-1).
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        positions = None if positions is None else jnp.asarray(positions, jnp.int32)
        return _jitted_forward(self.config, jnp.dtype(self.compute_dtype), self.attention)(
            self.params, input_ids, segment_ids, positions)

    def save(self, folder: str, tokenizer_dir: str | None = None) -> list[str]:
        """Write an HF folder (config, generation config, safetensors, tokenizer files); an adapter
        loaded on top is merged into the weights."""
        from jaxtune.converters.peft import export_merged

        return export_merged(folder, self.params, self.config, hf_config=self.hf_config,
                             tokenizer_dir=tokenizer_dir if tokenizer_dir is not None else self.path)


@functools.cache
def _jitted_forward(cfg: ModelConfig, dtype, attention: str):
    def run(params, input_ids, segment_ids, positions):
        return forward(params, cfg, input_ids, segment_ids=segment_ids, positions=positions,
                       dtype=dtype, attention=attention)

    return jax.jit(run)


def load_pretrained(path: str, dtype: str | None = "float32", adapter: str | None = None, *,
                    compute_dtype: str | None = None, attention: str = "xla") -> PretrainedModel:
    """Load an HF model folder (`config.json` + safetensors) as a `PretrainedModel`.

    `dtype` is the params' dtype (None keeps the checkpoint's); `compute_dtype` defaults to it.
    `adapter` is a PEFT LoRA adapter folder applied on top (its weights keep their own dtype).
    Params are placed on the default device one tensor at a time. Raises `ConversionError` naming
    the file or tensor for anything that does not fit.
    """
    from jaxtune.converters.hf import iter_params, load_hf_config

    cfg, hf = load_hf_config(path)
    flat = {p: jax.device_put(array) for p, array in iter_params(path, cfg, dtype=dtype)}
    params = traverse_util.unflatten_dict(flat)
    first = next(iter(flat.values()))
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else jnp.dtype(first.dtype)
    adapter_config = None
    if adapter is not None:
        from jaxtune.converters.peft import load_adapter

        params, adapter_config = load_adapter(adapter, params, cfg)
    return PretrainedModel(config=cfg, params=params, hf_config=hf, path=path, compute_dtype=compute,
                           attention=attention, adapter_config=adapter_config)

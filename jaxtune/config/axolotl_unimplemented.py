"""Axolotl keys that jaxtune does not implement, and what happens when a config sets one.

The rule: a key that would change *what is trained* (the data, the objective, the model, which
parameters move, the update) is an error, so a migrated config never silently trains something
else. A key that changes only *how* it runs or what is reported (kernels, launchers, trackers,
data-loader workers) is a warning. A key counts as set when its value is not null, false, zero or
empty, so `flash_attention: false` or `deepspeed: null` pass without a word.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxtune.config.problems import Problem

# key -> why it is refused. Each changes the data, the objective, the model or the update.
CHANGES_TRAINING = {
    "rl": "preference/RL training (DPO, KTO, ORPO, GRPO) is not implemented",
    "rl_beta": "preference training is not implemented",
    "orpo_alpha": "ORPO is not implemented",
    "simpo_gamma": "SimPO is not implemented",
    "cpo_alpha": "CPO is not implemented",
    "trl": "TRL trainers are not implemented",
    "reward_model": "reward-model training is not implemented",
    "process_reward_model": "reward-model training is not implemented",
    "num_labels": "classification heads are not implemented",
    "neftune_noise_alpha": "NEFTune embedding noise is not implemented",
    "noisy_embedding_alpha": "NEFTune embedding noise is not implemented",
    "pretraining_dataset": "streaming pre-training data is not implemented; use datasets: with type completion",
    "min_sample_len": "a minimum row length filter is not implemented",
    "max_prompt_len": "prompt-length filtering is not implemented",
    "dataset_exact_deduplication": "deduplication is not implemented",
    "dataset_shard_num": "dataset sharding by config is not implemented; use shards: in the dataset entry",
    "dataset_shard_idx": "dataset sharding by config is not implemented; use shards_idx: in the dataset entry",
    "chat_template_kwargs": "extra template variables are not implemented",
    "default_system_message": "a default system message is not implemented; put it in the data or template",
    "train_on_eot": "train_on_eot is not implemented; train_on_eos decides end-of-turn labels",
    "added_tokens_overrides": "renaming existing tokens is not implemented",
    "resize_token_embeddings_to_32x": "padding the vocabulary to a multiple of 32 is not implemented",
    "mean_resizing_embeddings": "mean-initialised new embeddings are not implemented",
    "shrink_embeddings": "shrinking embeddings is not implemented",
    "fix_untrained_tokens": "re-initialising untrained tokens is not implemented",
    "tokenizer_legacy": "the legacy Llama tokenizer mode is not implemented",
    "processor_type": "multimodal models are not implemented",
    "processor_config": "multimodal models are not implemented",
    "revision_of_model": "loading a model revision is not implemented; download that revision to a folder",
    "model_revision": "loading a model revision is not implemented; download that revision to a folder",
    "model_config": "model config overrides are not implemented",
    "overrides_of_model_config": "model config overrides are not implemented",
    "rope_scaling": "RoPE scaling overrides are not implemented; the model's config.json decides",
    "rope_theta": "RoPE overrides are not implemented; the model's config.json decides",
    "s2_attention": "shifted-sparse attention is not implemented (it changes the attention pattern)",
    "bfloat16": "loading weights in bf16 without mixed precision is not implemented; use param_dtype: bfloat16",
    "float16": "loading weights in fp16 is not implemented",
    "gptq": "GPTQ bases are not implemented; use adapter: qlora",
    "model_quantization_config": "quantized bases other than NF4 are not implemented",
    "qat": "quantization-aware training is not implemented",
    "quantization": "quantization-aware training is not implemented",
    "bnb_config_kwargs": "set the top-level bnb_4bit_* keys instead",
    "peft": "a PEFT config block is not implemented; use the lora_* keys",
    "peft_layers_to_transform": "LoRA on a subset of layers is not implemented",
    "layers_to_transform": "LoRA on a subset of layers is not implemented",
    "peft_layers_pattern": "LoRA on a subset of layers is not implemented",
    "lora_target_parameters": "LoRA on raw parameters is not implemented",
    "peft_init_lora_weights": "other LoRA initialisations are not implemented",
    "lora_fan_in_fan_out": "fan-in/fan-out LoRA layout (GPT-2 Conv1D) is not implemented",
    "loraplus_lr_ratio": "LoRA+ learning rates are not implemented",
    "loraplus_lr_embedding": "LoRA+ learning rates are not implemented",
    "unfrozen_parameters": "training a chosen subset of parameters is not implemented",
    "embedding_lr": "a separate embedding learning rate is not implemented",
    "embedding_lr_scale": "a separate embedding learning rate is not implemented",
    "lr_groups": "parameter-group learning rates are not implemented",
    "lr_scheduler_kwargs": "scheduler arguments are not implemented",
    "lr_quadratic_warmup": "quadratic warmup is not implemented",
    "lr_div_factor": "the one-cycle schedule is not implemented",
    "cosine_constant_lr_ratio": "a constant phase in the cosine schedule is not implemented",
    "optim_args": "optimizer arguments are not implemented",
    "optim_target_modules": "optimizer target modules are not implemented",
    "batch_size": "set gradient_accumulation_steps instead (global batch = micro_batch_size x devices x accumulation)",
    "early_stopping_patience": "early stopping is not implemented (it changes when training stops)",
    "load_best_model_at_end": "keeping the best checkpoint instead of the last is not implemented",
    "sequence_parallel_degree": "renamed: use context_parallel_size (or mesh.sequence)",
}
# key prefix -> why refused
CHANGES_TRAINING_PREFIXES = {
    "dpo_": "DPO is not implemented",
    "kto_": "KTO is not implemented",
    "grpo_": "GRPO is not implemented",
    "relora_": "ReLoRA is not implemented",
    "lisa_": "LISA layer sampling is not implemented",
    "kd_": "knowledge distillation is not implemented",
    "gptq_": "GPTQ bases are not implemented",
}

# key -> what jaxtune does instead. Each changes only speed, memory or reporting.
COSMETIC = {
    "deepspeed": "jaxtune shards with `mesh:` (fsdp is ZeRO-3); the DeepSpeed config is ignored",
    "fsdp": "jaxtune shards with `mesh:` (set mesh.fsdp); the FSDP settings are ignored",
    "fsdp_config": "jaxtune shards with `mesh:` (set mesh.fsdp); the FSDP settings are ignored",
    "fsdp_version": "jaxtune shards with `mesh:`; ignored",
    "flash_attention": "jaxtune picks its attention kernel with `attention:`; ignored",
    "sdp_attention": "jaxtune picks its attention kernel with `attention:`; ignored",
    "xformers_attention": "jaxtune picks its attention kernel with `attention:`; ignored",
    "flex_attention": "jaxtune picks its attention kernel with `attention:`; ignored",
    "eager_attention": "jaxtune picks its attention kernel with `attention:`; ignored",
    "attn_implementation": "jaxtune picks its attention kernel with `attention:`; ignored",
    "flash_optimum": "ignored (PyTorch-only optimisation)",
    "cut_cross_entropy": "ignored (PyTorch kernel; the loss is the same)",
    "chunked_cross_entropy": "ignored (PyTorch kernel; the loss is the same)",
    "torch_compile": "ignored: jaxtune's train step is always compiled by XLA",
    "torch_compile_backend": "ignored: jaxtune's train step is always compiled by XLA",
    "torch_compile_mode": "ignored: jaxtune's train step is always compiled by XLA",
    "torch_dtype": "ignored: bf16/fp16 and param_dtype decide dtypes",
    "activation_offloading": "ignored: use remat_policy to trade memory for compute",
    "layer_offloading": "ignored: use remat_policy to trade memory for compute",
    "lora_mlp_kernel": "ignored (Triton LoRA kernels in PyTorch; the math is the same)",
    "lora_qkv_kernel": "ignored (Triton LoRA kernels in PyTorch; the math is the same)",
    "lora_o_kernel": "ignored (Triton LoRA kernels in PyTorch; the math is the same)",
    "lora_on_cpu": "ignored",
    "plugins": "ignored: Axolotl plugins do not run in jaxtune",
    "strict": "ignored",
    "debug": "ignored: use python -m jaxtune.preprocess --inspect N",
    "local_rank": "ignored: jaxtune reads the process index from JAX",
    "world_size": "ignored: jaxtune reads the device count from JAX",
    "ddp": "ignored: data parallelism is mesh.data / mesh.fsdp",
    "ddp_timeout": "ignored",
    "ddp_bucket_cap_mb": "ignored",
    "ddp_broadcast_buffers": "ignored",
    "ddp_find_unused_parameters": "ignored",
    "device_map": "ignored: the mesh places parameters",
    "max_memory": "ignored",
    "gpu_memory_limit": "ignored",
    "low_cpu_mem_usage": "ignored: weights are always loaded tensor by tensor",
    "dataset_processes": "ignored: tokenisation uses the tokenizer's own threads",
    "dataset_num_proc": "ignored: tokenisation uses the tokenizer's own threads",
    "dataset_keep_in_memory": "ignored",
    "dataloader_num_workers": "ignored: the grain loader prefetches in threads",
    "dataloader_pin_memory": "ignored",
    "dataloader_prefetch_factor": "ignored",
    "dataloader_drop_last": "ignored: incomplete final batches are dropped",
    "remove_unused_columns": "ignored",
    "streaming": "ignored: datasets are tokenized and cached up front",
    "skip_prepare_dataset": "ignored: the cache in dataset_prepared_path is reused when it matches",
    "push_dataset_to_hub": "ignored: nothing is uploaded",
    "hf_use_auth_token": "ignored: nothing is downloaded at run time",
    "group_by_length": "ignored: rows are drawn in seeded random order (use sample_packing for efficiency)",
    "curriculum_sampling": "ignored: set shuffle_merged_datasets: false for file order",
    "shuffle_before_merging_datasets": "ignored: shuffle_merged_datasets decides the order",
    "sample_packing_sequentially": "ignored: packing is best-fit decreasing",
    "sample_packing_eff_est": "ignored: packing efficiency is measured and printed",
    "sample_packing_bin_size": "ignored",
    "sample_packing_group_size": "ignored",
    "multipack_real_batches": "ignored",
    "batch_flattening": "ignored: use sample_packing",
    "eval_sample_packing": "ignored: evaluation rows are packed like training rows (same loss)",
    "pretrain_multipack_attn": "ignored",
    "pretrain_multipack_buffer_size": "ignored",
    "total_num_tokens": "ignored: counted during preprocessing",
    "total_supervised_tokens": "ignored: counted during preprocessing",
    "eval_batch_size": "ignored: evaluation uses micro_batch_size",
    "auto_find_batch_size": "ignored: an out-of-memory error stops the run instead",
    "eval_table_size": "ignored",
    "eval_max_new_tokens": "ignored",
    "do_causal_lm_eval": "ignored",
    "eval_causal_lm_metrics": "ignored",
    "do_bench_eval": "ignored",
    "bench_dataset": "ignored",
    "metric_for_best_model": "ignored",
    "greater_is_better": "ignored",
    "save_safetensors": "ignored: adapters and models are always safetensors",
    "save_only_model": "ignored: checkpoints always hold what resuming needs",
    "save_first_step": "ignored",
    "merge_lora": "use python -m jaxtune.export --format merged",
    "include_tokens_per_second": "ignored: tokens_per_second is always logged",
    "profiler_steps": "ignored",
    "gc_steps": "ignored",
    "tokenizer_use_fast": "ignored: jaxtune always uses the fast tokenizer",
    "tokenizer_padding_side": "ignored: padding is masked by segment ids",
    "tokenizer_save_jinja_files": "ignored",
    "embeddings_skip_upcast": "ignored",
    "is_llama_derived_model": "ignored: the family is read from config.json",
    "is_mistral_derived_model": "ignored: the family is read from config.json",
    "is_qwen_derived_model": "ignored: the family is read from config.json",
    "is_falcon_derived_model": "ignored: the family is read from config.json",
    "heads_k_stride": "ignored",
    "ring_attn_func": "ignored: ring attention runs jaxtune's kernel",
    "use_ray": "ignored",
    "use_mlflow": "ignored: metrics go to output_dir/metrics.jsonl",
    "use_comet": "ignored: metrics go to output_dir/metrics.jsonl",
    "wandb_mode": "ignored",
    "wandb_run_id": "ignored",
}
# The same two verdicts for keys of a `datasets:` entry.
DATASET_CHANGES_TRAINING = {
    "conversation": "FastChat conversation templates are not implemented; use type: chat_template",
    "field_human": "old sharegpt field names are not implemented; use message_property_mappings",
    "field_model": "old sharegpt field names are not implemented; use message_property_mappings",
    "field_tools": "tool definitions in the template are not implemented",
    "field_thinking": "reasoning fields are not implemented",
    "template_thinking_key": "reasoning fields are not implemented",
    "split_thinking": "splitting reasoning out of content is not implemented",
    "message_field_training_detail": "per-character training spans are not implemented",
    "input_transform": "input transforms are not implemented",
    "input_format": "input formats are not implemented",
    "logprobs_field": "distillation is not implemented",
    "temperature": "distillation is not implemented",
}
DATASET_COSMETIC = {
    "preprocess_shards": "ignored: preprocessing is one pass",
}
COSMETIC_PREFIXES = {
    "unsloth_": "ignored (Unsloth kernels; the math is the same)",
    "liger_": "ignored (Liger kernels; the math is the same)",
    "flash_attn_": "ignored (FlashAttention fusions; the math is the same)",
    "mlflow_": "ignored: metrics go to output_dir/metrics.jsonl",
    "comet_": "ignored: metrics go to output_dir/metrics.jsonl",
    "swanlab_": "ignored: metrics go to output_dir/metrics.jsonl",
    "ray_": "ignored",
    "hub_": "ignored: nothing is uploaded",
    "ddp_": "ignored",
}


def is_set(value: Any) -> bool:
    """Whether a value asks for the feature (null, false, 0 and empty containers do not)."""
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value) > 0
    return True


def classify(key: str, dataset_entry: bool = False) -> tuple[str, str] | None:
    """("error" | "warning", reason) for an Axolotl key jaxtune does not implement, else None."""
    if dataset_entry:
        if key in DATASET_CHANGES_TRAINING:
            return "error", DATASET_CHANGES_TRAINING[key]
        if key in DATASET_COSMETIC:
            return "warning", DATASET_COSMETIC[key]
        return None
    if key in CHANGES_TRAINING:
        return "error", CHANGES_TRAINING[key]
    if key in COSMETIC:
        return "warning", COSMETIC[key]
    for prefix, reason in CHANGES_TRAINING_PREFIXES.items():
        if key.startswith(prefix):
            return "error", reason
    for prefix, reason in COSMETIC_PREFIXES.items():
        if key.startswith(prefix):
            return "warning", reason
    return None


def screen(raw: Mapping, known: set[str], where: str = "",
           dataset_entry: bool = False) -> tuple[dict, list[Problem]]:
    """Remove unimplemented Axolotl keys from `raw`; an error or warning for each that is set.

    Keys in `known` (the schema's own) are left alone, so a name can never be both a field and
    unimplemented. `dataset_entry` selects the table for keys of one `datasets:` entry.
    """
    kept, problems = {}, []
    for key, value in raw.items():
        verdict = (classify(key, dataset_entry) if isinstance(key, str) and key not in known
                   else None)
        if verdict is None:
            kept[key] = value
            continue
        severity, reason = verdict
        if key == "plugins" and is_set(value):
            severity, reason = _plugins_verdict(value)
        if is_set(value):
            name = f"{where}.{key}" if where else key
            if severity == "error":
                reason = f"Axolotl key not implemented in jaxtune and it would change what is trained: {reason}"
            else:
                reason = f"Axolotl key not implemented in jaxtune: {reason}"
            problems.append(Problem(name, reason, severity))
    return kept, problems


def _plugins_verdict(plugins: Any) -> tuple[str, str]:
    """Kernel-only plugins (Liger, cut cross-entropy) are cosmetic; any other plugin may not be."""
    names = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    kernel_only = ("liger", "cut_cross_entropy")
    unknown = [str(n) for n in names if not any(k in str(n).lower() for k in kernel_only)]
    if unknown:
        return "error", f"plugins {unknown} may change training and do not run in jaxtune"
    return "warning", "ignored: kernel plugins (Liger, cut cross-entropy) compute the same loss"

"""The run config: every key a fine-tune reads, with Axolotl's names, meanings and defaults.

One frozen dataclass, flat like an Axolotl YAML, so a migrated config needs no edits. Each field
carries a one-line description in its metadata (`help`); `python -m jaxtune.validate` prints the
resolved values. Values derived from other keys (the tokenizer path, the mesh from
`tensor_parallel_size`, the remat policy from `gradient_checkpointing`, the LoRA targets from
`lora_target_linear`) are filled in by `jaxtune.config.load.resolve`, so later stages read one
field and never re-derive anything. Cross-field rules live in `Config.problems`, checked on
construction. Axolotl keys that jaxtune does not implement are not fields here: see
`jaxtune.config.axolotl_unimplemented`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from jaxtune.config.dataset_schema import DatasetConfig, chat_template_problems
from jaxtune.config.problems import ConfigProblems, Problem, did_you_mean

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
# Logical names of param and activation dimensions (DESIGN.md, invariant 3): the keys of
# `jaxtune.sharding.DEFAULT_RULES` (a test keeps the two equal; importing it here would pull in jax).
LOGICAL_AXES = ("layers", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "lora_rank",
                "act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_TO_SAVE = ("embed_tokens", "lm_head")
# Optimizer names accepted, by the update rule they run. Axolotl's 8-bit and paged AdamW variants
# run as AdamW with float32 state: the same update, only more memory (a warning says so).
OPTIMIZERS = {
    "adamw_torch_fused": "adamw", "adamw_torch": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "paged_adamw_32bit": "adamw", "adamw_bnb_8bit": "adamw", "adamw_8bit": "adamw",
    "paged_adamw_8bit": "adamw", "adafactor": "adafactor", "sgd": "sgd", "lion_pytorch": "lion",
}
EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
# Names of `jax.checkpoint_policies`: what each scanned layer keeps for the backward pass.
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "save_attention", "save_attention_block",
                  "dots_saveable", "dots_with_no_batch_dims_saveable")
DEFAULT_DATASET_PREPARED_PATH = "last_run_prepared"  # Axolotl's default


def _help(default: Any = dataclasses.MISSING, *, help: str):
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or None for container defaults")  # frozen config
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh axis sizes; -1 takes the devices the other axes leave."""

    data: int = _help(-1, help="pure data parallelism (replicated params)")
    fsdp: int = _help(1, help="data parallelism with params and optimizer state sharded (ZeRO-3)")
    tensor: int = _help(1, help="tensor parallelism (heads and MLP width split)")
    sequence: int = _help(1, help="context parallelism (ring attention over the sequence)")

    def __post_init__(self):
        problems = [Problem(axis, f"must be >= 1 or -1, got {size}")
                    for axis, size in self.sizes.items() if size == 0 or size < -1]
        if sum(size == -1 for size in self.sizes.values()) > 1:
            problems.append(Problem("", "at most one mesh axis can be -1"))
        if problems:
            raise ConfigProblems(problems)

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes on `num_devices` devices, with -1 resolved; a ConfigError if they do not fit."""
        fixed = math.prod(s for s in self.sizes.values() if s != -1)
        if num_devices % fixed:
            raise ConfigProblems([Problem("mesh", f"axis sizes {self.sizes} multiply to {fixed}, "
                                                  f"which does not divide {num_devices} devices")])
        rest = num_devices // fixed
        shape = {axis: rest if s == -1 else s for axis, s in self.sizes.items()}
        if math.prod(shape.values()) != num_devices:
            raise ConfigProblems([Problem("mesh", f"axis sizes {shape} use {math.prod(shape.values())} "
                                                  f"devices, but {num_devices} are present")])
        return shape


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokensConfig:
    """Special tokens to set on the tokenizer (Axolotl `special_tokens:`)."""

    bos_token: str | None = _help(None, help="beginning-of-sequence token")
    eos_token: str | None = _help(None, help="end-of-sequence token (appended to completions)")
    pad_token: str | None = _help(None, help="padding token (padding is masked either way)")
    unk_token: str | None = _help(None, help="unknown-token token")
    additional_special_tokens: tuple[str, ...] = _help((), help="more tokens marked special")

    def items(self) -> dict[str, str]:
        """The named tokens that are set, e.g. {'pad_token': '<pad>'}."""
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A fine-tuning run, as read from its YAML file."""

    ALIASES = {"use_rslora": "peft_use_rslora", "evaluation_strategy": "eval_strategy"}

    # --- model and tokenizer
    base_model: str = _help(help="HF model folder (or hub id) whose weights are fine-tuned")
    base_model_config: str | None = _help(
        None, help="folder of the model's config.json (default: base_model)")
    model_type: str | None = _help(
        None, help="HF model class, e.g. AutoModelForCausalLM (informational)")
    tokenizer_config: str | None = _help(None, help="folder of the tokenizer (default: base_model)")
    tokenizer_type: str | None = _help(
        None, help="HF tokenizer class, e.g. AutoTokenizer (a fast tokenizer is always used)")
    trust_remote_code: bool = _help(
        False, help="run code shipped with the model (refused by jaxtune)")
    special_tokens: SpecialTokensConfig = _help(
        SpecialTokensConfig(), help="special tokens to set on the tokenizer")
    tokens: tuple[str, ...] = _help(
        (), help="new tokens to add to the vocabulary (embeddings are resized)")
    chat_template: str | None = _help(
        None, help="tokenizer_default, a built-in name (chatml, llama3, mistral, qwen_25, ...) or jinja")
    chat_template_jinja: str | None = _help(
        None, help="the Jinja template when chat_template is jinja")
    eot_tokens: tuple[str, ...] | None = _help(
        None, help="end-of-turn tokens of chat turns (default: eos and the template's end-of-turn token)")

    # --- data
    datasets: tuple[DatasetConfig, ...] = _help(help="training datasets, concatenated in order")
    test_datasets: tuple[DatasetConfig, ...] = _help(
        (), help="evaluation datasets (instead of val_set_size)")
    val_set_size: int | float = _help(
        0.0, help="held-out evaluation rows: a fraction (< 1) or a count")
    dataset_prepared_path: str | None = _help(
        None, help=f"cache folder for tokenized data (default: {DEFAULT_DATASET_PREPARED_PATH})")
    sequence_len: int = _help(512, help="tokens per training row")
    sample_packing: bool = _help(
        False, help="pack several sequences into each row (segment ids keep them apart)")
    pad_to_sequence_len: bool | None = _help(
        None, help="pad rows to sequence_len (always done: jaxtune's shapes are static)")
    train_on_inputs: bool = _help(
        False, help="also train on prompts and user turns, not only completions")
    excess_length_strategy: Literal["drop", "truncate", "raise"] = _help(
        "drop", help="rows longer than sequence_len: drop, truncate or raise")
    skip_bad_rows: bool = _help(False, help="skip (and count) malformed rows instead of stopping")
    shuffle_merged_datasets: bool = _help(
        True, help="draw training rows in a seeded random order each epoch")
    seed: int = _help(42, help="seed of data order, held-out split, dropout and LoRA init")

    # --- adapters and quantization
    adapter: Literal["lora", "qlora"] | None = _help(
        None, help="lora, qlora (LoRA on an NF4 base) or none (full fine-tune)")
    lora_model_dir: str | None = _help(None, help="PEFT adapter folder to start from")
    lora_r: int = _help(8, help="LoRA rank")
    lora_alpha: float = _help(
        16, help="LoRA scale numerator: scale = alpha / r (or / sqrt(r) with rslora)")
    lora_dropout: float = _help(0.0, help="dropout on the LoRA input")
    lora_target_modules: tuple[str, ...] = _help(
        (), help="projections that get LoRA: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    lora_target_linear: bool = _help(False, help="put LoRA on every linear projection")
    lora_modules_to_save: tuple[str, ...] = _help(
        (), help="modules trained in full next to LoRA: embed_tokens, lm_head")
    peft_use_rslora: bool = _help(False, help="rank-stabilised LoRA: scale = alpha / sqrt(r)")
    peft_use_dora: bool = _help(False, help="weight-decomposed LoRA (DoRA, as PEFT computes it)")
    load_in_4bit: bool = _help(False, help="store the frozen base in 4 bits (required by qlora)")
    load_in_8bit: bool = _help(False, help="store the frozen base in 8 bits (row-wise int8, with adapter: lora)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _help(
        "nf4", help="4-bit code book (nf4; fp4 is not implemented)")
    bnb_4bit_use_double_quant: bool = _help(True, help="quantize the 4-bit block scales too")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] | None = _help(
        None, help="dtype the 4-bit base is dequantized to (default: the compute dtype)")

    # --- optimization
    micro_batch_size: int = _help(1, help="rows per device per forward pass")
    gradient_accumulation_steps: int = _help(1, help="micro-batches per optimizer step")
    num_epochs: float = _help(1.0, help="passes over the training data")
    max_steps: int | None = _help(None, help="optimizer steps to run (overrides num_epochs)")
    learning_rate: float = _help(help="peak learning rate")
    optimizer: Literal[tuple(OPTIMIZERS)] = _help(  # type: ignore[valid-type]
        "adamw_torch_fused", help="update rule; the adamw_* names all run AdamW")
    lr_scheduler: Literal[LR_SCHEDULERS] = _help(  # type: ignore[valid-type]
        "cosine", help="learning-rate schedule after warmup")
    warmup_steps: int | None = _help(None, help="linear warmup steps")
    warmup_ratio: float | None = _help(None, help="linear warmup as a fraction of all steps")
    cosine_min_lr_ratio: float | None = _help(
        None, help="cosine floor as a fraction of learning_rate")
    weight_decay: float = _help(0.0, help="decoupled weight decay")
    adam_beta1: float = _help(0.9, help="Adam first-moment decay")
    adam_beta2: float = _help(0.999, help="Adam second-moment decay")
    adam_epsilon: float = _help(1e-8, help="Adam denominator epsilon")
    max_grad_norm: float = _help(1.0, help="clip the global gradient norm to this (0 disables)")
    bf16: bool | Literal["auto"] = _help(
        "auto", help="compute in bfloat16 (auto: where the device supports it)")
    fp16: bool = _help(False, help="compute in float16")
    tf32: bool = _help(False, help="allow TF32 matmuls for float32 work")
    param_dtype: Literal["float32", "bfloat16"] = _help(
        "float32", help="dtype trained weights are stored in")
    gradient_checkpointing: bool = _help(
        False, help="recompute layer activations in the backward pass")
    gradient_checkpointing_kwargs: Any = _help(
        None, help="accepted for Axolotl configs; remat_policy decides in JAX")
    remat_policy: Literal[REMAT_POLICIES] | None = _help(  # type: ignore[valid-type]
        None, help="jax.checkpoint_policies name per layer (default from gradient_checkpointing)")
    scan_layers: bool = _help(
        True, help="run the layers as one loop, compile time independent of depth (DESIGN.md invariant 1); "
                   "false unrolls them, each layer reading its own frozen weights: faster steps, compile "
                   "time grows with depth")
    attention: Literal["auto", "pallas", "cudnn", "xla"] = _help("auto", help="attention backend")

    # --- parallelism
    mesh: MeshConfig = _help(
        MeshConfig(), help="device mesh: data, fsdp, tensor, sequence (-1 = the rest)")
    sharding_rules: Mapping[str, str | tuple[str, ...] | None] | None = _help(
        None, help="logical axis -> mesh axis overrides, e.g. {mlp: tensor}")
    tensor_parallel_size: int | None = _help(None, help="Axolotl spelling of mesh.tensor")
    context_parallel_size: int | None = _help(None, help="Axolotl spelling of mesh.sequence")
    dp_shard_size: int | None = _help(None, help="Axolotl spelling of mesh.fsdp")
    dp_replicate_size: int | None = _help(None, help="Axolotl spelling of mesh.data")

    # --- evaluation, checkpoints, logging
    eval_strategy: Literal["steps", "epoch", "no"] | None = _help(
        None, help="when to evaluate (default: steps if eval data exists)")
    eval_steps: int | float | None = _help(
        None, help="evaluate every N steps (a fraction < 1: of all steps)")
    evals_per_epoch: int | None = _help(None, help="evaluations per epoch (instead of eval_steps)")
    save_strategy: Literal["steps", "epoch", "no"] | None = _help(None, help="when to checkpoint")
    save_steps: int | float | None = _help(
        None, help="checkpoint every N steps (a fraction < 1: of all steps)")
    saves_per_epoch: int | None = _help(None, help="checkpoints per epoch (instead of save_steps)")
    save_total_limit: int | None = _help(None, help="keep at most this many checkpoints")
    logging_steps: int | None = _help(
        None, help="log every N steps (default: about 0.5% of the run, 1 to 10)")
    output_dir: str = _help(
        "./model-out", help="where checkpoints, metrics and the adapter/model go")
    resume_from_checkpoint: str | None = _help(None, help="checkpoint folder to resume from")
    auto_resume_from_checkpoints: bool = _help(
        True, help="resume from the newest checkpoint in output_dir")
    loss_watchdog_threshold: float | None = _help(None, help="stop when the loss stays above this")
    loss_watchdog_patience: int = _help(3, help="steps above the threshold before stopping")
    use_tensorboard: bool = _help(False, help="also write TensorBoard event files")
    wandb_project: str | None = _help(None, help="Weights & Biases project (logging only)")
    wandb_entity: str | None = _help(None, help="Weights & Biases entity")
    wandb_name: str | None = _help(None, help="Weights & Biases run name")
    wandb_watch: str | None = _help(None, help="Weights & Biases gradient watching (ignored)")
    wandb_log_model: str | None = _help(None, help="Weights & Biases model upload (ignored)")

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigProblems(problems)

    def problems(self) -> list[Problem]:
        """Rules between keys (each key's own type is checked when it is parsed)."""
        p: list[Problem] = []
        positive = ("micro_batch_size", "gradient_accumulation_steps", "lora_r")
        p += [Problem(k, f"must be >= 1, got {getattr(self, k)}") for k in positive if getattr(self, k) < 1]
        if self.sequence_len < 2:
            p.append(Problem("sequence_len", "must be >= 2 (a token and its successor)"))
        if self.trust_remote_code:
            p.append(Problem("trust_remote_code", "jaxtune does not run code from model repositories; "
                                                  "Llama, Mistral and Qwen are built in"))
        if not self.datasets:
            p.append(Problem("datasets", "needs at least one dataset"))
        p += _val_set_problems(self)
        p += _adapter_problems(self)
        p += _schedule_problems(self)
        p += _parallel_problems(self)
        if self.bf16 is True and self.fp16:
            p.append(Problem("fp16", "bf16 and fp16 are both set; choose one"))
        if self.excess_length_strategy not in ("drop", "truncate", "raise"):
            p.append(Problem("excess_length_strategy", "must be drop, truncate or raise"))
        p += chat_template_problems(self.chat_template, self.chat_template_jinja)
        return p

    def to_dict(self) -> dict:
        """Plain dict of every field (lists and dicts), as written to `config.resolved.yml`."""
        from jaxtune.config.parse import to_plain  # parse imports nothing from here

        return to_plain(self)

    def to_config_dict(self):
        """The config as a locked `ml_collections.ConfigDict` (keys fixed, values settable)."""
        import ml_collections

        def convert(value):
            if isinstance(value, dict):
                return ml_collections.ConfigDict({k: convert(v) for k, v in value.items()}).lock()
            if isinstance(value, list):  # dataset entries become ConfigDicts too
                return tuple(convert(v) for v in value)
            return value

        return convert(self.to_dict())

    @property
    def optimizer_family(self) -> str:
        """The update rule the optimizer name runs: adamw, adafactor, sgd or lion."""
        return OPTIMIZERS[self.optimizer]


def _val_set_problems(c: Config) -> list[Problem]:
    p = []
    v = c.val_set_size
    if isinstance(v, float) and not 0.0 <= v < 1.0:
        p.append(Problem("val_set_size", f"a fraction must be in [0, 1), got {v}; "
                                         "write a whole number for a row count"))
    if isinstance(v, int) and v < 0:
        p.append(Problem("val_set_size", f"a row count must be >= 0, got {v}"))
    if c.test_datasets and v:
        p.append(Problem("val_set_size", "set either test_datasets or val_set_size, not both"))
    return p


def _adapter_problems(c: Config) -> list[Problem]:
    p = []
    for i, module in enumerate(c.lora_target_modules):
        if module not in LORA_TARGETS:
            p.append(Problem(f"lora_target_modules[{i}]", f"unknown module {module!r}"
                             f"{did_you_mean(module, LORA_TARGETS)}; choose from {', '.join(LORA_TARGETS)}"))
    for i, module in enumerate(c.lora_modules_to_save):
        if module not in MODULES_TO_SAVE:
            p.append(Problem(f"lora_modules_to_save[{i}]", f"unknown module {module!r}"
                             f"{did_you_mean(module, MODULES_TO_SAVE)}; "
                             f"choose from {', '.join(MODULES_TO_SAVE)}"))
    if c.adapter and not (c.lora_target_modules or c.lora_target_linear):
        p.append(Problem("lora_target_modules", f"adapter {c.adapter} needs lora_target_modules "
                                                "or lora_target_linear: true"))
    if c.adapter == "qlora":
        if not c.load_in_4bit:
            p.append(Problem("load_in_4bit", "adapter qlora requires load_in_4bit: true"))
    elif c.load_in_4bit:
        p.append(Problem("load_in_4bit", "4-bit bases are frozen: use adapter: qlora"))
    if c.load_in_8bit:
        if c.load_in_4bit:
            p.append(Problem("load_in_8bit", "load_in_4bit and load_in_8bit are both set; choose one"))
        elif c.adapter != "lora":
            p.append(Problem("load_in_8bit", "8-bit bases are frozen: use adapter: lora"))
    if c.peft_use_dora and not c.adapter:
        p.append(Problem("peft_use_dora", "DoRA is a LoRA variant: set adapter: lora or qlora"))
    if c.bnb_4bit_quant_type != "nf4":
        p.append(Problem("bnb_4bit_quant_type", "only nf4 is implemented"))
    if c.lora_alpha <= 0:
        p.append(Problem("lora_alpha", f"must be > 0, got {c.lora_alpha}"))
    if not 0.0 <= c.lora_dropout < 1.0:
        p.append(Problem("lora_dropout", f"must be in [0, 1), got {c.lora_dropout}"))
    if c.lora_model_dir and not c.adapter:
        p.append(Problem("lora_model_dir", "needs adapter: lora or qlora"))
    return p


def _schedule_problems(c: Config) -> list[Problem]:
    p = []
    if c.learning_rate <= 0:
        p.append(Problem("learning_rate", f"must be > 0, got {c.learning_rate}"))
    if c.warmup_steps is not None and c.warmup_ratio is not None:
        p.append(Problem("warmup_ratio", "set either warmup_steps or warmup_ratio, not both"))
    if c.warmup_ratio is not None and not 0.0 <= c.warmup_ratio < 1.0:
        p.append(Problem("warmup_ratio", f"must be in [0, 1), got {c.warmup_ratio}"))
    if c.cosine_min_lr_ratio is not None and not 0.0 <= c.cosine_min_lr_ratio <= 1.0:
        p.append(Problem("cosine_min_lr_ratio", f"must be in [0, 1], got {c.cosine_min_lr_ratio}"))
    if c.num_epochs <= 0 and c.max_steps is None:
        p.append(Problem("num_epochs", f"must be > 0, got {c.num_epochs}"))
    if c.max_steps is not None and c.max_steps < 1:
        p.append(Problem("max_steps", f"must be >= 1, got {c.max_steps}"))
    for every, per_epoch in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch")):
        if getattr(c, every) is not None and getattr(c, per_epoch) is not None:
            p.append(Problem(per_epoch, f"set either {every} or {per_epoch}, not both"))
        if getattr(c, every) is not None and getattr(c, every) <= 0:
            p.append(Problem(every, f"must be > 0, got {getattr(c, every)}"))
    for key in ("max_grad_norm", "weight_decay", "adam_epsilon"):
        if getattr(c, key) < 0:
            p.append(Problem(key, f"must be >= 0, got {getattr(c, key)}"))
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(c, key) < 1.0:
            p.append(Problem(key, f"must be in [0, 1), got {getattr(c, key)}"))
    if c.loss_watchdog_patience < 1:
        p.append(Problem("loss_watchdog_patience", f"must be >= 1, got {c.loss_watchdog_patience}"))
    return p


def _parallel_problems(c: Config) -> list[Problem]:
    p = []
    for key in ("tensor_parallel_size", "context_parallel_size", "dp_shard_size", "dp_replicate_size"):
        value = getattr(c, key)
        if value is not None and value < 1 and value != -1:
            p.append(Problem(key, f"must be >= 1 (or -1), got {value}"))
    for logical, target in (c.sharding_rules or {}).items():
        if logical not in LOGICAL_AXES:
            p.append(Problem(f"sharding_rules.{logical}", "unknown logical axis"
                             f"{did_you_mean(logical, LOGICAL_AXES)}; known: {', '.join(LOGICAL_AXES)}"))
        axes = (target,) if isinstance(target, str) else (target or ())
        for axis in axes:
            if axis not in MESH_AXES:
                p.append(Problem(f"sharding_rules.{logical}", f"unknown mesh axis {axis!r}"
                                 f"{did_you_mean(axis, MESH_AXES)}; mesh axes: {', '.join(MESH_AXES)}"))
    return p

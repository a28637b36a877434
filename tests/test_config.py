"""The config schema: Axolotl keys and defaults, every problem reported by key, `--set`, the
unimplemented-key policy, the resolved forms, `python -m jaxtune.validate`, and every shipped YAML."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxtune.config import (Config, ConfigProblems, apply_overrides, check_config, check_config_dict,
                            config_from_dict, dump_resolved, load_config)
from jaxtune.config.dataset_schema import DatasetConfig
from jaxtune.config.schema import LOGICAL_AXES, LORA_TARGETS, MeshConfig
from jaxtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yml"))
MINIMAL = {"base_model": "some/model", "learning_rate": 2e-5,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}


def problems_of(raw: dict) -> dict[str, str]:
    """{key: message} of every problem (errors and warnings) of a config mapping."""
    return {p.key: p.message for p in check_config_dict(raw).problems}


def errors_of(raw: dict) -> dict[str, str]:
    return {p.key: p.message for p in check_config_dict(raw).errors}


# --- schema and defaults


def test_axolotl_defaults():
    cfg = config_from_dict(MINIMAL)
    expected = dict(sequence_len=512, sample_packing=False, train_on_inputs=False, val_set_size=0.0,
                    micro_batch_size=1, gradient_accumulation_steps=1, num_epochs=1.0, optimizer="adamw_torch_fused",
                    lr_scheduler="cosine", weight_decay=0.0, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bf16="auto", fp16=False,
                    gradient_checkpointing=False, output_dir="./model-out", seed=42, adapter=None,
                    excess_length_strategy="drop", shuffle_merged_datasets=True, attention="auto")
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.datasets[0].split == "train"
    # Derived values are filled in by resolution.
    assert (cfg.tokenizer_config, cfg.base_model_config) == ("some/model", "some/model")
    assert cfg.dataset_prepared_path == "last_run_prepared"
    assert cfg.remat_policy == "everything_saveable"
    assert cfg.mesh == MeshConfig(data=-1, fsdp=1, tensor=1, sequence=1)


def test_every_field_has_a_one_line_description():
    for cls in (Config, DatasetConfig, MeshConfig):
        for field in dataclasses.fields(cls):
            help_text = field.metadata.get("help", "")
            assert help_text and "\n" not in help_text, f"{cls.__name__}.{field.name}"


def test_config_is_frozen():
    cfg = config_from_dict(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0
    rules = config_from_dict({**MINIMAL, "sharding_rules": {"mlp": "tensor"}}).sharding_rules
    with pytest.raises(TypeError):
        rules["mlp"] = "fsdp"  # mappings are read-only too


def test_logical_axes_match_the_sharding_rules_table():
    from jaxtune.sharding import DEFAULT_RULES

    assert set(LOGICAL_AXES) == set(DEFAULT_RULES)


# --- problems are collected and name their key


def test_unknown_keys_suggest_the_nearest_name():
    found = errors_of({**MINIMAL, "sequence_length": 1024, "lora_targets_modules": ["q_proj"],
                       "datasets": [{"path": "d.jsonl", "type": "alpaca", "feild": "text"}],
                       "mesh": {"tensr": 2}})
    assert found["sequence_length"] == "unknown key (did you mean 'sequence_len'?)"
    assert found["lora_targets_modules"] == "unknown key (did you mean 'lora_target_modules'?)"
    assert found["datasets[0].feild"] == "unknown key (did you mean 'field'?)"
    assert found["mesh.tensr"] == "unknown key (did you mean 'tensor'?)"


def test_type_and_value_errors_are_all_reported_together():
    found = errors_of({**MINIMAL, "micro_batch_size": "four", "adapter": "lora2", "sample_packing": "yes",
                       "lora_target_modules": ["q_proj", "qkv"], "val_set_size": 1.5, "mesh": {"data": 0},
                       "datasets": [{"path": "d.jsonl", "type": "alpacca"}]})
    assert found["micro_batch_size"] == "expected an integer, got 'four' (string)"
    assert found["adapter"].startswith("must be one of 'lora', 'qlora', got 'lora2'")
    assert found["sample_packing"] == "expected true or false, got 'yes' (string)"
    assert found["mesh.data"] == "must be >= 1 or -1, got 0"
    assert "unknown dataset type 'alpacca' (did you mean 'alpaca'?)" in found["datasets[0].type"]
    with pytest.raises(ConfigProblems) as info:
        config_from_dict({**MINIMAL, "micro_batch_size": "four", "adapter": "lora2"})
    assert "2 problems" in str(info.value)


def test_cross_field_rules():
    found = errors_of({**MINIMAL, "adapter": "qlora", "lora_target_modules": ["q_proj", "qkv"],
                       "warmup_steps": 10, "warmup_ratio": 0.1, "val_set_size": 1.5,
                       "eval_steps": 10, "evals_per_epoch": 2, "trust_remote_code": True})
    assert found["load_in_4bit"] == "adapter qlora requires load_in_4bit: true"
    assert found["lora_target_modules[1]"].startswith("unknown module 'qkv'")
    assert found["warmup_ratio"] == "set either warmup_steps or warmup_ratio, not both"
    assert found["val_set_size"].startswith("a fraction must be in [0, 1)")
    assert found["evals_per_epoch"] == "set either eval_steps or evals_per_epoch, not both"
    assert "does not run code" in found["trust_remote_code"]
    assert errors_of({**MINIMAL, "adapter": "lora"})["lora_target_modules"].startswith("adapter lora needs")


def test_dora_and_8bit_bases_go_with_an_adapter_only():
    lora = {**MINIMAL, "adapter": "lora", "lora_target_linear": True}
    assert errors_of({**lora, "peft_use_dora": True, "load_in_8bit": True}) == {}
    assert "adapter" in errors_of({**MINIMAL, "peft_use_dora": True})["peft_use_dora"]
    assert "use adapter: lora" in errors_of({**MINIMAL, "load_in_8bit": True})["load_in_8bit"]
    assert "choose one" in errors_of({**lora, "adapter": "qlora", "load_in_4bit": True,
                                      "load_in_8bit": True})["load_in_8bit"]


def test_missing_required_keys():
    found = errors_of({"datasets": [{"type": "alpaca"}]})
    assert found["base_model"] == "missing required key"
    assert found["learning_rate"] == "missing required key"
    assert found["datasets[0].path"] == "missing required key"


def test_numbers_written_like_axolotl():
    cfg = config_from_dict({**MINIMAL, "learning_rate": "2e-5", "lora_alpha": 16, "val_set_size": 100})
    assert cfg.learning_rate == 2e-5 and cfg.val_set_size == 100 and isinstance(cfg.val_set_size, int)
    assert config_from_dict({**MINIMAL, "val_set_size": 0.05}).val_set_size == 0.05


# --- Axolotl keys jaxtune does not implement


def test_unimplemented_key_that_changes_training_is_an_error():
    found = check_config_dict({**MINIMAL, "neftune_noise_alpha": 5, "rl": "dpo", "dpo_beta": 0.1,
                               "datasets": [{"path": "d.jsonl", "type": "alpaca", "conversation": "chatml"}]})
    errors = {p.key: p.message for p in found.errors}
    for key in ("neftune_noise_alpha", "rl", "dpo_beta", "datasets[0].conversation"):
        assert "would change what is trained" in errors[key], key
    assert found.config is None


def test_cosmetic_unimplemented_key_is_a_warning():
    report = check_config_dict({**MINIMAL, "flash_attention": True, "deepspeed": "zero3.json",
                                "liger_rms_norm": True, "wandb_watch": "gradients", "strict": False})
    assert report.config is not None and not report.errors
    warned = {p.key for p in report.warnings}
    assert warned == {"flash_attention", "deepspeed", "liger_rms_norm", "wandb_watch"}
    assert "mesh" in next(p.message for p in report.warnings if p.key == "deepspeed")


def test_unimplemented_keys_switched_off_pass_silently():
    report = check_config_dict({**MINIMAL, "flash_attention": False, "deepspeed": None,
                                "neftune_noise_alpha": None, "rl": None, "load_in_8bit": False})
    assert report.problems == []


def test_eight_bit_optimizer_runs_as_adamw_with_a_warning():
    report = check_config_dict({**MINIMAL, "optimizer": "adamw_bnb_8bit"})
    assert report.config.optimizer_family == "adamw"
    assert "float32 state" in report.warnings[0].message


# --- mesh, LoRA targets, remat


def test_axolotl_parallel_sizes_set_the_mesh():
    cfg = config_from_dict({**MINIMAL, "tensor_parallel_size": 2, "context_parallel_size": 2, "dp_shard_size": 4})
    assert cfg.mesh == MeshConfig(data=-1, fsdp=4, tensor=2, sequence=2)
    assert cfg.mesh.shape(32) == {"data": 2, "fsdp": 4, "tensor": 2, "sequence": 2}
    assert "conflicts with mesh.tensor" in errors_of({**MINIMAL, "tensor_parallel_size": 2,
                                                      "mesh": {"tensor": 4}})["tensor_parallel_size"]
    with pytest.raises(ConfigError, match="does not divide 6 devices"):
        cfg.mesh.shape(6)


def test_lora_target_linear_and_remat_resolve():
    cfg = config_from_dict({**MINIMAL, "adapter": "lora", "lora_target_linear": True, "gradient_checkpointing": True})
    assert cfg.lora_target_modules == LORA_TARGETS and cfg.remat_policy == "nothing_saveable"
    cfg = config_from_dict({**MINIMAL, "gradient_checkpointing": True, "remat_policy": "dots_saveable"})
    assert cfg.remat_policy == "dots_saveable"


def test_layers_looped_unless_scan_layers_false():
    assert config_from_dict(MINIMAL).scan_layers is True
    assert config_from_dict({**MINIMAL, "scan_layers": False}).scan_layers is False


def test_sharding_rules_are_checked():
    found = errors_of({**MINIMAL, "sharding_rules": {"mlp": "tensr", "embd": "fsdp"}})
    assert "unknown mesh axis 'tensr' (did you mean 'tensor'?)" in found["sharding_rules.mlp"]
    assert "unknown logical axis (did you mean 'embed'?)" in found["sharding_rules.embd"]


# --- --set overrides


def test_overrides_parse_values_as_yaml():
    raw = apply_overrides(MINIMAL, ["mesh.tensor=2", "lora_target_modules=[q_proj,v_proj]", "adapter=lora",
                                    "datasets.0.path=other.jsonl", "learning_rate=1e-4", "sample_packing=true",
                                    "special_tokens.pad_token=<|end_of_text|>"])
    cfg = config_from_dict(raw)
    assert cfg.mesh.tensor == 2 and cfg.lora_target_modules == ("q_proj", "v_proj")
    assert cfg.datasets[0].path == "other.jsonl" and cfg.learning_rate == 1e-4 and cfg.sample_packing
    assert cfg.special_tokens.pad_token == "<|end_of_text|>"
    assert MINIMAL["datasets"][0]["path"] == "data.jsonl"  # the input is not modified
    assert config_from_dict(apply_overrides({**MINIMAL, "adapter": "lora"}, ["adapter=null"])).adapter is None


@pytest.mark.parametrize("override, message", [
    ("sequence_len", "expected KEY=VALUE"),
    ("datasets.5.path=x", "out of range"),
    ("datasets.path=x", "is a list; index it with a number"),
    ("learning_rate.x=1", "is 2e-05, not a mapping"),
    ("mesh=[unclosed", "not valid YAML"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(MINIMAL, [override])


# --- resolved forms


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = config_from_dict({**MINIMAL, "adapter": "lora", "lora_target_linear": True, "mesh": {"fsdp": 2},
                            "sharding_rules": {"mlp": ["tensor", "fsdp"]}})
    path = dump_resolved(cfg, tmp_path)
    assert path == tmp_path / "config.resolved.yml"
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == cfg.to_dict()


def test_config_dict_is_locked():
    cd = config_from_dict(MINIMAL).to_config_dict()
    assert cd.sequence_len == 512 and cd.datasets[0].type == "alpaca" and cd.mesh.data == -1
    with pytest.raises(AttributeError):
        cd.sequence_lenn = 1


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("base_model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yml: line \d+ is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


# --- python -m jaxtune.validate and the shipped configs


def run_validate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxtune.validate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_validate_prints_resolved_config_and_warnings(tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**MINIMAL, "flash_attention": True}))
    result = run_validate("--config", str(path), "--set", "sequence_len=1024")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["sequence_len"] == 1024 and resolved["tokenizer_config"] == "some/model"
    assert "warning: flash_attention: Axolotl key not implemented" in result.stderr


def test_validate_reports_every_error_and_exits_2(tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**MINIMAL, "sequence_length": 10, "neftune_noise_alpha": 5}))
    result = run_validate("--config", str(path))
    assert result.returncode == 2
    assert "error: sequence_length: unknown key (did you mean 'sequence_len'?)" in result.stderr
    assert "error: neftune_noise_alpha:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_config_is_valid_and_starts_with_its_command(path):
    report = check_config(path)
    assert not report.errors, [str(p) for p in report.errors]
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# python -m jaxtune.") and str(path.relative_to(REPO)) in first_line


def test_configs_are_named_family_size_method():
    named = [p for p in SHIPPED if p.parent != REPO / "configs" and p.parent.parent == REPO / "configs"]
    assert len(named) >= 4
    for path in named:
        assert path.parent.name in ("llama", "mistral", "qwen")
        method = path.stem.rsplit("-", 1)[1]
        assert method in ("lora", "qlora", "full"), path
        cfg = check_config(path).config
        assert cfg.adapter == (None if method == "full" else method)


def test_chat_template_names_are_checked_and_match_the_builtins():
    from jaxtune.config.dataset_schema import CHAT_TEMPLATE_NAMES
    from jaxtune.data.templates import BUILTIN_TEMPLATES

    assert set(CHAT_TEMPLATE_NAMES) == set(BUILTIN_TEMPLATES)
    assert "did you mean 'chatml'" in errors_of({**MINIMAL, "chat_template": "chatmll"})["chat_template"]
    assert "datasets[0].chat_template_jinja" in errors_of(
        {**MINIMAL, "datasets": [{"path": "d.jsonl", "type": "chat_template", "chat_template": "jinja"}]})
    for ok in ("tokenizer_default", "tokenizer_default_fallback_llama3", "qwen_25", "{{ messages }}"):
        assert not errors_of({**MINIMAL, "chat_template": ok}), ok


AXOLOTL_EXAMPLE = """
base_model: NousResearch/Llama-3.2-1B
load_in_8bit: false
load_in_4bit: false
strict: false
datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/lora-out
adapter: lora
lora_model_dir:
sequence_len: 2048
sample_packing: true
eval_sample_packing: true
pad_to_sequence_len: true
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_fan_in_fan_out:
lora_target_modules:
  - gate_proj
  - down_proj
  - up_proj
  - q_proj
  - v_proj
  - k_proj
  - o_proj
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false
gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""


def test_an_axolotl_example_config_migrates_unchanged(tmp_path):
    path = tmp_path / "lora-1b.yml"
    path.write_text(AXOLOTL_EXAMPLE)
    report = check_config(path)
    assert not report.errors, [str(p) for p in report.errors]
    assert {p.key for p in report.warnings} == {"eval_sample_packing", "flash_attention", "optimizer"}
    cfg = report.config
    assert (cfg.fp16, cfg.lora_model_dir, cfg.sequence_len, cfg.lora_alpha) == (False, None, 2048, 32)
    assert cfg.special_tokens.pad_token == "<|end_of_text|>" and cfg.remat_policy == "nothing_saveable"
    # An empty mapping key reads as unset too.
    assert config_from_dict({**MINIMAL, "special_tokens": None, "mesh": None}).mesh == MeshConfig()

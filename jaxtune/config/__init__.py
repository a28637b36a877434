"""The run config: Axolotl-compatible YAML, checked in full, resolved into a frozen dataclass.

    from jaxtune.config import load_config
    cfg = load_config("configs/llama/3.2-1b-lora.yml", ["micro_batch_size=4"])
    cfg.sequence_len, cfg.datasets[0].type, cfg.mesh.shape(num_devices)
"""

from jaxtune.config.cli import add_config_args, load_config_from_args, run_entry
from jaxtune.config.dataset_schema import DatasetConfig, UserPromptFormat
from jaxtune.config.load import (ConfigReport, check_config, check_config_dict, config_from_dict,
                                 dump_resolved, load_config, resolve, to_yaml)
from jaxtune.config.overrides import apply_overrides
from jaxtune.config.problems import ConfigProblems, Problem
from jaxtune.config.schema import Config, MeshConfig, SpecialTokensConfig

__all__ = [
    "Config", "ConfigProblems", "ConfigReport", "DatasetConfig", "MeshConfig", "Problem",
    "SpecialTokensConfig", "UserPromptFormat", "add_config_args", "apply_overrides",
    "check_config", "check_config_dict", "config_from_dict", "dump_resolved", "load_config",
    "load_config_from_args", "resolve", "run_entry", "to_yaml",
]

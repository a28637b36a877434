"""Read a YAML config, apply `--set` overrides, check it in full and resolve derived values.

`load_config` is what every command calls: it returns the typed, frozen, resolved `Config` or
raises one `ConfigError` that lists every problem. `check_config` returns the problems instead of
raising, for `python -m jaxtune.validate`. The resolved config is available as the dataclass,
as a plain dict (`cfg.to_dict()`), as a locked `ml_collections.ConfigDict`
(`cfg.to_config_dict()`), and on disk as `output_dir/config.resolved.yml` (`dump_resolved`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import yaml

from jaxtune.config import axolotl_unimplemented
from jaxtune.config.dataset_schema import DatasetConfig
from jaxtune.config.overrides import apply_overrides
from jaxtune.config.parse import _INVALID, build_dataclass
from jaxtune.config.problems import ConfigProblems, Problem, raise_if_errors
from jaxtune.config.schema import (DEFAULT_DATASET_PREPARED_PATH, EIGHT_BIT_OPTIMIZERS,
                                   LORA_TARGETS, Config)
from jaxtune.errors import ConfigError

log = logging.getLogger("jaxtune.config")

# Axolotl's parallelism sizes and the mesh axis each one sets, with the axis's own default.
_AXOLOTL_MESH_KEYS = {"tensor_parallel_size": ("tensor", 1), "context_parallel_size": ("sequence", 1),
                      "dp_shard_size": ("fsdp", 1), "dp_replicate_size": ("data", -1)}


@dataclasses.dataclass(frozen=True)
class ConfigReport:
    """The outcome of checking a config: the resolved config (None if it has errors) and all problems."""

    config: Config | None
    problems: list[Problem]
    source: str

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file; a ConfigError naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raise ConfigError(f"{path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def check_config_dict(raw: Mapping, source: str = "config") -> ConfigReport:
    """Check a config mapping in full; every problem is collected, none raised."""
    problems: list[Problem] = []
    known = {f.name for f in dataclasses.fields(Config)} | set(Config.ALIASES)
    screened, found = axolotl_unimplemented.screen(raw, known)
    problems += found
    screened = _screen_dataset_entries(screened, problems)
    problems += _mesh_conflicts(screened)
    config = build_dataclass(Config, screened, "", problems)
    if config is _INVALID or any(p.severity == "error" for p in problems):
        return ConfigReport(None, problems, source)
    try:
        config = resolve(config)
    except ConfigProblems as e:
        return ConfigReport(None, problems + e.problems, source)
    problems += _warnings(config)
    return ConfigReport(config, problems, source)


def check_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ConfigReport:
    """Read `path`, apply `--set` overrides and check the result (see `check_config_dict`)."""
    raw = apply_overrides(read_yaml(path), overrides)
    return check_config_dict(raw, source=str(path))


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                warn: Callable[[str], None] | None = None) -> Config:
    """The resolved config in `path` (with `--set` overrides); a ConfigError listing every problem.

    Warnings (ignored Axolotl keys) go to `warn`, by default the `jaxtune.config` logger.
    """
    return _raise_or_return(check_config(path, overrides), warn)


def config_from_dict(raw: Mapping, source: str = "config", *,
                     warn: Callable[[str], None] | None = None) -> Config:
    """The resolved config for a mapping (tests and programmatic use)."""
    return _raise_or_return(check_config_dict(raw, source), warn)


def _raise_or_return(report: ConfigReport, warn: Callable[[str], None] | None) -> Config:
    raise_if_errors(report.problems, report.source)
    for problem in report.warnings:
        (warn or log.warning)(f"{report.source}: {problem}")
    return report.config


def resolve(cfg: Config) -> Config:
    """Fill in the values that follow from other keys, so later stages read one field each."""
    problems: list[Problem] = []
    # lora_target_linear means every projection, which includes any listed explicitly.
    targets = LORA_TARGETS if cfg.lora_target_linear else cfg.lora_target_modules
    mesh = cfg.mesh
    for key, (axis, default) in _AXOLOTL_MESH_KEYS.items():
        size = getattr(cfg, key)
        if size is None:
            continue
        if getattr(mesh, axis) not in (default, size):
            problems.append(Problem(key, f"{size} conflicts with mesh.{axis}: {getattr(mesh, axis)}"))
        else:
            mesh = dataclasses.replace(mesh, **{axis: size})
    if problems:
        raise ConfigProblems(problems)
    return dataclasses.replace(
        cfg,
        base_model_config=cfg.base_model_config or cfg.base_model,
        tokenizer_config=cfg.tokenizer_config or cfg.base_model,
        dataset_prepared_path=cfg.dataset_prepared_path or DEFAULT_DATASET_PREPARED_PATH,
        remat_policy=cfg.remat_policy or ("nothing_saveable" if cfg.gradient_checkpointing
                                          else "everything_saveable"),
        lora_target_modules=targets,
        mesh=mesh,
    )


def dump_resolved(cfg: Config, output_dir: str | os.PathLike | None = None) -> Path:
    """Write `config.resolved.yml` into `output_dir` (default `cfg.output_dir`); returns its path."""
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.resolved.yml"
    path.write_text(to_yaml(cfg))
    return path


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, keys in schema order; it loads back to the same config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def _screen_dataset_entries(raw: dict, problems: list[Problem]) -> dict:
    known = {f.name for f in dataclasses.fields(DatasetConfig)}
    out = dict(raw)
    for list_key in ("datasets", "test_datasets"):
        entries = raw.get(list_key)
        if not isinstance(entries, list):
            continue
        screened = []
        for i, entry in enumerate(entries):
            if isinstance(entry, Mapping):
                entry, found = axolotl_unimplemented.screen(entry, known, f"{list_key}[{i}]",
                                                            dataset_entry=True)
                problems += found
            screened.append(entry)
        out[list_key] = screened
    return out


def _mesh_conflicts(raw: dict) -> list[Problem]:
    """An Axolotl size and an explicit `mesh:` axis that disagree (both written by the user)."""
    mesh = raw.get("mesh")
    if not isinstance(mesh, Mapping):
        return []
    problems = []
    for key, (axis, _) in _AXOLOTL_MESH_KEYS.items():
        size = raw.get(key)
        if size is not None and axis in mesh and mesh[axis] != size:
            problems.append(Problem(key, f"{size} conflicts with mesh.{axis}: {mesh[axis]}; set one of them"))
    return problems


def _warnings(cfg: Config) -> list[Problem]:
    problems = []
    if cfg.optimizer in EIGHT_BIT_OPTIMIZERS:
        problems.append(Problem("optimizer", f"{cfg.optimizer} runs as AdamW with float32 state "
                                             "(the same update, more memory)", "warning"))
    for key in ("wandb_watch", "wandb_log_model"):
        if axolotl_unimplemented.is_set(getattr(cfg, key)) and getattr(cfg, key) != "false":
            problems.append(Problem(key, "not implemented in jaxtune (cosmetic): ignored", "warning"))
    if cfg.pad_to_sequence_len is False:
        problems.append(Problem("pad_to_sequence_len", "rows are always padded to sequence_len "
                                                       "(static shapes); padding is masked", "warning"))
    return problems

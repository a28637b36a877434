"""`--set a.b=value` overrides, applied to the YAML mapping before it is checked.

Every command takes them (DESIGN.md, "Overrides"). The value is parsed as YAML, so
`--set mesh.tensor=2` sets an integer, `--set lora_target_modules=[q_proj,v_proj]` a list and
`--set adapter=null` clears a key. A numeric path segment indexes a list
(`--set datasets.0.path=data.jsonl`). Overrides are applied to the raw mapping, so the result is
checked exactly like a YAML file would be.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import yaml

from jaxtune.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], object]:
    """'a.b=value' -> (['a', 'b'], parsed value)."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set mesh.tensor=2")
    path = key.split(".")
    if any(not part for part in path):
        raise ConfigError(f"--set {text!r}: empty component in key {key!r}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {value_text!r} is not valid YAML ({_first_line(e)})") from None
    return path, value


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """A copy of `raw` with each 'a.b=value' set, creating intermediate mappings as needed."""
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(result, path, value, text)
    return result


def _set_path(node, path: list[str], value, text: str) -> None:
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise ConfigError(f"--set {text!r}: {'.'.join(path[:depth])} is a list; "
                                  f"index it with a number, not {part!r}")
            index = int(part)
            if not -len(node) <= index < len(node):
                raise ConfigError(f"--set {text!r}: {where} is out of range "
                                  f"(the list has {len(node)} entries)")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:depth])} is {node!r}, "
                              "not a mapping or list, so it has no keys")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]

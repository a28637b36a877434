"""Build the frozen config dataclasses from YAML mappings, type by type, collecting every problem.

The schema classes declare their field types with ordinary annotations (`int | None`,
`Literal["lora", "qlora"] | None`, `tuple[str, ...]`, nested dataclasses); this module reads the
annotations and checks a YAML value against them, so the schema stays the single source of truth
for names, types and defaults. Lists become tuples and mappings read-only mappings, so a resolved
config cannot be mutated by accident. `to_plain` is the inverse, for YAML dumps.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from jaxtune.config.problems import ConfigProblems, Problem, did_you_mean, join_key

_INVALID = object()  # a value that failed its type check (its problem is already recorded)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_dataclass(cls: type, raw: Any, key: str, problems: list[Problem]) -> Any:
    """`cls(**raw)` with every key and value checked; returns `_INVALID` if it cannot be built.

    Unknown keys are errors with a "did you mean" suggestion; `cls.ALIASES` (alias -> field)
    accepts Axolotl's alternative spellings; a null value leaves a key at its default. Fields whose values fail their type check fall back
    to their default so that the cross-field checks in `__post_init__` still run and report too.
    """
    if not isinstance(raw, Mapping):
        problems.append(Problem(key, f"expected a mapping of keys, got {_describe_value(raw)}"))
        return _INVALID
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    raw = _apply_aliases(cls, dict(raw), key, problems)
    hints = _type_hints(cls)
    values: dict[str, Any] = {}
    missing_required = False
    for name, value in raw.items():
        if not isinstance(name, str):
            problems.append(Problem(join_key(key, str(name)), "keys must be strings"))
            continue
        if name not in fields:
            problems.append(Problem(join_key(key, name), "unknown key" + did_you_mean(name, fields)))
            continue
        if value is None and not _is_required(fields[name]) and not _allows_none(hints[name]):
            continue  # `fp16:` with no value: Axolotl configs write unset keys this way
        coerced = coerce(value, hints[name], join_key(key, name), problems)
        if coerced is not _INVALID:
            values[name] = coerced
        elif _is_required(fields[name]):
            missing_required = True
    for name, field in fields.items():
        if _is_required(field) and name not in raw:
            problems.append(Problem(join_key(key, name), "missing required key"))
            missing_required = True
    if missing_required:
        return _INVALID
    try:
        return cls(**values)
    except ConfigProblems as e:
        problems.extend(dataclasses.replace(p, key=_nest_key(key, p.key)) for p in e.problems)
        return _INVALID


def _nest_key(parent: str, key: str) -> str:
    if not parent:
        return key
    return f"{parent}.{key}" if key else parent


def _allows_none(hint: Any) -> bool:
    return hint is Any or (typing.get_origin(hint) in (Union, types.UnionType)
                           and type(None) in typing.get_args(hint))


def _is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _apply_aliases(cls: type, raw: dict, key: str, problems: list[Problem]) -> dict:
    for alias, canonical in getattr(cls, "ALIASES", {}).items():
        if alias not in raw:
            continue
        if canonical in raw:
            problems.append(Problem(join_key(key, alias),
                                    f"is another name for '{canonical}'; set only one of them"))
            raw.pop(alias)
        else:
            raw[canonical] = raw.pop(alias)
    return raw


def coerce(value: Any, hint: Any, key: str, problems: list[Problem]) -> Any:
    """`value` checked against the type `hint`; records a problem and returns `_INVALID` if it fails."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _freeze(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], key, problems)
        for option in options:
            result = coerce(value, option, key, scratch := [])
            if result is not _INVALID:
                return result
            if _is_structural(option, value):
                problems.extend(scratch)  # right shape, wrong content: the inner messages are best
                return _INVALID
        problems.append(Problem(key, f"expected {describe_type(hint)}, got {_describe_value(value)}"))
        return _INVALID
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        choices = ", ".join(repr(c) for c in args)
        hint_text = did_you_mean(value, [str(c) for c in args]) if isinstance(value, str) else ""
        problems.append(Problem(key, f"must be one of {choices}, got {value!r}{hint_text}"))
        return _INVALID
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key, problems)
    if origin is tuple:
        return _coerce_tuple(value, args, key, problems)
    if origin in (dict, Mapping):
        return _coerce_mapping(value, args, key, problems)
    scalar = _coerce_scalar(value, hint)
    if scalar is _INVALID:
        problems.append(Problem(key, f"expected {describe_type(hint)}, got {_describe_value(value)}"))
    return scalar


def _is_structural(hint: Any, value: Any) -> bool:
    """True when `value` has the container shape of `hint` (so its inner problem is the real one)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) or origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    return False


def _coerce_scalar(value: Any, hint: Any) -> Any:
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _INVALID
    if hint is float:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, (int, float)):
            return float(value)
        # PyYAML reads `2e-5` (no dot) as a string; Axolotl configs are full of them.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _INVALID
        return _INVALID
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    raise TypeError(f"config schema uses an unsupported type {hint!r}")  # a bug in the schema


def _coerce_tuple(value: Any, args: tuple, key: str, problems: list[Problem]) -> Any:
    if not isinstance(value, (list, tuple)):
        problems.append(Problem(key, f"expected a list, got {_describe_value(value)}"))
        return _INVALID
    item_hint = args[0]
    items = [coerce(v, item_hint, join_key(key, i), problems) for i, v in enumerate(value)]
    return _INVALID if any(i is _INVALID for i in items) else tuple(items)


def _coerce_mapping(value: Any, args: tuple, key: str, problems: list[Problem]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(Problem(key, f"expected a mapping, got {_describe_value(value)}"))
        return _INVALID
    value_hint = args[1] if args else Any
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            problems.append(Problem(join_key(key, str(k)), "keys must be strings"))
            return _INVALID
        out[k] = coerce(v, value_hint, join_key(key, k), problems)
    if any(v is _INVALID for v in out.values()):
        return _INVALID
    return types.MappingProxyType(out)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def describe_type(hint: Any) -> str:
    """A reader's name for a type annotation, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in args)
    if origin is tuple:
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _describe_value(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}.get(
        type(value), "list" if isinstance(value, (list, tuple)) else
        "mapping" if isinstance(value, Mapping) else type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def to_plain(value: Any) -> Any:
    """Dataclasses, read-only mappings and tuples as plain dicts and lists (YAML/JSON-ready)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value

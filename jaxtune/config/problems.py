"""Config problems: what is wrong, under which key, and whether it stops the run.

A config is checked in full before anything runs, so every problem is collected (not just the
first) and reported together: `python -m jaxtune.validate` prints all of them, and a run refuses
to start while any error remains. Warnings never stop a run; they name Axolotl keys that jaxtune
accepts but ignores because they change nothing about what is trained.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable, Literal

from jaxtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, located by its dotted key (`datasets[0].type`)."""

    key: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigProblems(ConfigError):
    """A config has one or more errors; `.problems` lists them all (warnings included)."""

    def __init__(self, problems: Iterable[Problem], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        errors = [p for p in self.problems if p.severity == "error"]
        if len(errors) == 1:
            text = f"{source}: {errors[0]}"
        else:
            text = f"{source} has {len(errors)} problems:\n" + "\n".join(f"  - {p}" for p in errors)
        super().__init__(text)


def raise_if_errors(problems: list[Problem], source: str = "config") -> None:
    if any(p.severity == "error" for p in problems):
        raise ConfigProblems(problems, source)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when none is close."""
    matches = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def join_key(parent: str, child: str | int) -> str:
    if isinstance(child, int):
        return f"{parent}[{child}]"
    return f"{parent}.{child}" if parent else child

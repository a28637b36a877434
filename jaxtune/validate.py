"""`python -m jaxtune.validate --config CFG.yml [--set key=value ...]`: check a config.

Prints the resolved config (every key, defaults and derived values filled in) as YAML on stdout,
then every problem with its key on stderr: errors (exit status 2) and warnings (Axolotl keys that
are accepted but ignored). Nothing is loaded: no model, tokenizer or data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxtune.config import add_config_args, check_config, run_entry, to_yaml
from jaxtune.config.cli import USER_ERROR_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxtune.validate",
        description="Check a config: print the resolved config and every problem with its key.")
    add_config_args(parser)
    args = parser.parse_args(argv)
    report = check_config(args.config, args.overrides)
    if report.config is not None:
        print(f"# resolved config of {args.config}")
        print(to_yaml(report.config), end="")
    for problem in report.problems:
        print(f"{problem.severity}: {problem}", file=sys.stderr)
    if report.errors:
        print(f"{args.config}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)",
              file=sys.stderr)
        return USER_ERROR_EXIT
    print(f"# {args.config}: valid, {len(report.warnings)} warning(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))

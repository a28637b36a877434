"""The command-line pieces every entry module shares: `--config`, `--set`, and error exits.

An entry module reads straight through:

    def main(argv=None):
        parser = argparse.ArgumentParser(prog="python -m jaxtune.train")
        add_config_args(parser)
        args = parser.parse_args(argv)
        cfg = load_config_from_args(args)
        ...

    if __name__ == "__main__":
        sys.exit(run_entry(main))

`run_entry` turns a `JaxtuneError` (bad input the user can fix) into `error: <message>` on
stderr and exit status 2, so nobody sees a traceback for a typo in their YAML.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from jaxtune.config.load import load_config
from jaxtune.config.schema import Config
from jaxtune.errors import JaxtuneError

USER_ERROR_EXIT = 2


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add `--config CFG.yml` (required) and repeatable `--set KEY=VALUE`."""
    parser.add_argument("--config", required=True, metavar="CFG.yml", help="the run's YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; nested keys with dots, value parsed as YAML "
                             "(e.g. --set mesh.tensor=2 --set lora_target_modules=[q_proj,v_proj])")


def load_config_from_args(args: argparse.Namespace) -> Config:
    """The resolved config named by `--config` with `--set` applied; warnings printed to stderr."""
    return load_config(args.config, args.overrides, warn=print_warning)


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_entry(main: Callable[[Sequence[str] | None], int | None],
              argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a JaxtuneError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except JaxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT

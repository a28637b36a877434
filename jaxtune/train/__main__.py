"""`python -m jaxtune.train --config CFG.yml [--set key=value ...]`: train, resuming if possible."""

from __future__ import annotations

import argparse
import sys

from jaxtune.config import add_config_args, load_config_from_args, run_entry
from jaxtune.xla_flags import add_gpu_flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.train", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config_from_args(args)
    add_gpu_flags()  # before jax starts its backend
    from jaxtune.train.run import train  # after argument errors, so --help is instant

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))

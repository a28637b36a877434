"""The `jaxtune` console script: `jaxtune <verb> --config CFG.yml ...` runs `python -m jaxtune.<verb>`."""

from __future__ import annotations

import importlib
import sys

from jaxtune.config import run_entry

VERBS = {
    "train": "jaxtune.train.__main__",
    "preprocess": "jaxtune.preprocess",
    "validate": "jaxtune.validate",
    "export": "jaxtune.export",
    "generate": "jaxtune.generate",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        bad = f"unknown command {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(f"{bad}usage: jaxtune {{{','.join(VERBS)}}} --config CFG.yml [--set key=value ...]",
              file=sys.stderr if bad else sys.stdout)
        return 2 if bad else 0
    module = importlib.import_module(VERBS[argv[0]])
    return run_entry(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())

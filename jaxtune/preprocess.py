"""`python -m jaxtune.preprocess --config CFG.yml [--set key=value ...] [--inspect N [--json]]`

Tokenises, masks, packs and caches the datasets in `dataset_prepared_path` (keyed by a hash of
the data config and the tokenizer; `train` reuses the cache), and prints what it counted: rows
read, kept, dropped or truncated per dataset, tokens and trained tokens, packing efficiency.
`--inspect N` then prints the first N training examples with trained text marked; with `--json`,
one JSON object per example (input_ids, labels, segment_ids, positions) on stdout, and the
counts on stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jaxtune.config import add_config_args, load_config_from_args, run_entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxtune.preprocess",
        description="Tokenise, mask, pack and cache a config's datasets; print what was counted.")
    add_config_args(parser)
    parser.add_argument("--inspect", type=int, default=0, metavar="N",
                        help="print the first N training examples, trained text marked")
    parser.add_argument("--json", action="store_true",
                        help="with --inspect: one JSON object per example on stdout")
    parser.add_argument("--rebuild", action="store_true", help="ignore and rewrite an existing cache")
    args = parser.parse_args(argv)
    if args.inspect < 0:
        parser.error("--inspect N needs N >= 0")
    report_out = sys.stderr if args.json else sys.stdout

    cfg = load_config_from_args(args)
    # After the config is checked: a bad key fails in a second, not after transformers loads.
    from jaxtune.data import load_tokenizer, prepare_datasets
    from jaxtune.data.inspect import TRAINED_CLOSE, TRAINED_OPEN, describe_example, example_json

    tokenizer = load_tokenizer(cfg)
    started = time.perf_counter()
    data = prepare_datasets(cfg, tokenizer, use_cache=not args.rebuild)
    seconds = time.perf_counter() - started
    verb = "reused cache" if data.from_cache else f"prepared in {seconds:.1f} s, cached"
    print(f"{verb}: {data.cache_dir}", file=report_out)
    for line in data.report.lines():
        print(line, file=report_out)

    count = min(args.inspect, len(data.train))
    if count and not args.json:
        print(f"\nfirst {count} training example(s); trained text is between "
              f"{TRAINED_OPEN} and {TRAINED_CLOSE}:")
    for i in range(count):
        example = data.train[i]
        print(example_json(example) if args.json else describe_example(example, tokenizer, i))
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))

"""Show training examples as a person reads them (trained text marked) or as JSON for tools.

`python -m jaxtune.preprocess --inspect N` prints each example's sequences decoded, with the
text that carries labels between TRAINED_OPEN and TRAINED_CLOSE; `--json` prints one JSON object
per example holding exactly the arrays the trainer receives.
"""

from __future__ import annotations

import json

import numpy as np

from jaxtune.data.examples import FIELDS
from jaxtune.data.masking import IGNORE_INDEX

TRAINED_OPEN, TRAINED_CLOSE = "\u27e6", "\u27e7"  # ⟦ trained text ⟧


def describe_example(example: dict[str, np.ndarray], tokenizer, index: int) -> str:
    """A readable rendering of one example: per sequence, the decoded text, trained runs marked."""
    segments = example["segment_ids"]
    labels = example["labels"]
    used = int(np.count_nonzero(segments))
    lines = [f"example {index}: {int(segments.max(initial=0))} sequence(s), {used}/{len(segments)} "
             f"positions used, {int(np.count_nonzero(labels != IGNORE_INDEX))} trained tokens"]
    for segment in range(1, int(segments.max(initial=0)) + 1):
        where = np.flatnonzero(segments == segment)
        ids, trained = example["input_ids"][where], labels[where] != IGNORE_INDEX
        lines.append(f"  sequence {segment}: {len(where)} tokens, {int(trained.sum())} trained")
        lines.append("    " + marked_text(ids, trained, tokenizer).replace("\n", "\n    "))
    return "\n".join(lines)


def marked_text(ids: np.ndarray, trained: np.ndarray, tokenizer) -> str:
    """Decoded text of `ids` with every run of trained tokens wrapped in the trained markers."""
    pieces = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained[start] else text)
            start = end
    return "".join(pieces)


def example_json(example: dict[str, np.ndarray]) -> str:
    """One line of JSON with input_ids, labels (-100 where masked), segment_ids and positions."""
    return json.dumps({name: example[name].tolist() for name in FIELDS})

"""What preprocessing did to the data, counted: nothing is dropped or cut without being reported.

`preprocess` prints the report; `train` prints it too when it builds or reuses the cache, and the
report is stored in the cache so a reused cache reports the same numbers.
"""

from __future__ import annotations

import collections
import dataclasses

MAX_BAD_ROW_EXAMPLES = 5


@dataclasses.dataclass
class DatasetCounts:
    """Row and token counts of one dataset entry."""

    name: str  # e.g. "datasets[0] (data/train.jsonl)"
    rows_read: int = 0
    bad_rows: int = 0  # malformed, skipped with skip_bad_rows
    dropped_too_long: int = 0  # longer than sequence_len, excess_length_strategy: drop
    truncated: int = 0  # longer than sequence_len, excess_length_strategy: truncate
    dropped_untrained: int = 0  # no token carries a label (nothing to learn from)
    rows_kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    format_notes: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. turns without EOT
    bad_row_examples: list[str] = dataclasses.field(default_factory=list)

    def note_bad_row(self, message: str) -> None:
        self.bad_rows += 1
        if len(self.bad_row_examples) < MAX_BAD_ROW_EXAMPLES:
            self.bad_row_examples.append(message)

    def lines(self) -> list[str]:
        out = [f"{self.name}: {self.rows_read} rows read, {self.rows_kept} kept, "
               f"{self.tokens} tokens ({self.trained_tokens} trained)"]
        losses = [(self.bad_rows, "malformed rows skipped (skip_bad_rows)"),
                  (self.dropped_too_long, "rows longer than sequence_len dropped"),
                  (self.truncated, "rows longer than sequence_len truncated"),
                  (self.dropped_untrained, "rows with no trained tokens dropped")]
        out += [f"  {count} {what}" for count, what in losses if count]
        out += [f"  {count} {what}" for what, count in self.format_notes.items() if count]
        out += [f"    e.g. {example}" for example in self.bad_row_examples]
        return out


@dataclasses.dataclass
class SplitStats:
    """Rows and packed examples of one split (train or eval)."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    efficiency: float = 0.0  # tokens / (examples * sequence_len): the share of non-padding

    def line(self, name: str, packed: bool) -> str:
        unit = "packed rows" if packed else "rows"
        return (f"{name}: {self.rows} sequences -> {self.examples} {unit}, {self.tokens} tokens "
                f"({self.trained_tokens} trained), {100 * self.efficiency:.1f}% of positions hold tokens")


@dataclasses.dataclass
class DataReport:
    """Everything preprocessing counted, per dataset and per split."""

    datasets: list[DatasetCounts]
    sequence_len: int
    sample_packing: bool
    train: SplitStats = dataclasses.field(default_factory=SplitStats)
    eval: SplitStats | None = None

    def lines(self) -> list[str]:
        out = [line for counts in self.datasets for line in counts.lines()]
        out.append(self.train.line("train", self.sample_packing))
        if self.eval is not None:
            out.append(self.eval.line("eval", self.sample_packing))
        if self.sample_packing:
            out.append(f"packing efficiency: {100 * self.train.efficiency:.1f}% "
                       f"(sequence_len {self.sequence_len})")
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DataReport:
        data = dict(data)
        data["datasets"] = [DatasetCounts(**d) for d in data["datasets"]]
        data["train"] = SplitStats(**data["train"])
        data["eval"] = SplitStats(**data["eval"]) if data.get("eval") else None
        return cls(**data)


def merge_notes(counts: DatasetCounts, notes: collections.Counter) -> None:
    for what, count in notes.items():
        counts.format_notes[what] = counts.format_notes.get(what, 0) + count

"""Formats that spell out which text is trained: `input_output` rows, and a user's own Python
function (`type: my_module:my_function`) returning the same (text, trained) pieces.

`input_output` rows look like `{"segments": [{"text": "...", "label": false}, {"text": "...",
"label": true}]}` (Axolotl's template-free format): the texts are concatenated exactly as given
(no EOS is added; write it into the text) and tokenised once; labelled segments are trained.
"""

from __future__ import annotations

import abc

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from jaxtune.data.formats.base import EncodedRow, RowError, RowFormat
from jaxtune.data.formats.pretokenized import check_token_ids
from jaxtune.data.masking import encode_with_spans, join_segments
from jaxtune.errors import ConfigError


class SegmentsFormat(RowFormat):
    """Rows given as (text, trained) pieces; subclasses say how a row yields its pieces."""

    @abc.abstractmethod
    def pieces(self, row: dict[str, Any]) -> list[tuple[str, bool]] | EncodedRow:
        """The row's (text, trained) pieces, or an already encoded row; a RowError if malformed."""

    def encode(self, rows):
        results: list[EncodedRow | RowError | None] = []
        texts, spans = [], []
        for row in rows:
            try:
                pieces = self.pieces(row)
            except RowError as e:
                results.append(e)
                continue
            if isinstance(pieces, EncodedRow):  # a function may return tokens directly
                results.append(pieces)
                continue
            text, row_spans = join_segments(pieces)
            texts.append(text)
            spans.append(row_spans)
            results.append(None)
        encoded = iter(encode_with_spans(self.tokenizer, texts, spans, add_special_tokens=True,
                                         train_all=self.cfg.train_on_inputs))
        return [r if r is not None else EncodedRow(*next(encoded)) for r in results]


class InputOutputFormat(SegmentsFormat):
    name = "input_output"

    def pieces(self, row):
        segments = row.get("segments")
        if segments is None:
            raise RowError("segments", "missing field 'segments'")
        if not isinstance(segments, list) or not segments:
            raise RowError("segments", "field 'segments' must be a non-empty list of {text, label}")
        return [_segment(s, f"segments[{i}]") for i, s in enumerate(segments)]


def _segment(segment: Any, where: str) -> tuple[str, bool]:
    if not isinstance(segment, Mapping):
        raise RowError(where, f"{where} must be a mapping with text and label")
    text, label = segment.get("text"), segment.get("label")
    if not isinstance(text, str):
        raise RowError(f"{where}.text", f"{where}.text must be a string, got {type(text).__name__}")
    if not isinstance(label, bool):
        raise RowError(f"{where}.label", f"{where}.label must be true or false, got {label!r}")
    return text, label


class FunctionFormat(SegmentsFormat):
    """`type: package.module:function` (or `package.module.function`): the function takes a row
    (a dict) and returns a list of `(text, trained)` pairs or `{"text", "label"}` mappings, or a
    mapping with `input_ids` and optional `labels` (already tokenised)."""

    name = "function"

    def __init__(self, ds, cfg, tokenizer, key):
        super().__init__(ds, cfg, tokenizer, key)
        self.function = import_function(ds.type, f"{key}.type")
        self.vocab_size = len(tokenizer)

    def pieces(self, row):
        try:
            result = self.function(row)
        except RowError:
            raise
        except Exception as e:  # the user's code: report which row broke it, not a traceback
            raise RowError("", f"{self.ds.type} raised {type(e).__name__}: {e}") from None
        if isinstance(result, Mapping) and "input_ids" in result:
            ids, labels = check_token_ids(result.get("input_ids"), result.get("labels"), self.vocab_size)
            return EncodedRow(ids, ids.copy() if self.cfg.train_on_inputs else labels)
        if not isinstance(result, (list, tuple)):
            raise RowError("", f"{self.ds.type} must return a list of (text, trained) pairs or a "
                               f"mapping with input_ids, got {type(result).__name__}")
        pieces = []
        for i, piece in enumerate(result):
            if isinstance(piece, Mapping):
                pieces.append(_segment(piece, f"result[{i}]"))
            elif (isinstance(piece, (list, tuple)) and len(piece) == 2 and isinstance(piece[0], str)
                  and isinstance(piece[1], bool)):
                pieces.append((piece[0], piece[1]))
            else:
                raise RowError("", f"{self.ds.type} returned {piece!r} at position {i}; "
                                   "expected a (text, trained) pair")
        return pieces


def import_function(path: str, key: str) -> Callable[[dict], Any]:
    """The function named `module:function` or `module.function`; a ConfigError naming `key`."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: {path!r} is not a built-in format and module {module_name!r} "
                          f"cannot be imported ({e})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"{key}: module {module_name!r} has no function {attr!r}")
    return function


def function_fingerprint(path: str) -> str:
    """The function's source, so editing it invalidates the preprocessed cache (the path itself
    when it cannot be read; building the format then reports why)."""
    try:
        return inspect.getsource(import_function(path, "type"))
    except (ConfigError, OSError, TypeError):
        return path


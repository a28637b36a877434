"""Loss masking by character offsets: a token is trained iff its characters overlap a trained span.

Every format reduces a row to one string and the character spans whose tokens carry labels (the
completion; every assistant message's content). The whole string is tokenised once, with offsets,
and each token's label is decided by where its characters lie. Tokenising prompt and completion
separately and concatenating would produce different tokens than the model sees at inference
(tokens merge across the boundary), and re-tokenising a fragment to find it again fails the same
way; offsets have neither problem.

Labels are the input ids themselves (not shifted) with -100 where masked: the trainer predicts
token t+1 from token t (see `jaxtune.data.loader`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch/HF convention)

Span = tuple[int, int]  # [start, end) in characters of the rendered text


def encode_texts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool) -> list:
    """`tokenizers.Encoding`s (ids and character offsets) of `texts`, in one batched call.

    The Rust tokenizer encodes the batch on all cores; special tokens written in the text
    (`<|eot_id|>`, `</s>`) become their single ids, exactly as in `apply_chat_template`.
    """
    return tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)


def ids_and_offsets(encoding) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T], coverage int32 [T, 2]) of one encoding.

    Coverage is the tokenizer's offsets made contiguous: each token covers from the end of the
    tokens before it to its own end. Tokenizers that trim offsets (GPT-2's ByteLevel with
    trim_offsets) give a whitespace token an empty range after the whitespace, so it would
    overlap nothing; with coverage, whitespace inside a trained span is trained like any token.
    For untrimmed tokenizers (Llama-3, Qwen, Mistral) coverage equals the offsets. Tokens the
    post-processor adds (BOS, offsets (0, 0)) keep an empty range.
    """
    ids = np.asarray(encoding.ids, dtype=np.int32)
    offsets = np.asarray(encoding.offsets, dtype=np.int32).reshape(len(ids), 2)
    if len(ids) > 1:
        reached = np.maximum.accumulate(offsets[:, 1])
        starts = np.concatenate([offsets[:1, 0], reached[:-1]])
        offsets = np.stack([starts, np.maximum(offsets[:, 1], starts)], axis=1)
    return ids, offsets


def span_mask(offsets: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
    """bool [T]: tokens whose characters (coverage, see `ids_and_offsets`) overlap any span.

    A token straddling a span boundary counts as inside (it carries trained text). Tokens the
    tokenizer adds itself (BOS from the post-processor) cover nothing and are never inside.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        if end > start:
            mask |= (ends > start) & (starts < end)
    return mask


def completion_start(encoding, text_length: int, spans: Sequence[Span]) -> int | None:
    """Index of the first trained token when `spans` is one span running to the end of the text
    (a completion), found without building the offsets array (most of the masking cost on large
    datasets); None when the spans are anything else or no token holds the span's first
    character (trimmed whitespace), and the general path must decide."""
    if len(spans) == 1 and spans[0][1] == text_length and spans[0][0] < text_length:
        return encoding.char_to_token(spans[0][0])
    return None


def labels_from_mask(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int32 [T]: ids where `mask`, IGNORE_INDEX elsewhere."""
    return np.where(mask, ids, IGNORE_INDEX).astype(np.int32)


def encode_with_spans(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[Span]], *,
                      add_special_tokens: bool, train_all: bool = False
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) per text; labels cover the tokens of `spans` (all tokens if `train_all`)."""
    out = []
    encodings = encode_texts(tokenizer, texts, add_special_tokens=add_special_tokens)
    for text, encoding, row_spans in zip(texts, encodings, spans, strict=True):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        labels = ids.copy()
        if not train_all:
            first = completion_start(encoding, len(text), row_spans)
            if first is not None:
                labels[:first] = IGNORE_INDEX
            else:
                labels = labels_from_mask(ids, span_mask(ids_and_offsets(encoding)[1], row_spans))
        out.append((ids, labels))
    return out


def join_segments(segments: Sequence[tuple[str, bool]]) -> tuple[str, list[Span]]:
    """Concatenate (text, trained) pieces into one string and the spans of the trained pieces."""
    parts, spans, cursor = [], [], 0
    for text, trained in segments:
        if trained and text:
            spans.append((cursor, cursor + len(text)))
        parts.append(text)
        cursor += len(text)
    return "".join(parts), spans

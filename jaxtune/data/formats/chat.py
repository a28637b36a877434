"""Conversations rendered with a chat template, every trained turn masked in (`chat_template`,
and `sharegpt`, which is the same with `from`/`value` keys).

How trained spans are found. The conversation is rendered once, exactly as
`apply_chat_template` renders it. To locate message i in that text, it is rendered again with
message i's content replaced by a sentinel (private-use characters no template or dataset
produces): the text before the sentinel is the rendered prefix, the text after it the suffix, and
in the real rendering message i's content is what lies between them. This follows the template
wherever it puts the message (Mistral moves the system prompt into a user turn) and whatever it
does to the content (Llama-3 trims it), without re-tokenising fragments. The full text is then
tokenised once with offsets, and a token is trained iff its characters overlap a trained content
span (`jaxtune.data.masking`).

End-of-turn tokens. After a trained turn's content, the template writes the token that ends
the turn (`<|eot_id|>`, `<|im_end|>`, `</s>`). A model that never sees it trained never learns to
stop, so per `train_on_eos` it is trained too: `turn` (default) after every trained turn, `last`
after the last one, `all` after every turn, `none` never. The end-of-turn tokens are
`eot_tokens:` if set, else the tokenizer's EOS and the known end-of-turn tokens it has. Whitespace
between content and that token is trained with it; a trained turn followed by anything else is
counted and reported (never silently skipped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jinja2
import numpy as np

from jaxtune.data.formats.base import EncodedRow, RowError, RowFormat
from jaxtune.data.masking import encode_texts, ids_and_offsets, labels_from_mask, span_mask
from jaxtune.data.templates import BUILTIN_END_OF_TURN, compile_template, select_template
from jaxtune.errors import ConfigError

SENTINEL = "\ue000\ue001"
# Canonical role -> the names datasets use for it (Axolotl's defaults).
DEFAULT_ROLES = {"user": ("human", "user"), "assistant": ("gpt", "assistant", "model"),
                 "system": ("system",), "tool": ("tool",)}
# End-of-turn tokens of the common templates; those the tokenizer has count as end-of-turn.
KNOWN_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
MAX_GAP_TOKENS = 4  # whitespace tokens allowed between a turn's content and its end-of-turn token
TURNS_WITHOUT_EOT = "turns with no end-of-turn token after them to train (train_on_eos)"


class ChatFormat(RowFormat):
    name = "chat_template"

    def __init__(self, ds, cfg, tokenizer, key):
        super().__init__(ds, cfg, tokenizer, key)
        sharegpt = ds.type == "sharegpt"
        self.name = ds.type
        self.field_messages = ds.field_messages or ("conversations" if sharegpt else "messages")
        mappings = dict(ds.message_property_mappings or {})
        self.role_key = mappings.get("role") or ds.message_field_role or ("from" if sharegpt else "role")
        self.content_key = (mappings.get("content") or ds.message_field_content
                            or ("value" if sharegpt else "content"))
        # `roles:` overrides the default names of the roles it lists; the others keep theirs.
        roles = {**DEFAULT_ROLES, **{r: tuple(names) for r, names in (ds.roles or {}).items()}}
        self.role_of = {name: role for role, names in roles.items() for name in names}
        self.roles_to_train = {self.role_of.get(r, r) for r in (ds.roles_to_train or ("assistant",))}
        self.train_on_eos = ds.train_on_eos or "turn"
        template_name = ds.chat_template or cfg.chat_template
        source = select_template(template_name, ds.chat_template_jinja or cfg.chat_template_jinja,
                                 tokenizer, key)
        self.template = compile_template(source, key)
        self.template_vars = dict(tokenizer.special_tokens_map)
        self.eot_ids = end_of_turn_ids(tokenizer, cfg.eot_tokens, template_name)

    # --- rendering

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=False, tools=None,
                                        documents=None, **self.template_vars)
        except jinja2.TemplateError as e:
            raise RowError(self.field_messages, f"chat template error: {e}") from None

    def locate(self, messages: list[dict[str, str]], i: int, text: str) -> tuple[int, int] | None:
        """[start, end) of message i's content in `text` (the full rendering), or None if the
        template does not write it."""
        if not messages[i]["content"]:
            return None
        probe = list(messages)
        probe[i] = {**messages[i], "content": SENTINEL}
        rendered = self.render(probe)
        count = rendered.count(SENTINEL)
        if count == 0:
            return None
        where = f"{self.field_messages}[{i}]"
        if count > 1:
            raise RowError(where, "the chat template writes this message more than once; "
                                  "cannot tell which copy to train")
        at = rendered.index(SENTINEL)
        prefix, suffix = rendered[:at], rendered[at + len(SENTINEL):]
        if (len(prefix) + len(suffix) > len(text) or not text.startswith(prefix)
                or not text.endswith(suffix)):
            raise RowError(where, "the chat template changes the text around this message depending "
                                  "on its content, so its span cannot be located")
        return at, len(text) - len(suffix)

    # --- rows

    def messages_of(self, row: dict[str, Any]) -> tuple[list[dict[str, str]], list[bool]]:
        """Messages with canonical roles, and whether each one is trained."""
        raw = row.get(self.field_messages)
        if raw is None:
            raise RowError(self.field_messages, f"missing field '{self.field_messages}'")
        if not isinstance(raw, list):
            raise RowError(self.field_messages, f"field '{self.field_messages}' must be a list of messages")
        messages, trained = [], []
        for i, message in enumerate(raw):
            where = f"{self.field_messages}[{i}]"
            if not isinstance(message, Mapping):
                raise RowError(where, f"{where} must be a mapping, got {type(message).__name__}")
            role, content = message.get(self.role_key), message.get(self.content_key)
            if not isinstance(role, str):
                raise RowError(f"{where}.{self.role_key}", f"{where} has no '{self.role_key}' string")
            if not isinstance(content, str):
                raise RowError(f"{where}.{self.content_key}",
                               f"{where} has no '{self.content_key}' string")
            role = self.role_of.get(role, role)
            if role == "system" and self.ds.drop_system_message:
                continue
            flag = message.get(self.ds.message_field_training) if self.ds.message_field_training else None
            if flag is not None and not isinstance(flag, bool):
                raise RowError(f"{where}.{self.ds.message_field_training}", "must be true or false")
            # Other keys (name, tool_calls, ...) reach the template as in the data; null ones are
            # dropped, since HF datasets adds every key any message has, as null, to all others.
            extra = {k: v for k, v in message.items()
                     if v is not None and k not in (self.role_key, self.content_key)}
            messages.append({**extra, "role": role, "content": content})
            trained.append(flag if flag is not None else role in self.roles_to_train)
        if not messages:
            raise RowError(self.field_messages, "the conversation has no messages")
        return messages, trained

    def plan(self, row: dict[str, Any]) -> tuple[str, list[tuple[int, int]], list[int]]:
        """(rendered text, trained content spans, character positions after which an end-of-turn
        token is trained)."""
        messages, trained = self.messages_of(row)
        text = self.render(messages)
        if self.cfg.train_on_inputs:
            return text, [(0, len(text))], []
        wanted = range(len(messages)) if self.train_on_eos == "all" else \
            [i for i, t in enumerate(trained) if t]
        spans = {i: self.locate(messages, i, text) for i in wanted}
        content = [spans[i] for i in wanted if trained[i] and spans[i] is not None]
        turn_ends = {"turn": [s[1] for s in content], "last": [s[1] for s in content[-1:]],
                     "all": [s[1] for s in spans.values() if s is not None], "none": []}
        return text, content, turn_ends[self.train_on_eos]

    def encode(self, rows):
        plans: list[tuple | RowError] = []
        for row in rows:
            try:
                plans.append(self.plan(row))
            except RowError as e:
                plans.append(e)
        texts = [p[0] for p in plans if not isinstance(p, RowError)]
        encodings = iter(encode_texts(self.tokenizer, texts, add_special_tokens=False))
        results: list[EncodedRow | RowError] = []
        for p in plans:
            if isinstance(p, RowError):
                results.append(p)
                continue
            text, content, turn_ends = p
            ids, offsets = ids_and_offsets(next(encodings))
            mask = span_mask(offsets, content)
            for end in turn_ends:
                if not self.mark_end_of_turn(text, ids, offsets, end, mask):
                    self.count(TURNS_WITHOUT_EOT)
            results.append(EncodedRow(ids, labels_from_mask(ids, mask)))
        return results

    def mark_end_of_turn(self, text: str, ids: np.ndarray, offsets: np.ndarray, end: int,
                         mask: np.ndarray) -> bool:
        """Train the end-of-turn token after character `end` (and whitespace before it)."""
        first = int(np.searchsorted(offsets[:, 0], end, side="left"))
        for j in range(first, min(first + MAX_GAP_TOKENS + 1, len(ids))):
            if int(ids[j]) in self.eot_ids:
                mask[first:j + 1] = True
                return True
            start, stop = offsets[j]
            if not text[start:stop].isspace():
                return False
        return False


def end_of_turn_ids(tokenizer, eot_tokens: tuple[str, ...] | None, template_name: str | None) -> set[int]:
    """Ids of the tokens that end a turn: `eot_tokens` if given, else EOS, the built-in
    template's own end-of-turn token and the known end-of-turn tokens the tokenizer has."""
    vocab = tokenizer.get_vocab()
    if eot_tokens:
        ids = set()
        for i, token in enumerate(eot_tokens):
            if token not in vocab:
                raise ConfigError(f"eot_tokens[{i}]: {token!r} is not a single token of the tokenizer")
            ids.add(vocab[token])
        return ids
    names = [tokenizer.eos_token, *KNOWN_END_OF_TURN]
    if template_name in BUILTIN_END_OF_TURN:
        names.append(BUILTIN_END_OF_TURN[template_name])
    return {vocab[n] for n in names if n and n in vocab}

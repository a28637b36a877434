"""Formats that are one prompt followed by one trained completion: alpaca, a custom prompt
mapping (Axolotl's `type: {format: ...}`), and completion (an empty prompt).

The row becomes `prompt + completion + eos` tokenised once; the completion and its EOS carry
labels, the prompt does not (unless `train_on_inputs`). The prompt wording is Axolotl's, so a
model fine-tuned with either tool sees the same text.
"""

from __future__ import annotations

import abc
from typing import Any

from jaxtune.config.dataset_schema import UserPromptFormat
from jaxtune.data.formats.base import EncodedRow, RowError, RowFormat, optional_text, require_text
from jaxtune.data.masking import encode_with_spans
from jaxtune.errors import ConfigError

# Axolotl's AlpacaPrompter wording.
ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request.\n\n")
ALPACA_SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n")
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class PromptCompletionFormat(RowFormat):
    """Tokenises `prompt + completion + eos`; the completion and EOS are trained."""

    def __init__(self, *args):
        super().__init__(*args)
        self._eos = self.eos_text()

    @abc.abstractmethod
    def split(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, completion) of one row; a RowError if a field is missing."""

    def encode(self, rows):
        results: list[EncodedRow | RowError | None] = []
        texts, spans = [], []
        for row in rows:
            try:
                prompt, completion = self.split(row)
            except RowError as e:
                results.append(e)
                continue
            text = prompt + completion + self._eos
            texts.append(text)
            spans.append([(len(prompt), len(text))])
            results.append(None)
        encoded = iter(encode_with_spans(self.tokenizer, texts, spans, add_special_tokens=True,
                                         train_all=self.cfg.train_on_inputs))
        return [r if r is not None else EncodedRow(*next(encoded)) for r in results]


class AlpacaFormat(PromptCompletionFormat):
    """Rows with `instruction`, optional `input`, `output`, optional `system` (replaces the preamble)."""

    name = "alpaca"

    def split(self, row):
        instruction = require_text(row, "instruction")
        output = require_text(row, "output")
        extra = optional_text(row, "input")
        system = optional_text(row, "system")
        if extra:
            prompt = (system or ALPACA_SYSTEM) + ALPACA_TURN.format(instruction=instruction, input=extra)
        else:
            prompt = (system or ALPACA_SYSTEM_NO_INPUT) + ALPACA_TURN_NO_INPUT.format(instruction=instruction)
        return prompt, output


class CustomPromptFormat(PromptCompletionFormat):
    """Axolotl's user-defined prompt: `type: {format: "...{instruction}...", field_*: ...}`."""

    name = "custom prompt"

    def __init__(self, ds, cfg, tokenizer, key):
        super().__init__(ds, cfg, tokenizer, key)
        self.spec: UserPromptFormat = ds.type
        for field in ("format", "no_input_format", "system_format"):
            template = getattr(self.spec, field)
            if template is None:
                continue
            try:
                template.format(instruction="", input="", system="")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"{key}.type.{field}: {template!r} is not a valid format string "
                                  f"(only {{instruction}}, {{input}} and {{system}} may appear): {e}") from None

    def split(self, row):
        s = self.spec
        instruction = require_text(row, s.field_instruction)
        output = require_text(row, s.field_output)
        extra = optional_text(row, s.field_input)
        system = optional_text(row, s.field_system) or s.system_prompt
        template = s.format if extra or not s.no_input_format else s.no_input_format
        prompt = s.system_format.format(system=system) if system else ""
        prompt += template.format(instruction=instruction, input=extra)
        return prompt, output


class CompletionFormat(PromptCompletionFormat):
    """Raw text, all of it trained: `field` (default `text`)."""

    name = "completion"

    def split(self, row):
        return "", require_text(row, self.ds.field or "text")

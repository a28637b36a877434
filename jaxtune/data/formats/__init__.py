"""Dataset formats (`type:` of a dataset entry) and the one function that picks one."""

from __future__ import annotations

from jaxtune.config.dataset_schema import DatasetConfig
from jaxtune.config.schema import Config
from jaxtune.data.formats.base import EncodedRow, RowError, RowFormat
from jaxtune.data.formats.chat import ChatFormat
from jaxtune.data.formats.pretokenized import PretokenizedFormat
from jaxtune.data.formats.prompt_completion import AlpacaFormat, CompletionFormat, CustomPromptFormat
from jaxtune.data.formats.segments import FunctionFormat, InputOutputFormat

FORMAT_CLASSES: dict[str, type[RowFormat]] = {
    "alpaca": AlpacaFormat,
    "completion": CompletionFormat,
    "input_output": InputOutputFormat,
    "chat_template": ChatFormat,
    "sharegpt": ChatFormat,
    "pretokenized": PretokenizedFormat,
    "user_prompt": CustomPromptFormat,
    "function": FunctionFormat,
}


def make_format(ds: DatasetConfig, cfg: Config, tokenizer, key: str) -> RowFormat:
    """The format that reads dataset `ds` (`key` names it in errors, e.g. 'datasets[0]')."""
    return FORMAT_CLASSES[ds.format_name](ds, cfg, tokenizer, key)


__all__ = ["EncodedRow", "RowError", "RowFormat", "make_format", "FORMAT_CLASSES"]

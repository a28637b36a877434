"""One entry of `datasets:` / `test_datasets:`: where rows come from and how they become tokens.

Key names and meanings are Axolotl's (`path`, `type`, `split`, `field_messages`,
`message_property_mappings`, `roles_to_train`, `train_on_eos`, ...), so an Axolotl dataset block
works unchanged. Defaults that depend on the format (sharegpt reads `conversations` with
`from`/`value`, chat_template reads `messages` with `role`/`content`) are left `None` here and
filled in by the format in `jaxtune.data.formats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from jaxtune.config.problems import ConfigProblems, Problem, did_you_mean

# Built-in `type:` values. Anything else with a dot or colon names a user's Python function
# (`my_pkg.formats:to_segments`), see `jaxtune.data.formats.custom_function`.
FORMATS = ("alpaca", "completion", "input_output", "chat_template", "sharegpt", "pretokenized")
TRAIN_ON_EOS = ("turn", "all", "last", "none")
# Names `chat_template:` accepts besides `tokenizer_default[_fallback_<name>]`, `jinja` and a Jinja
# string; the templates themselves are in `jaxtune.data.templates` (a test keeps the two equal).
CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "mistral", "mistral_v1", "mistral_v2v3", "qwen", "qwen_25")
FILE_TYPES = ("json", "csv", "parquet", "arrow", "text")


def _help(default=dataclasses.MISSING, *, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserPromptFormat:
    """Axolotl's custom prompt format given as a mapping under `type:` (an instruction template)."""

    format: str = _help(
        help="prompt template with {instruction} and {input}; the output is appended")
    no_input_format: str | None = _help(None, help="prompt template for rows with an empty input")
    system_prompt: str = _help("", help="system text used when a row has no system field")
    system_format: str = _help("{system}", help="how the system text is written before the prompt")
    field_system: str = _help("system", help="column holding a per-row system text")
    field_instruction: str = _help("instruction", help="column holding the instruction")
    field_input: str = _help("input", help="column holding the (optional) input")
    field_output: str = _help("output", help="column holding the trained response")

    def __post_init__(self):
        problems = []
        if "{instruction}" not in self.format:
            problems.append(Problem("format", "must contain {instruction}"))
        if "{system}" not in self.system_format:
            problems.append(Problem("system_format", "must contain {system}"))
        if problems:
            raise ConfigProblems(problems)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """Where one dataset comes from and how its rows are formatted and masked."""

    path: str = _help(
        help="local .json/.jsonl/.parquet/.csv/.arrow file or folder, or a hub dataset name")
    type: str | UserPromptFormat | None = _help(
        None, help="row format: alpaca, completion, input_output, chat_template, sharegpt, "
                   "pretokenized, a mapping (custom prompt), or module:function; None = pretokenized")
    name: str | None = _help(None, help="dataset configuration name (load_dataset's `name`)")
    split: str = _help("train", help="split to read, e.g. train or train[:1000]")
    data_files: str | tuple[str, ...] | None = _help(None, help="files within `path` to read")
    revision: str | None = _help(None, help="hub dataset revision")
    ds_type: Literal["json", "csv", "parquet", "arrow", "text"] | None = _help(
        None, help="file format when the file extension does not say")
    shards: int | None = _help(None, help="split the dataset into this many shards and keep one")
    shards_idx: int | None = _help(None, help="which shard to keep (default 0)")
    # completion
    field: str | None = _help(None, help="completion: the text column (default `text`)")
    # chat_template / sharegpt
    field_messages: str | None = _help(
        None, help="column holding the conversation (default messages; sharegpt: conversations)")
    message_property_mappings: Mapping[str, str] | None = _help(
        None, help="message keys for role and content, e.g. {role: from, content: value}")
    message_field_role: str | None = _help(
        None, help="older spelling of message_property_mappings.role")
    message_field_content: str | None = _help(
        None, help="older spelling of message_property_mappings.content")
    message_field_training: str | None = _help(
        None, help="per-message boolean key that overrides roles_to_train for that message")
    roles: Mapping[str, tuple[str, ...]] | None = _help(
        None, help="role names in the data for each template role, e.g. {assistant: [gpt, model]}")
    roles_to_train: tuple[str, ...] | None = _help(
        None, help="roles whose turns carry labels (default [assistant])")
    train_on_eos: Literal["turn", "all", "last", "none"] | None = _help(
        None, help="which end-of-turn tokens carry labels: turn (of trained turns), all, last, none")
    chat_template: str | None = _help(
        None, help="template for this dataset (overrides the top level)")
    chat_template_jinja: str | None = _help(None, help="Jinja template when chat_template: jinja")
    drop_system_message: bool = _help(False, help="drop system turns before rendering")
    trust_remote_code: bool = _help(False, help="run a hub dataset's loading script (refused)")

    def __post_init__(self):
        problems = []
        if isinstance(self.type, str) and self.type not in FORMATS and not _names_function(self.type):
            problems.append(Problem("type", f"unknown dataset type {self.type!r}"
                                    f"{did_you_mean(self.type, FORMATS)}; "
                                    f"built-in types: {', '.join(FORMATS)}, or module:function"))
        if self.trust_remote_code:
            problems.append(Problem("trust_remote_code",
                                    "jaxtune does not run code from dataset repositories"))
        if self.shards is not None and self.shards < 1:
            problems.append(Problem("shards", f"must be >= 1, got {self.shards}"))
        if self.shards_idx is not None:
            if self.shards is None:
                problems.append(Problem("shards_idx", "needs shards"))
            elif not 0 <= self.shards_idx < self.shards:
                problems.append(Problem("shards_idx",
                                        f"must be in [0, {self.shards}), got {self.shards_idx}"))
        mappings = self.message_property_mappings or {}
        for legacy, prop in (("message_field_role", "role"), ("message_field_content", "content")):
            if getattr(self, legacy) is not None and prop in mappings:
                problems.append(Problem(legacy, f"set either {legacy} or message_property_mappings.{prop}"))
        problems += chat_template_problems(self.chat_template, self.chat_template_jinja)
        if problems:
            raise ConfigProblems(problems)

    @property
    def format_name(self) -> str:
        """The format that reads this dataset: a built-in name, `user_prompt` or `function`."""
        if self.type is None:
            return "pretokenized"
        if isinstance(self.type, UserPromptFormat):
            return "user_prompt"
        return self.type if self.type in FORMATS else "function"


def chat_template_problems(name: str | None, jinja: str | None) -> list[Problem]:
    """Problems with a `chat_template` / `chat_template_jinja` pair (top level or per dataset)."""
    if name is None or "{%" in name or "{{" in name:
        return []
    choices = [*CHAT_TEMPLATE_NAMES, "tokenizer_default", "jinja"]
    fallback = name.removeprefix("tokenizer_default_fallback_")
    if name == "jinja" and not jinja:
        return [Problem("chat_template_jinja", "required when chat_template is 'jinja'")]
    if name not in choices and (fallback == name or fallback not in CHAT_TEMPLATE_NAMES):
        return [Problem("chat_template", f"unknown template {name!r}{did_you_mean(name, choices)}; "
                                         f"choose from {', '.join(choices)}, "
                                         "tokenizer_default_fallback_<name>, or a Jinja string")]
    return []


def _names_function(type_name: str) -> bool:
    return ":" in type_name or "." in type_name

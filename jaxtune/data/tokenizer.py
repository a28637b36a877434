"""The tokenizer a run uses: loaded from `tokenizer_config`, with the config's tokens applied.

Three config keys change the tokenizer: `special_tokens` (which existing token plays bos, eos,
pad, unk), `tokens` (new tokens, which grow the vocabulary and need the embeddings resized), and
`chat_template` (the template saved with the tokenizer). A `special_tokens` value that is not in
the vocabulary would silently grow it, so it is an error unless the same string is listed under
`tokens` too: that is how a config states the intent to resize. `load_tokenizer` is the one
place this happens, so preprocessing, training and export all see the same tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer

from jaxtune.config.schema import MODULES_TO_SAVE, Config
from jaxtune.data.templates import select_template
from jaxtune.errors import ConfigError

log = logging.getLogger("jaxtune.data")


def load_tokenizer(cfg: Config):
    """The fast tokenizer at `cfg.tokenizer_config` with `special_tokens`, `tokens` and
    `chat_template` applied. `len(tokenizer)` is the vocabulary the embeddings must have."""
    path = cfg.tokenizer_config or cfg.base_model
    key = "tokenizer_config" if path != cfg.base_model else "base_model"
    if path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"{key} {path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, EnvironmentError, ...
        raise ConfigError(
            f"{key} {path!r}: could not load a tokenizer (not a local folder with tokenizer "
            f"files, and the hub could not be reached): {_first_line(e)}") from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConfigError(f"{key} {path!r}: jaxtune needs a fast (tokenizer.json) tokenizer "
                          "to locate trained spans by character offsets")
    apply_config_tokens(tokenizer, cfg)
    if cfg.chat_template:
        tokenizer.chat_template = select_template(cfg.chat_template, cfg.chat_template_jinja,
                                                  tokenizer, key="")
    return tokenizer


def apply_config_tokens(tokenizer, cfg: Config) -> int:
    """Add `tokens` and set `special_tokens` on `tokenizer`; returns how many tokens were added."""
    vocab = tokenizer.get_vocab()
    intended = set(cfg.tokens)
    named = cfg.special_tokens.items()
    problems = []
    for name, token in named.items():
        if token not in vocab and token not in intended:
            problems.append(f"special_tokens.{name}: {token!r} is not in the tokenizer's vocabulary, so "
                            "setting it would add a token and resize the embeddings; choose an existing "
                            f"token, or also list {token!r} under tokens: to add it")
    for i, token in enumerate(cfg.special_tokens.additional_special_tokens):
        if token not in vocab and token not in intended:
            problems.append(f"special_tokens.additional_special_tokens[{i}]: {token!r} is not in the "
                            "vocabulary; also list it under tokens: to add it")
    if problems:
        raise ConfigError("\n".join(problems) if len(problems) == 1
                          else f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    before = len(tokenizer)
    special = set(named.values()) | set(cfg.special_tokens.additional_special_tokens)
    new_plain = [AddedToken(t, normalized=False, special=False)
                 for t in cfg.tokens if t not in vocab and t not in special]
    if new_plain:
        tokenizer.add_tokens(new_plain)
    if named:
        tokenizer.add_special_tokens({name: AddedToken(token, normalized=False, special=True)
                                      for name, token in named.items()})
    if cfg.special_tokens.additional_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, normalized=False, special=True)
            for t in cfg.special_tokens.additional_special_tokens]})
    added = len(tokenizer) - before
    if added and cfg.adapter and not set(MODULES_TO_SAVE) <= set(cfg.lora_modules_to_save):
        raise ConfigError(
            f"tokens: {added} new token(s) are added, and their embeddings start untrained; with "
            f"adapter: {cfg.adapter} set lora_modules_to_save: [embed_tokens, lm_head] so they are trained")
    if added:
        log.info("added %d token(s) to the vocabulary (now %d)", added, len(tokenizer))
    return added


def pad_token_id(tokenizer) -> int:
    """The id written into padding positions (masked by segment id 0 and label -100 anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token, including added ones like <|start_header_id|>."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

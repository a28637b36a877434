"""Model families jaxtune converts, by HF `model_type`."""

from __future__ import annotations

from types import ModuleType

from jaxtune.converters.families import llama, mistral, qwen2, qwen3
from jaxtune.errors import ConversionError

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (llama, mistral, qwen2, qwen3)}


def family(model_type: str | None, where: str = "config.json") -> ModuleType:
    """The converter module for `model_type`, or a ConversionError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ConversionError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]

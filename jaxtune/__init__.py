"""jaxtune: fine-tune open LLMs (Llama, Mistral, Qwen) in JAX from one Axolotl-style YAML file."""

from jaxtune.pretrained import PretrainedModel, load_pretrained

__all__ = ["PretrainedModel", "load_pretrained"]
__version__ = "0.1.0"

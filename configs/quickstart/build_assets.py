"""Build the quickstart's tiny model, tokenizer and dataset (what `configs/quickstart.yml` uses).

    python configs/quickstart/build_assets.py

Writes, next to this file: `model/` (an HF Llama folder: config.json, model.safetensors with
random weights, a word-level tokenizer with a chat template) and `capitals.jsonl` (alpaca rows:
"What is the capital of X?" → "The capital of X is Y."). The model knows nothing at first; after
the quickstart run, `python -m jaxtune.generate --config configs/quickstart.yml --prompt ...`
answers from what it learned. Deterministic: rebuilding gives the same files.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from jaxtune.converters.families import family
from jaxtune.converters.hf import save_hf
from jaxtune.model.config import ModelConfig, RopeConfig
from jaxtune.model.params import init_params

HERE = os.path.dirname(os.path.abspath(__file__))
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna",
    "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ireland": "Dublin", "Cuba": "Havana",
    "Australia": "Canberra", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Morocco": "Rabat",
    "Ghana": "Accra", "Nigeria": "Abuja", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Iran": "Tehran",
    "Iraq": "Baghdad", "Hungary": "Budapest", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern",
}
QUESTIONS = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
             "{c} has which capital?"]
ANSWER = "The capital of {c} is {k}."
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|>"
    "{% else %}<|assistant|> {{ m['content'] }} <|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def rows() -> list[dict]:
    out = []
    for country, capital in CAPITALS.items():
        for q in QUESTIONS:
            out.append({"instruction": q.format(c=country), "input": "",
                        "output": ANSWER.format(c=country, k=capital)})
    return out


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)}
                   | {"Below", "is", "an", "instruction", "that", "describes", "a", "task", "Write", "response",
                      "appropriately", "completes", "the", "request", "###", "Instruction", "Response", "Input",
                      ":", "#", "paired", "with", "input", "provides", "further", "context"})
    vocab = {tok: i for i, tok in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    data = rows()
    with open(os.path.join(HERE, "capitals.jsonl"), "w") as f:
        for row in data:
            f.write(json.dumps(row) + "\n")
    tokenizer = build_tokenizer([r["instruction"] + " " + r["output"] for r in data])
    vocab = len(tokenizer)
    cfg = ModelConfig(family="llama", vocab_size=vocab, hidden_size=128, intermediate_size=384, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
                      rope=RopeConfig(theta=10000.0), max_position_embeddings=512)
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: np.asarray(p, np.float32), params)
    folder = os.path.join(HERE, "model")
    hf_config = family("llama").hf_config(cfg)
    hf_config.bos_token_id = tokenizer.bos_token_id
    hf_config.eos_token_id = tokenizer.eos_token_id
    hf_config.pad_token_id = tokenizer.pad_token_id
    save_hf(folder, cfg, params, hf_config=hf_config)
    tokenizer.save_pretrained(folder)
    print(f"wrote {len(data)} rows, vocab {vocab}, {cfg.num_params:,} params to {HERE}")


if __name__ == "__main__":
    main()

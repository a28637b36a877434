"""Fixtures of the data tests: tiny tokenizers in the style of Llama-3, ChatML (Qwen) and Mistral
with their real templates, and helpers that write data files and configs.

Nothing can be downloaded in CI, so the data tests build tokenizers on the fly: byte-level BPE
(like Llama-3 and Qwen) and metaspace BPE (like Mistral's SentencePiece), trained in milliseconds
on a small corpus, with the families' special tokens and chat templates (the Jinja strings below
are the ones the models ship with). Word-level variants give exact, readable token-by-token
expectations. Other data tests import from here; the tests in this file check that the
tokenizers behave like the real ones where masking depends on it.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Meta-Llama-3-8B-Instruct.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2-7B-Instruct (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.2 (updated): an optional system message joins the first user turn.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of "
    "an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"
)

# Mistral-7B-Instruct-v0.3 style: the system message joins the LAST user turn (it moves).
MISTRAL_V3_TEMPLATE = MISTRAL_TEMPLATE.replace("loop.first and system_message", "loop.last and system_message")

STYLES = {
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, template=LLAMA3_TEMPLATE),
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   bos=None, eos="<|im_end|>", add_bos=False, template=CHATML_TEMPLATE),
    "mistral": dict(specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    bos="<s>", eos="</s>", add_bos=True, template=MISTRAL_TEMPLATE),
}

CORPUS = [
    "You are a helpful assistant. Be brief and exact.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Cats have nine lives, so they never fear anything.",
    "Translate hello into Spanish. Hello in Spanish is hola.",
    "How many legs does a spider have? A spider has eight legs.",
    "Write a haiku about rain. Soft rain on the roof, quiet streets shine in grey light.",
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request. ### Instruction: ### Input: ### Response:",
    "0123456789 +-*/=()[]{}<>.,;:!?'\"#_ \n\n\t",
] * 4


@functools.cache
def bpe_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A trained BPE tokenizer of `style` (llama3, chatml: byte-level; mistral: metaspace)."""
    spec = STYLES[style]
    if style == "mistral":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=spec["specials"],
                                      initial_alphabet=sorted(set("".join(CORPUS)) | {"\u2581"}))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=spec["specials"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok, spec)


@functools.cache
def word_tokenizer(style: str, words: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `style`: whitespace is dropped, punctuation split off, so each
    word is one token and expectations can be written token by token."""
    spec = STYLES[style]
    names = list(dict.fromkeys(["<unk>", *spec["specials"], *words]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    return _wrap(tok, spec)


def _wrap(tok: Tokenizer, spec: dict) -> PreTrainedTokenizerFast:
    tok.add_special_tokens(spec["specials"])
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                 unk_token="<unk>" if "<unk>" in spec["specials"] else None)
    hf.chat_template = spec["template"]
    return hf


_SAVED = tempfile.TemporaryDirectory(prefix="jaxtune-test-tokenizers-")


@functools.cache
def saved_tokenizer(style: str, template: bool = True) -> str:
    """A folder holding the BPE tokenizer of `style` (a stand-in `base_model` for configs)."""
    tok = bpe_tokenizer(style)
    folder = Path(_SAVED.name) / f"{style}{'' if template else '-no-template'}"
    if not folder.exists():
        saved_template = tok.chat_template
        if not template:
            tok.chat_template = None
        tok.save_pretrained(folder)
        tok.chat_template = saved_template
    return str(folder)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_config(tmp_path: Path, datasets: list[dict], style: str = "llama3", **keys):
    """A resolved config over `datasets`, with the `style` tokenizer and a cache in tmp_path."""
    from jaxtune.config import config_from_dict

    return config_from_dict({"base_model": saved_tokenizer(style), "learning_rate": 1e-4,
                             "datasets": datasets, "dataset_prepared_path": str(tmp_path / "prepared"),
                             **keys})


ALPACA_ROWS = [
    {"instruction": "Translate hello into Spanish.", "input": "", "output": "Hola."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Write a haiku about rain.", "input": "Soft rain", "output": "Soft rain on the roof."},
    {"instruction": "How many legs does a spider have?", "output": "Eight legs."},
]


# --- the tokenizers behave like the real ones where masking depends on it


def test_special_tokens_are_single_ids_in_text():
    for style, spec in STYLES.items():
        tok = bpe_tokenizer(style)
        for special in spec["specials"]:
            ids = tok(f"Hello{special}world", add_special_tokens=False)["input_ids"]
            assert tok.convert_tokens_to_ids(special) in ids, (style, special)


def test_offsets_cover_the_text():
    tok = bpe_tokenizer("llama3")
    text = "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    assert "".join(text[s:e] for s, e in enc.offsets) == text


def test_llama3_adds_bos_and_saved_folder_loads_with_template():
    tok = AutoTokenizer.from_pretrained(saved_tokenizer("llama3"))
    assert tok("Hi")["input_ids"][0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.chat_template == LLAMA3_TEMPLATE
    assert AutoTokenizer.from_pretrained(saved_tokenizer("llama3", template=False)).chat_template is None


def test_templates_render_like_the_models():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    assert bpe_tokenizer("llama3").apply_chat_template(messages, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>")
    assert bpe_tokenizer("chatml").apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n")
    assert bpe_tokenizer("mistral").apply_chat_template(messages, tokenize=False) == (
        "<s> [INST] Be brief.\n\nHi [/INST] Hello</s>")

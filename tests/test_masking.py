"""Loss masking of chat turns, token by token, under the Llama-3, ChatML and Mistral templates.

The wrong-masking bugs this guards against are silent (the loss still falls): only the last
assistant turn trained, end-of-turn tokens never trained, system or user text trained. Two
kinds of test: with word-level tokenizers every token of the expected output is written out
(`[[ ... ]]` marks the trained ones); with trained BPE tokenizers (byte-level like Llama-3 and
Qwen, metaspace like Mistral) the tokens must equal HF's `apply_chat_template` tokenisation and
the trained tokens must decode to exactly each assistant message plus its end-of-turn token.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_data_fixtures import (LLAMA3_TEMPLATE, MISTRAL_V3_TEMPLATE, bpe_tokenizer,
                                  word_tokenizer)

from jaxtune.config import config_from_dict
from jaxtune.data.formats import RowError, make_format
from jaxtune.data.formats.chat import TURNS_WITHOUT_EOT
from jaxtune.data.masking import IGNORE_INDEX

WORDS = ("Be brief . What is the capital of France ? Paris And Spain Madrid Hi Hello Bye system user "
         "assistant You are a helpful").split()

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]

# CONVERSATION in ChatML under the default masking: every assistant turn and its <|im_end|> trained.
CHATML_DEFAULT_TRAINING = """
    <|im_start|> system Be brief . <|im_end|>
    <|im_start|> user What is the capital of France ? <|im_end|>
    <|im_start|> assistant [[ Paris . <|im_end|> ]]
    <|im_start|> user And of Spain ? <|im_end|>
    <|im_start|> assistant [[ Madrid . <|im_end|> ]]"""


def chat_format(tokenizer, cfg_extra=None, **dataset):
    cfg = config_from_dict({"base_model": "unused", "learning_rate": 1e-4,
                            "datasets": [{"path": "unused.jsonl", "type": "chat_template", **dataset}],
                            **(cfg_extra or {})})
    return make_format(cfg.datasets[0], cfg, tokenizer, "datasets[0]")


def encode_one(fmt, row):
    (result,) = fmt.encode([row])
    if isinstance(result, RowError):
        raise result
    return result


def assert_tokens(tokenizer, row, expected: str):
    """`expected`: the tokens separated by spaces, trained ones between `[[` and `]]`."""
    tokens, trained, inside = [], [], False
    for word in expected.split():
        if word in ("[[", "]]"):
            inside = word == "[["
            continue
        tokens.append(word)
        trained.append(inside)
    assert tokenizer.convert_ids_to_tokens(row.input_ids.tolist()) == tokens
    got_trained = (row.labels != IGNORE_INDEX).tolist()
    marked = " ".join(f"[{t}]" if g else t for t, g in zip(tokens, got_trained))
    assert got_trained == trained, f"trained tokens differ:\n{marked}"
    assert np.array_equal(row.labels[row.labels != IGNORE_INDEX], row.input_ids[np.array(trained, bool)])


# --- token by token, three template styles


def test_llama3_every_assistant_turn_and_its_eot_trained():
    tok = word_tokenizer("llama3", tuple(WORDS))
    row = encode_one(chat_format(tok), {"messages": CONVERSATION})
    assert_tokens(tok, row, """
        <|begin_of_text|> <|start_header_id|> system <|end_header_id|> Be brief . <|eot_id|>
        <|start_header_id|> user <|end_header_id|> What is the capital of France ? <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> [[ Paris . <|eot_id|> ]]
        <|start_header_id|> user <|end_header_id|> And of Spain ? <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> [[ Madrid . <|eot_id|> ]]""")


def test_chatml_every_assistant_turn_and_its_im_end_trained():
    tok = word_tokenizer("chatml", tuple(WORDS))
    row = encode_one(chat_format(tok), {"messages": CONVERSATION})
    assert_tokens(tok, row, CHATML_DEFAULT_TRAINING)


def test_chatml_default_system_prompt_is_not_trained():
    tok = word_tokenizer("chatml", tuple(WORDS))
    row = encode_one(chat_format(tok), {"messages": CONVERSATION[1:3]})
    assert_tokens(tok, row, """
        <|im_start|> system You are a helpful assistant . <|im_end|>
        <|im_start|> user What is the capital of France ? <|im_end|>
        <|im_start|> assistant [[ Paris . <|im_end|> ]]""")


def test_mistral_system_inside_first_inst_is_not_trained():
    tok = word_tokenizer("mistral", tuple(WORDS))
    row = encode_one(chat_format(tok), {"messages": CONVERSATION})
    assert_tokens(tok, row, """
        <s> [INST] Be brief . What is the capital of France ? [/INST] [[ Paris . </s> ]]
        [INST] And of Spain ? [/INST] [[ Madrid . </s> ]]""")


# --- train_on_eos, roles_to_train, per-message flags, train_on_inputs


@pytest.mark.parametrize("train_on_eos, expected", [
    ("none", "[[ Paris . ]] <|eot_id|> ... [[ Madrid . ]] <|eot_id|>"),
    ("last", "[[ Paris . ]] <|eot_id|> ... [[ Madrid . <|eot_id|> ]]"),
    ("turn", "[[ Paris . <|eot_id|> ]] ... [[ Madrid . <|eot_id|> ]]"),
])
def test_train_on_eos(train_on_eos, expected):
    tok = word_tokenizer("llama3", tuple(WORDS))
    row = encode_one(chat_format(tok, train_on_eos=train_on_eos), {"messages": CONVERSATION})
    first, last = expected.split(" ... ")
    assert_tokens(tok, row, f"""
        <|begin_of_text|> <|start_header_id|> system <|end_header_id|> Be brief . <|eot_id|>
        <|start_header_id|> user <|end_header_id|> What is the capital of France ? <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> {first}
        <|start_header_id|> user <|end_header_id|> And of Spain ? <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> {last}""")


def test_train_on_eos_all_trains_every_turns_eot_but_only_assistant_content():
    tok = word_tokenizer("chatml", tuple(WORDS))
    row = encode_one(chat_format(tok, train_on_eos="all"), {"messages": CONVERSATION})
    assert_tokens(tok, row, """
        <|im_start|> system Be brief . [[ <|im_end|> ]]
        <|im_start|> user What is the capital of France ? [[ <|im_end|> ]]
        <|im_start|> assistant [[ Paris . <|im_end|> ]]
        <|im_start|> user And of Spain ? [[ <|im_end|> ]]
        <|im_start|> assistant [[ Madrid . <|im_end|> ]]""")


def test_roles_to_train_user_and_assistant():
    tok = word_tokenizer("chatml", tuple(WORDS))
    row = encode_one(chat_format(tok, roles_to_train=["user", "assistant"]), {"messages": CONVERSATION})
    assert_tokens(tok, row, """
        <|im_start|> system Be brief . <|im_end|>
        <|im_start|> user [[ What is the capital of France ? <|im_end|> ]]
        <|im_start|> assistant [[ Paris . <|im_end|> ]]
        <|im_start|> user [[ And of Spain ? <|im_end|> ]]
        <|im_start|> assistant [[ Madrid . <|im_end|> ]]""")


def test_message_training_flag_overrides_role():
    tok = word_tokenizer("mistral", tuple(WORDS))
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["training"] = False
    row = encode_one(chat_format(tok, message_field_training="training"), {"messages": messages})
    assert_tokens(tok, row, """
        <s> [INST] Be brief . What is the capital of France ? [/INST] Paris . </s>
        [INST] And of Spain ? [/INST] [[ Madrid . </s> ]]""")


def test_train_on_inputs_trains_every_token():
    tok = word_tokenizer("llama3", tuple(WORDS))
    row = encode_one(chat_format(tok, {"train_on_inputs": True}), {"messages": CONVERSATION})
    assert np.array_equal(row.labels, row.input_ids)


def test_sharegpt_from_value_and_role_names():
    tok = word_tokenizer("chatml", tuple(WORDS))
    fmt = chat_format(tok, type="sharegpt")
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    row = encode_one(fmt, {"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                             for m in CONVERSATION]})
    assert row.input_ids.tolist() == encode_one(chat_format(tok), {"messages": CONVERSATION}).input_ids.tolist()
    assert_tokens(tok, row, CHATML_DEFAULT_TRAINING)


def test_custom_property_mappings_and_drop_system():
    tok = word_tokenizer("llama3", tuple(WORDS))
    fmt = chat_format(tok, field_messages="turns", message_property_mappings={"role": "speaker", "content": "text"},
                      drop_system_message=True)
    row = encode_one(fmt, {"turns": [{"speaker": m["role"], "text": m["content"]} for m in CONVERSATION[:3]]})
    assert_tokens(tok, row, """
        <|begin_of_text|> <|start_header_id|> user <|end_header_id|> What is the capital of France ? <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> [[ Paris . <|eot_id|> ]]""")


# --- realistic BPE tokenizers: same tokens as apply_chat_template, trained text exactly right

TRICKY = [
    {"role": "system", "content": "You are a helpful assistant.\n"},
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": " Cats have nine lives,\n\nso they never fear anything. "},
    {"role": "user", "content": "Translate hello into Spanish."},
    {"role": "assistant", "content": "Hello in Spanish is hola."},
    {"role": "user", "content": "How many legs does a spider have?"},
    {"role": "assistant", "content": "A spider has eight legs.\n"},
]
EOT = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "mistral": "</s>"}


def trained_runs(tok, row) -> list[str]:
    trained = row.labels != IGNORE_INDEX
    runs, start = [], None
    for i, t in enumerate([*trained.tolist(), False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append(tok.decode(row.input_ids[start:i].tolist(), skip_special_tokens=False))
            start = None
    return runs


@pytest.mark.parametrize("style", ["llama3", "chatml", "mistral"])
def test_bpe_tokens_equal_apply_chat_template_and_trained_text_is_each_assistant_turn(style):
    tok = bpe_tokenizer(style)
    fmt = chat_format(tok)
    row = encode_one(fmt, {"messages": TRICKY})
    rendered = tok.apply_chat_template(TRICKY, tokenize=False)
    assert row.input_ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    assistants = [m["content"] for m in TRICKY if m["role"] == "assistant"]
    if style == "llama3":  # the Llama-3 template trims content
        assistants = [a.strip() for a in assistants]
    runs = trained_runs(tok, row)
    # Metaspace tokens carry their leading space; the text itself must match exactly.
    assert [r.strip() for r in runs] == [f"{a}{EOT[style]}".strip() for a in assistants]
    assert not fmt.counters[TURNS_WITHOUT_EOT]


def test_mistral_v3_system_moved_into_last_user_turn_is_located():
    # Mistral v0.3 writes the system prompt into the LAST user turn, after earlier assistant turns.
    tok = bpe_tokenizer("mistral")
    fmt = chat_format(tok, {"chat_template": "jinja", "chat_template_jinja": MISTRAL_V3_TEMPLATE})
    messages = [*TRICKY[0:5], TRICKY[5]]
    rendered = tok.apply_chat_template(messages, tokenize=False, chat_template=MISTRAL_V3_TEMPLATE)
    assert rendered.index("You are a helpful") > rendered.index("nine lives")  # the system moved
    row = encode_one(fmt, {"messages": messages})
    assert row.input_ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    assert [r.strip() for r in trained_runs(tok, row)] == [
        (TRICKY[2]["content"] + "</s>").strip(), TRICKY[4]["content"] + "</s>"]
    assert "You are a helpful" not in "".join(trained_runs(tok, row))


def test_builtin_llama3_template_matches_the_models_own():
    tok = bpe_tokenizer("llama3")
    ours = encode_one(chat_format(tok, chat_template="llama3"), {"messages": TRICKY})
    theirs = encode_one(chat_format(tok), {"messages": TRICKY})
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    assert ours.labels.tolist() == theirs.labels.tolist()
    assert chat_format(tok, chat_template="llama3").template.render(
        messages=TRICKY, bos_token="<|begin_of_text|>") == tok.apply_chat_template(
        TRICKY, tokenize=False, chat_template=LLAMA3_TEMPLATE)


def test_turn_without_end_of_turn_token_is_counted():
    tok = bpe_tokenizer("chatml")
    no_eot = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    fmt = chat_format(tok, chat_template="jinja", chat_template_jinja=no_eot)
    row = encode_one(fmt, {"messages": TRICKY[1:5]})
    assert fmt.counters[TURNS_WITHOUT_EOT] == 2
    assert [r.strip() for r in trained_runs(tok, row)] == [TRICKY[2]["content"].strip(), TRICKY[4]["content"]]


def test_eot_tokens_config_overrides_detection():
    tok = bpe_tokenizer("chatml")
    fmt = chat_format(tok, {"eot_tokens": ["<|endoftext|>"]})
    row = encode_one(fmt, {"messages": TRICKY[1:3]})
    assert "<|im_end|>" not in "".join(trained_runs(tok, row))
    assert fmt.counters[TURNS_WITHOUT_EOT] == 1


# --- malformed conversations


@pytest.mark.parametrize("row, field", [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
])
def test_malformed_rows_name_the_field(row, field):
    (result,) = chat_format(bpe_tokenizer("chatml")).encode([row])
    assert isinstance(result, RowError) and result.field == field


def test_template_exception_is_a_row_error():
    fmt = chat_format(bpe_tokenizer("mistral"))
    (result,) = fmt.encode([{"messages": [{"role": "assistant", "content": "Hi"}]}])
    assert isinstance(result, RowError) and "must alternate" in result.message


@pytest.mark.parametrize("template, style, with_system", [
    ("chatml", "chatml", True), ("qwen_25", "chatml", True), ("llama3", "llama3", True),
    ("mistral_v2v3", "mistral", True), ("mistral_v1", "mistral", False)])
def test_builtin_templates_train_every_assistant_turn_and_nothing_else(template, style, with_system):
    tok = bpe_tokenizer(style)
    messages = TRICKY if with_system else TRICKY[1:]
    fmt = chat_format(tok, chat_template=template)
    row = encode_one(fmt, {"messages": messages})
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    if template == "llama3":
        assistants = [a.strip() for a in assistants]
    assert [r.strip() for r in trained_runs(tok, row)] == [f"{a}{EOT[style]}".strip() for a in assistants]
    assert not fmt.counters[TURNS_WITHOUT_EOT]


def test_roles_maps_dataset_role_names_and_keeps_the_other_defaults():
    tok = word_tokenizer("chatml", tuple(WORDS))
    fmt = chat_format(tok, roles={"assistant": ["bot"]})
    names = {"system": "system", "user": "human", "assistant": "bot"}
    row = encode_one(fmt, {"messages": [{"role": names[m["role"]], "content": m["content"]} for m in CONVERSATION[:3]]})
    assert_tokens(tok, row, """
        <|im_start|> system Be brief . <|im_end|>
        <|im_start|> user What is the capital of France ? <|im_end|>
        <|im_start|> assistant [[ Paris . <|im_end|> ]]""")


def test_trimmed_offsets_still_train_whitespace_inside_a_span():
    # GPT-2-style ByteLevel(trim_offsets=True) gives whitespace tokens empty offsets; masking
    # must still train the spaces and newlines inside a completion.
    from tokenizers import Tokenizer, processors

    from jaxtune.data.masking import completion_start, ids_and_offsets, span_mask

    tok = Tokenizer.from_str(bpe_tokenizer("llama3").backend_tokenizer.to_str())
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    text = "Question: hi\nAnswer:\none  two\n\n   three  "
    start = text.index("one")
    encoding = tok.encode(text)
    assert any(s == e for s, e in encoding.offsets)  # some whitespace tokens really are empty
    ids, coverage = ids_and_offsets(encoding)
    mask = span_mask(coverage, [(start, len(text))])
    assert tok.decode(ids[mask].tolist()) == text[start:]
    assert tok.decode(ids[~mask].tolist()) == text[:start]
    first = completion_start(encoding, len(text), [(start, len(text))])
    assert first is not None and mask.tolist() == [i >= first for i in range(len(ids))]

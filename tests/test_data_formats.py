"""Dataset formats, file types and bad input, end to end through `prepare_datasets`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_fixtures import ALPACA_ROWS, bpe_tokenizer, data_config, saved_tokenizer, write_jsonl

from jaxtune.config import config_from_dict
from jaxtune.data import IGNORE_INDEX, load_tokenizer, prepare_datasets
from jaxtune.data.formats.prompt_completion import ALPACA_SYSTEM, ALPACA_SYSTEM_NO_INPUT
from jaxtune.errors import ConfigError, DataError


def rows_of(data):
    """(input_ids, labels) of every training row, in stored order."""
    rows = data.train.rows
    return [tuple(np.asarray(a) for a in rows.row(i)) for i in range(len(rows))]


def trained_text(tok, ids, labels) -> str:
    return tok.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)


def full_text(tok, ids) -> str:
    return tok.decode(ids.tolist(), skip_special_tokens=False)


# --- formats


def test_alpaca_prompt_wording_and_only_output_plus_eos_trained(tmp_path):
    rows = ALPACA_ROWS + [{"instruction": "Say hi.", "output": "Hi.", "system": "You are terse.\n\n"}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}]))
    tok = bpe_tokenizer("llama3")
    encoded = rows_of(data)
    assert len(encoded) == len(rows)
    for row, (ids, labels) in zip(rows, encoded):
        assert trained_text(tok, ids, labels) == row["output"] + "<|eot_id|>"
    assert full_text(tok, encoded[0][0]) == (
        "<|begin_of_text|>" + ALPACA_SYSTEM_NO_INPUT
        + "### Instruction:\nTranslate hello into Spanish.\n\n### Response:\nHola.<|eot_id|>")
    assert full_text(tok, encoded[2][0]).startswith("<|begin_of_text|>" + ALPACA_SYSTEM + "### Instruction:\n"
                                                    "Write a haiku about rain.\n\n### Input:\nSoft rain\n\n")
    assert full_text(tok, encoded[4][0]).startswith("<|begin_of_text|>You are terse.\n\n### Instruction:")


def test_train_on_inputs_trains_the_prompt_too(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}], train_on_inputs=True))
    for ids, labels in rows_of(data):
        assert np.array_equal(ids, labels)


def test_completion_trains_all_text_and_eos(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"body": "Soft rain on the roof."}, {"body": "Cats have nine lives."}])
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "completion", "field": "body"}],
                                        style="chatml"))
    tok = bpe_tokenizer("chatml")
    assert [trained_text(tok, *r) for r in rows_of(data)] == [
        "Soft rain on the roof.<|im_end|>", "Cats have nine lives.<|im_end|>"]


def test_input_output_segments(tmp_path):
    row = {"segments": [{"text": "<|begin_of_text|>Q: What is 2+2?\n", "label": False},
                        {"text": "A: 4<|eot_id|>", "label": True},
                        {"text": " (end)", "label": False}]}
    path = write_jsonl(tmp_path / "io.jsonl", [row])
    cfg = data_config(tmp_path, [{"path": str(path), "type": "input_output"}])
    (ids, labels), = rows_of(prepare_datasets(cfg))
    tok = bpe_tokenizer("llama3")
    assert trained_text(tok, ids, labels) == "A: 4<|eot_id|>"
    assert full_text(tok, ids).endswith("A: 4<|eot_id|> (end)")


def test_pretokenized_with_and_without_labels(tmp_path):
    path = write_jsonl(tmp_path / "tok.jsonl", [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11]},
    ])
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path)}]))  # no type: pretokenized
    (ids0, labels0), (ids1, labels1) = rows_of(data)
    assert ids0.tolist() == [5, 6, 7, 8] and labels0.tolist() == [-100, -100, 7, 8]
    assert ids1.tolist() == labels1.tolist() == [9, 10, 11]


@pytest.mark.parametrize("row, message", [
    ({"input_ids": [5, 100000]}, "token id 100000 is outside the vocabulary"),
    ({"input_ids": [5, 6], "labels": [5]}, "'labels' has 1 entries for 2 input_ids"),
])
def test_pretokenized_bad_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "tok.jsonl", [{"input_ids": [5, 6]}, row])
    with pytest.raises(DataError, match=message) as info:
        prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "pretokenized"}]))
    assert "row 1" in str(info.value) and str(path) in str(info.value)


def test_user_prompt_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "What is the capital of France?", "a": "Paris."}])
    fmt = {"format": "[INST] {instruction} [/INST] ", "field_instruction": "q", "field_output": "a",
           "system_prompt": "Be brief.", "system_format": "<<SYS>>{system}<</SYS>>"}
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": fmt}], style="mistral"))
    (ids, labels), = rows_of(data)
    tok = bpe_tokenizer("mistral")
    assert tok.decode(ids.tolist(), skip_special_tokens=False).replace(" ", "") == (
        "<s><<SYS>>Bebrief.<</SYS>>[INST]WhatisthecapitalofFrance?[/INST]Paris.</s>")
    assert trained_text(tok, ids, labels).strip() == "Paris.</s>"


def test_custom_python_function(tmp_path, monkeypatch):
    (tmp_path / "my_formats.py").write_text(
        "def qa(row):\n"
        "    return [('Question: ' + row['q'] + '\\n', False), ('Answer: ' + row['a'] + '<|eot_id|>', True)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "What is 2+2?", "a": "4"}, {"q": "Hi?"}])
    cfg = data_config(tmp_path, [{"path": str(path), "type": "my_formats:qa"}], skip_bad_rows=True)
    data = prepare_datasets(cfg)
    (ids, labels), = rows_of(data)
    assert trained_text(bpe_tokenizer("llama3"), ids, labels) == "Answer: 4<|eot_id|>"
    assert data.report.datasets[0].bad_rows == 1
    assert "my_formats:qa raised TypeError" in data.report.datasets[0].bad_row_examples[0]


def test_unknown_function_module_is_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "x"}])
    with pytest.raises(ConfigError, match=r"datasets\[0\].type: 'nowhere_module:fn' .* cannot be imported"):
        prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "nowhere_module:fn"}]))


def test_chat_template_dataset_end_to_end(tmp_path):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "chat_template"}], style="chatml"))
    (ids, labels), = rows_of(data)
    assert trained_text(bpe_tokenizer("chatml"), ids, labels) == "Paris.<|im_end|>"


# --- files, folders, splits, mixing


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv", "arrow", "folder", "saved"])
def test_local_file_types_give_the_same_rows(tmp_path, kind):
    import datasets

    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
            for r in ALPACA_ROWS]
    table = datasets.Dataset.from_list(rows)
    target = tmp_path / f"data.{kind}"
    if kind == "json":
        target.write_text(json.dumps(rows))
    elif kind == "jsonl":
        write_jsonl(target, rows)
    elif kind == "parquet":
        table.to_parquet(str(target))
    elif kind == "csv":
        table.to_csv(str(target), index=False)
    elif kind == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, table.data.schema) as writer:
            writer.write_table(table.data.table)
    elif kind == "folder":
        target.mkdir()
        write_jsonl(target / "part-0.jsonl", rows[:2])
        write_jsonl(target / "part-1.jsonl", rows[2:])
    elif kind == "saved":
        table.save_to_disk(str(target))
    reference = write_jsonl(tmp_path / "reference.jsonl", rows)
    got = rows_of(prepare_datasets(data_config(tmp_path, [{"path": str(target), "type": "alpaca"}])))
    want = rows_of(prepare_datasets(data_config(tmp_path, [{"path": str(reference), "type": "alpaca"}])))
    assert sorted(tuple(i.tolist()) for i, _ in got) == sorted(tuple(i.tolist()) for i, _ in want)


def test_split_slice_data_files_and_shards(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ALPACA_ROWS)
    write_jsonl(folder / "b.jsonl", ALPACA_ROWS[:1])
    entry = {"path": str(folder), "type": "alpaca", "data_files": "a.jsonl"}
    assert len(prepare_datasets(data_config(tmp_path, [entry])).train) == 4
    assert len(prepare_datasets(data_config(tmp_path, [{**entry, "split": "train[:2]"}])).train) == 2
    assert len(prepare_datasets(data_config(tmp_path, [{**entry, "shards": 2, "shards_idx": 1}])).train) == 2


def test_several_datasets_are_mixed_in_config_order(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    data = prepare_datasets(data_config(tmp_path, [{"path": str(alpaca), "type": "alpaca"},
                                                   {"path": str(chat), "type": "chat_template"}]))
    assert [c.rows_kept for c in data.report.datasets] == [4, 1]
    ids, labels = rows_of(data)[-1]
    assert trained_text(bpe_tokenizer("llama3"), ids, labels) == "Hello<|eot_id|>"


# --- bad input: one clear message naming file, row and field


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = ALPACA_ROWS[:3] + [{"instruction": "No output here."}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}]))
    message = str(info.value)
    assert str(path) in message and "row 3" in message and "'output'" in message and "skip_bad_rows" in message


def test_skip_bad_rows_counts_and_reports(tmp_path):
    rows = ALPACA_ROWS + [{"instruction": "No output."}, {"output": "No instruction."}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}], skip_bad_rows=True))
    counts = data.report.datasets[0]
    assert (counts.rows_read, counts.bad_rows, counts.rows_kept) == (6, 2, 4)
    assert "2 malformed rows skipped" in "\n".join(data.report.lines())
    assert "row 4" in counts.bad_row_examples[0] and "'output'" in counts.bad_row_examples[0]


@pytest.mark.parametrize("strategy", ["drop", "truncate", "raise"])
def test_excess_length_strategy_is_counted_never_silent(tmp_path, strategy):
    long_row = {"instruction": "Tell me a joke about cats.", "output": "Cats have nine lives. " * 40}
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS + [long_row])
    cfg = data_config(tmp_path, [{"path": str(path), "type": "alpaca"}], sequence_len=128,
                      excess_length_strategy=strategy)
    if strategy == "raise":
        with pytest.raises(DataError, match=r"row 4: \d+ tokens, longer than sequence_len 128"):
            prepare_datasets(cfg)
        return
    data = prepare_datasets(cfg)
    counts = data.report.datasets[0]
    lengths = data.train.rows.lengths
    if strategy == "drop":
        assert (counts.dropped_too_long, counts.rows_kept) == (1, 4)
        assert "1 rows longer than sequence_len dropped" in "\n".join(data.report.lines())
    else:
        assert (counts.truncated, counts.rows_kept, int(lengths.max())) == (1, 5, 128)
        assert "1 rows longer than sequence_len truncated" in "\n".join(data.report.lines())


def test_rows_with_nothing_to_train_are_dropped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    data = prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "chat_template"}]))
    assert (data.report.datasets[0].dropped_untrained, len(data.train)) == (1, 1)


def test_empty_after_filtering_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Tell me a joke.", "output": "Cats " * 100}])
    with pytest.raises(DataError, match=r"datasets: no rows left after filtering .*1 rows longer than "
                                        r"sequence_len dropped"):
        prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca"}], sequence_len=32))


def test_tokenizer_without_template_and_none_given(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    cfg = config_from_dict({"base_model": saved_tokenizer("chatml", template=False), "learning_rate": 1e-4,
                            "datasets": [{"path": str(path), "type": "chat_template"}],
                            "dataset_prepared_path": str(tmp_path / "prepared")})
    with pytest.raises(ConfigError, match=r"datasets\[0\].chat_template: the tokenizer .* has no chat template"):
        prepare_datasets(cfg)
    # A built-in template fixes it.
    cfg = config_from_dict({**cfg.to_dict(), "chat_template": "chatml"})
    assert load_tokenizer(cfg).chat_template.startswith("{% if not add_generation_prompt")


def test_special_token_that_would_grow_the_vocabulary(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    entry = [{"path": str(path), "type": "alpaca"}]
    with pytest.raises(ConfigError, match=r"special_tokens.pad_token: '<pad>' is not in the tokenizer's "
                                          r"vocabulary.*tokens:"):
        load_tokenizer(data_config(tmp_path, entry, special_tokens={"pad_token": "<pad>"}))
    # An existing token is fine and changes nothing.
    same = load_tokenizer(data_config(tmp_path, entry, special_tokens={"pad_token": "<|end_of_text|>"}))
    assert len(same) == len(bpe_tokenizer("llama3")) and same.pad_token == "<|end_of_text|>"
    # Listing it under tokens states the intent to resize.
    grown = load_tokenizer(data_config(tmp_path, entry, special_tokens={"pad_token": "<pad>"}, tokens=["<pad>"]))
    assert len(grown) == len(bpe_tokenizer("llama3")) + 1 and grown.pad_token == "<pad>"
    with pytest.raises(ConfigError, match="lora_modules_to_save"):
        load_tokenizer(data_config(tmp_path, entry, tokens=["<tool>"], adapter="lora", lora_target_linear=True))


def test_hub_dataset_without_network_names_the_dataset(tmp_path):
    with pytest.raises(DataError, match=r"datasets\[0\].path 'nobody-xyz/no-such-dataset': .*(reached|not found)"):
        prepare_datasets(data_config(tmp_path, [{"path": "nobody-xyz/no-such-dataset", "type": "alpaca"}]))


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match=r"datasets\[0\].path '.*missing.jsonl': no such file"):
        prepare_datasets(data_config(tmp_path, [{"path": str(tmp_path / "missing.jsonl"), "type": "alpaca"}]))


def test_unknown_split_names_the_split(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    with pytest.raises(DataError, match=r"datasets\[0\].split 'validation'"):
        prepare_datasets(data_config(tmp_path, [{"path": str(path), "type": "alpaca", "split": "validation"}]))

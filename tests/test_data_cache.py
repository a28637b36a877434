"""The preprocessed-data cache and `python -m jaxtune.preprocess`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data_fixtures import ALPACA_ROWS, data_config, saved_tokenizer, write_jsonl

from jaxtune.data import FIELDS, IGNORE_INDEX, load_tokenizer, prepare_datasets
from jaxtune.data.cache import cache_key

REPO = Path(__file__).resolve().parents[1]


def alpaca_config(tmp_path, **keys):
    path = tmp_path / "a.jsonl"
    if not path.exists():
        write_jsonl(path, ALPACA_ROWS * 3)
    return data_config(tmp_path, [{"path": str(path), "type": "alpaca"}], **keys)


def test_second_run_reuses_the_cache_with_identical_examples(tmp_path):
    cfg = alpaca_config(tmp_path, sample_packing=True, sequence_len=256)
    first = prepare_datasets(cfg)
    second = prepare_datasets(cfg)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.cache_dir == second.cache_dir and first.cache_dir.parent == tmp_path / "prepared"
    assert len(first.train) == len(second.train)
    for g in range(len(first.train)):
        a, b = first.train[g], second.train[g]
        assert all(np.array_equal(a[k], b[k]) for k in FIELDS)
    assert second.report.lines() == first.report.lines()
    assert not prepare_datasets(cfg, use_cache=False).from_cache


def test_cache_key_follows_what_changes_the_data(tmp_path):
    cfg = alpaca_config(tmp_path)
    tok = load_tokenizer(cfg)
    key = cache_key(cfg, tok)
    assert cache_key(alpaca_config(tmp_path, micro_batch_size=4, seed=1), tok) == key  # loader-only keys
    assert cache_key(alpaca_config(tmp_path, sequence_len=256), tok) != key
    assert cache_key(alpaca_config(tmp_path, train_on_inputs=True), tok) != key
    assert cache_key(alpaca_config(tmp_path, val_set_size=2), tok) != key
    other_tok = load_tokenizer(alpaca_config(tmp_path, special_tokens={"eos_token": "<|end_of_text|>"}))
    assert cache_key(cfg, other_tok) != key
    data_file = tmp_path / "a.jsonl"
    data_file.write_text(data_file.read_text() + json.dumps(ALPACA_ROWS[0]) + "\n")
    assert cache_key(cfg, tok) != key


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def write_config(tmp_path: Path, **keys) -> Path:
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."}]}] * 3)
    cfg = {"base_model": saved_tokenizer("chatml"), "learning_rate": 1e-4, "sequence_len": 128,
           "datasets": [{"path": str(tmp_path / "chat.jsonl"), "type": "chat_template"}],
           "dataset_prepared_path": str(tmp_path / "prepared"), **keys}
    path = tmp_path / "cfg.yml"
    path.write_text("# python -m jaxtune.preprocess --config cfg.yml\n" + yaml.safe_dump(cfg))
    return path


def test_preprocess_inspect_json_prints_only_json_on_stdout(tmp_path):
    cfg = write_config(tmp_path)
    result = run_module("jaxtune.preprocess", "--config", str(cfg), "--inspect", "2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        example = json.loads(line)
        assert set(example) == set(FIELDS) and all(len(example[k]) == 128 for k in FIELDS)
        labels, ids = np.array(example["labels"]), np.array(example["input_ids"])
        assert np.array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(saved_tokenizer("chatml"))
        assert tok.decode(ids[labels != IGNORE_INDEX].tolist()) == "Paris.<|im_end|>Madrid.<|im_end|>"
    assert "3 rows read, 3 kept" in result.stderr


def run_in_process(capsys, monkeypatch, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m jaxtune.preprocess ARGS` without a new interpreter (which spends ~7 s importing
    jax, transformers and torch): the same `run_entry(main)` its `__main__` block exits with.
    The JSON test above runs the real command, so start-up output is covered end to end."""
    from jaxtune import preprocess
    from jaxtune.config import run_entry

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = run_entry(preprocess.main, list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "jaxtune.preprocess", *args], code, out, err)


def test_preprocess_inspect_marks_trained_text_and_reuses_cache(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path, sample_packing=True)
    first = run_in_process(capsys, monkeypatch, "--config", str(cfg), "--inspect", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "prepared in" in first.stdout and "packing efficiency" in first.stdout
    assert "\u27e6Paris.<|im_end|>\u27e7" in first.stdout and "\u27e6Madrid.<|im_end|>\u27e7" in first.stdout
    second = run_in_process(capsys, monkeypatch, "--config", str(cfg), "--set", "micro_batch_size=2", cwd=tmp_path)
    assert second.returncode == 0 and "reused cache" in second.stdout


BAD_INPUTS = [
    ("sequence_len=abc", "sequence_len: expected an integer, got 'abc'"),
    ("datasets.0.path=missing.jsonl", "datasets[0].path 'missing.jsonl': no such file"),
]


@pytest.mark.parametrize("override, message", BAD_INPUTS)
def test_preprocess_bad_input_exits_2_with_one_message(tmp_path, capsys, monkeypatch, override, message):
    cfg = write_config(tmp_path)
    result = run_in_process(capsys, monkeypatch, "--config", str(cfg), "--set", override, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


def test_preprocess_bad_input_exits_2_from_the_real_command(tmp_path):
    # The end-to-end twin of the in-process test above: the real exit status and all of stderr.
    override, message = BAD_INPUTS[0]
    cfg = write_config(tmp_path)
    result = run_module("jaxtune.preprocess", "--config", str(cfg), "--set", override, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")

"""Preprocessing throughput: alpaca rows per second, end to end, on this machine's CPU.

    python benchmarks/preprocess_throughput.py [--rows 50000] [--sequence-len 2048] [--no-packing]

Generates `--rows` alpaca-sized rows (instruction, optional input, output; lengths drawn to
match the Stanford Alpaca mix: short instructions, 40% with an input, long-tailed outputs) as a
JSONL file, and a Llama-3-style tokenizer (Llama-3's pre-tokenizer regex, byte-level BPE, 32k
vocabulary) trained on them, since nothing can be downloaded here. Then times `prepare_datasets` from a cold start: the HF `datasets` JSON load,
prompt formatting, tokenisation with offsets, masking, the length rule, best-fit-decreasing
packing and the cache write. Data generation and tokenizer training are not timed. Prints rows/s,
tokens/s and the packing efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_rows(n: int, rng: np.random.Generator) -> list[dict]:
    # A Zipf-distributed vocabulary of made-up words, so the tokenizer's merges look like a real
    # language's (frequent short words, rare long ones).
    syllables = ["ka", "to", "re", "mi", "sa", "lo", "ne", "vi", "du", "pa", "en", "or", "th", "st"]
    vocab = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(5000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()

    def sentence(words: int) -> str:
        picked = rng.choice(len(vocab), size=max(1, words), p=weights)
        text = " ".join(vocab[i] for i in picked)
        return text[0].upper() + text[1:] + "."

    rows = []
    for _ in range(n):
        # Stanford Alpaca: instructions ~13 words, 40% of rows with an input (~15 words),
        # outputs ~60 words with a long tail (about 130 tokens per row with the prompt).
        row = {"instruction": sentence(int(rng.integers(5, 22))),
               "input": sentence(int(rng.integers(3, 30))) if rng.random() < 0.4 else "",
               "output": sentence(int(np.clip(rng.lognormal(3.7, 0.9), 3, 600)))}
        rows.append(row)
    return rows


def make_tokenizer(rows: list[dict], folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Llama-3's pre-tokenizer (its split regex, then byte-level without GPT-2's regex): the
    # regex is most of a byte-level tokenizer's cost, so this keeps the timing representative.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # A real tokenizer knows English: train on the alpaca prompt wording too.
    from jaxtune.data.formats.prompt_completion import ALPACA_SYSTEM, ALPACA_SYSTEM_NO_INPUT, ALPACA_TURN

    english = [ALPACA_SYSTEM + ALPACA_TURN, ALPACA_SYSTEM_NO_INPUT] * 200
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows[:5000]]
    tok.train_from_iterator(texts + english, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(folder)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jaxtune-preprocess-bench-"))
    # A fresh HF datasets cache, so the JSON -> Arrow conversion is timed too (a cold start).
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_datasets")
    from jaxtune.config import config_from_dict
    from jaxtune.data import load_tokenizer, prepare_datasets

    rng = np.random.default_rng(args.seed)
    rows = make_rows(args.rows, rng)
    data_file = work / "alpaca.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_tokenizer(rows, work / "tokenizer")
    cfg = config_from_dict({
        "base_model": str(work / "tokenizer"), "learning_rate": 2e-5,
        "datasets": [{"path": str(data_file), "type": "alpaca"}],
        "sequence_len": args.sequence_len, "sample_packing": not args.no_packing,
        "dataset_prepared_path": str(work / "prepared"),
    })

    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer(cfg)
    data = prepare_datasets(cfg, tokenizer)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    lengths = data.train.rows.lengths
    print("\n".join(data.report.lines()))
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPU cores, python {platform.python_version()}; "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other processes "
          f"share these cores); this process used {cpu_seconds:.2f} s of CPU")
    print(f"row tokens: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
          f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}")
    print(f"{args.rows} rows in {seconds:.2f} s end to end: {args.rows / seconds:,.0f} rows/s, "
          f"{data.train.num_tokens / seconds:,.0f} tokens/s, packing efficiency "
          f"{100 * data.train.efficiency:.2f}% (sequence_len {args.sequence_len})")


if __name__ == "__main__":
    main()

"""`python -m jaxtune.generate --config CFG.yml --prompt TEXT`: sample from the trained model.

Loads what the run exported (`output_dir/model`, or the base model plus `output_dir/adapter` for
LoRA runs), renders the prompt the way the training data was rendered (the alpaca preamble for
alpaca data, the chat template for chat data; `--raw` sends the text as is), and decodes with a
KV cache until EOS: greedy by default, `--temperature`/`--top-p` to sample.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxtune.config import Config, add_config_args, load_config_from_args, run_entry
from jaxtune.errors import JaxtuneError

CHAT_TYPES = ("chat_template", "sharegpt")


def render_prompt(cfg: Config, tokenizer, text: str) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer should add its special tokens), as the first training
    dataset's format presented prompts: chat templates write their own BOS, other formats were
    encoded with the tokenizer's special tokens."""
    kind = cfg.datasets[0].type if cfg.datasets else None
    kind = kind if isinstance(kind, str) else None
    if kind in CHAT_TYPES or (kind is None and tokenizer.chat_template):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True), False
    if kind == "alpaca":
        from jaxtune.data.formats.prompt_completion import ALPACA_SYSTEM_NO_INPUT, ALPACA_TURN_NO_INPUT

        return ALPACA_SYSTEM_NO_INPUT + ALPACA_TURN_NO_INPUT.format(instruction=text), True
    return text, True


def trained_model_folder(cfg: Config) -> tuple[str, str | None]:
    """(model folder, adapter folder or None) of the run in `cfg.output_dir`."""
    out = os.path.abspath(cfg.output_dir)
    merged = os.path.join(out, "model")
    adapter = os.path.join(out, "adapter")
    if os.path.isdir(merged):
        return merged, None
    if os.path.isdir(adapter):
        return cfg.base_model, adapter
    raise JaxtuneError(f"output_dir {out} has no trained model (model/ or adapter/); run "
                       f"`python -m jaxtune.train --config ...` first")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.generate", description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--prompt", required=True, help="the user's text")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="do not apply the prompt format or chat template")
    args = parser.parse_args(argv)
    cfg = load_config_from_args(args)

    import jaxtune
    from jaxtune.data.tokenizer import load_tokenizer
    from jaxtune.model.decode import generate

    folder, adapter = trained_model_folder(cfg)
    load_kwargs = {"adapter": adapter} if adapter else {}
    model = jaxtune.load_pretrained(folder, dtype="float32", **load_kwargs)
    tokenizer = load_tokenizer(cfg)
    text, add_special = (args.prompt, False) if args.raw else render_prompt(cfg, tokenizer, args.prompt)
    prompt_ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    eos_ids = {tokenizer.eos_token_id} | set(_config_eos_ids(model.hf_config))
    new_ids = []
    for token in generate(model.params, model.config, prompt_ids, max_new_tokens=args.max_new_tokens,
                          eos_ids=tuple(i for i in eos_ids if i is not None), temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed):
        new_ids.append(token)
    print(tokenizer.decode(new_ids, skip_special_tokens=True).strip())
    return 0


def _config_eos_ids(hf_config) -> list[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


if __name__ == "__main__":
    sys.exit(run_entry(main))

"""`python -m jaxtune.export --config CFG.yml --format peft|merged [--out DIR]`

Writes the newest checkpoint in `output_dir/checkpoints/` as a PEFT adapter folder (LoRA/QLoRA
runs; default `output_dir/adapter`) or as a merged HF model folder, `W + s·BA` with quantised
bases dequantised (default `output_dir/merged`), loadable by transformers.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxtune.config import add_config_args, load_config_from_args, run_entry
from jaxtune.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.export", description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--format", required=True, choices=["peft", "merged"])
    parser.add_argument("--out", default=None, help="output folder (default: output_dir/adapter or output_dir/merged)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    args = parser.parse_args(argv)
    cfg = load_config_from_args(args)
    if args.format == "peft" and cfg.adapter is None:
        raise ConfigError("--format peft needs a LoRA/QLoRA run (adapter: lora|qlora); this config is a full "
                          "fine-tune: use --format merged")

    import jax

    from jaxtune.converters.peft import export_merged, export_peft
    from jaxtune.mesh import make_mesh
    from jaxtune.sharding import merged_rules
    from jaxtune.train.checkpoints import Checkpoints
    from jaxtune.train.model_setup import build_model
    from jaxtune.train.optimizer import make_optimizer
    from jaxtune.train.placement import state_shardings
    from jaxtune.train.run import checkpoint_dtype, compute_dtype, optimizer_settings
    from jaxtune.train.state import TrainState, combine, init_state, partition

    mesh = make_mesh(cfg.mesh.sizes)
    rules = merged_rules(cfg.sharding_rules)
    setup = build_model(cfg, mesh, rules, compute_dtype(cfg))
    trainable, frozen = partition(setup.params, setup.mask)
    tx, _ = make_optimizer(optimizer_settings(cfg, 1), 1)  # only the state's structure matters here
    trainable_sh, _ = partition(setup.shardings, setup.mask)
    state_sh: TrainState = state_shardings(trainable_sh, tx, jax.eval_shape(lambda: trainable), mesh)
    shapes = jax.eval_shape(lambda t: init_state(t, tx, jax.random.key(0)), trainable)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    checkpoints = Checkpoints(os.path.join(os.path.abspath(cfg.output_dir), "checkpoints"), async_save=False)
    step, state, _ = checkpoints.restore(abstract, args.step)
    params = combine(state.trainable, frozen)
    if args.format == "peft":
        out = args.out or os.path.join(cfg.output_dir, "adapter")
        export_peft(out, params, setup.model_cfg, setup.lora_cfg, base_model_name_or_path=cfg.base_model)
    else:
        out = args.out or os.path.join(cfg.output_dir, "merged")
        export_merged(out, params, setup.model_cfg, dtype=checkpoint_dtype(setup.hf_config),
                      hf_config=setup.hf_config, tokenizer_dir=cfg.tokenizer_config)
    print(f"exported checkpoint {step} as {args.format} to {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))

"""Compile time of the forward+backward pass vs depth: scanned layers keep it flat.

    python benchmarks/compile_time.py [--layers 2 32] [--hidden 256]

Times `jax.jit(jax.value_and_grad(loss)).lower(...).compile()` for the same small config at each
depth, on whatever device jax picks (CPU here, GPU on the device machine).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxtune.model.config import ModelConfig
from jaxtune.model.params import abstract_params
from jaxtune.model.transformer import forward


def compile_seconds(num_layers: int, hidden: int, seq: int, batch: int) -> float:
    cfg = ModelConfig(family="llama", vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_layers=num_layers, num_heads=hidden // 64, num_kv_heads=max(1, hidden // 256),
                      head_dim=64)

    def loss(params, ids):
        logits = forward(params, cfg, ids, dtype=jnp.bfloat16)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    params = abstract_params(cfg, jnp.float32)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    compile_seconds(2, args.hidden, args.seq, args.batch)  # warm jax's own caches and imports
    for layers in args.layers:
        print(f"layers={layers:3d} hidden={args.hidden} seq={args.seq}: "
              f"compile {compile_seconds(layers, args.hidden, args.seq, args.batch):.2f} s")


if __name__ == "__main__":
    main()

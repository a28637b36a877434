"""The LoRA MLP block (gate, up, down with rank-16 adapters, SwiGLU), forward + backward, as the
model runs it (the activation and down_proj as one function, `jaxtune/lora_gated_down.py`, its
backward a Pallas kernel) against autodiff of the per-projection form (what the model ran before)
and PEFT on transformers' LlamaMLP, on the training steps' shapes, in one run on one GPU.

  python benchmarks/lora_mlp.py [--shapes 1b 8b] [--sweep]

Times are medians of 7 repeats of 10 back-to-back calls after warm-up; "err" is the largest
difference from the per-projection form's outputs and gradients, relative to each one's largest
magnitude. `--sweep` also times the kernel alone over a grid of block sizes, against XLA's fusion
of the same activation backward without the adapter term.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import lora, lora_gated_down
from jaxtune.kernels import lora_activation_grad as kernel
from jaxtune.kernels.activation_math import activation_and_grad
from jaxtune.model import mlp as mlp_module

# (tokens as batch × length, hidden, mlp): the 1B LoRA step and the 8B one
SHAPES = {"1b": ((4, 2048), 2048, 8192), "8b": ((1, 4096), 4096, 14336)}
RANK, ALPHA = 16, 16.0
SWEEP = [*itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]  # (rows, cols, warps) tried by --sweep


def _time(fn, *args, repeats: int = 7, calls: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


def _err(got, want) -> float:
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                     / (jnp.max(jnp.abs(w.astype(jnp.float32))) + 1e-30))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _params(d: int, f: int, key):
    def leaf(k, din, dout):
        k1, k2, k3 = jax.random.split(k, 3)
        return lora.LoRA(base=(jax.random.normal(k1, (din, dout)) * din ** -0.5).astype(jnp.bfloat16),
                         a=jax.random.normal(k2, (din, RANK)) * din ** -0.5,
                         b=jax.random.normal(k3, (RANK, dout)) * 0.02,
                         magnitude=None, dropout_key=None, scale=ALPHA / RANK, dropout=0.0)
    ks = jax.random.split(key, 3)
    return {"gate_proj": {"kernel": leaf(ks[0], d, f)}, "up_proj": {"kernel": leaf(ks[1], d, f)},
            "down_proj": {"kernel": leaf(ks[2], f, d)}}


def _step(fused: bool):
    """jit((adapters, frozen, x, dy) → (y, adapter grads, dx)), as the model runs it (fused=True) or the per-projection form."""
    def run(params, x, dy):
        def block(p, x):
            return mlp_module.gated_mlp(x, p, "silu", jnp.bfloat16, fused=fused)

        y, vjp = jax.vjp(block, params, x)
        grads, dx = vjp(dy)
        adapters = jax.tree.map(lambda leaf: (leaf.a, leaf.b), grads, is_leaf=lambda z: isinstance(z, lora.LoRA))
        return y, adapters, dx
    return jax.jit(run)


def _torch_ms(lead, d, f) -> float | None:
    try:
        import torch
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act="silu"))
    mlp = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=["gate_proj", "up_proj", "down_proj"]), mlp)
    for name, p in mlp.named_parameters():
        p.requires_grad_("lora_" in name)
    mlp = mlp.to("cuda", torch.bfloat16)
    x = torch.randn(*lead, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(*lead, d, device="cuda", dtype=torch.bfloat16)

    def once():
        y = mlp(x)
        y.backward(dy)

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(10):
            once()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / 10)
    return statistics.median(times) * 1e3


def _sweep(lead, d, f):
    n = int(np.prod(lead))
    ks = jax.random.split(jax.random.key(1), 5)
    g, u, dhb = (jax.random.normal(k, (n, f), jnp.bfloat16) for k in ks[:3])
    dha = jax.random.normal(ks[3], (n, RANK), jnp.bfloat16)
    a = (jax.random.normal(ks[4], (f, RANK)) * 0.05).astype(jnp.bfloat16)
    moved = 5 * n * f * 2

    def xla(g, u, dhb):  # the same backward without the adapter term, as XLA fuses it alone
        act, d_act = activation_and_grad(g.astype(jnp.float32), "silu")
        dh = dhb.astype(jnp.float32)
        return (dh * u.astype(jnp.float32) * d_act).astype(g.dtype), (dh * act).astype(g.dtype)

    ms = _time(jax.jit(xla), g, u, dhb)
    print(f"\nactivation backward alone, [{n}, {f}] bf16, rank {RANK} (reads g, u, dh; writes dg, du: "
          f"{moved / 1e6:.0f} MB); XLA without the adapter term: {ms * 1e3:.1f} µs, {moved / ms / 1e6:.0f} GB/s")
    print("| rows | cols | warps | µs | GB/s |\n| ---: | ---: | ---: | ---: | ---: |")
    for rows, cols, warps in SWEEP:
        bl = kernel.BlockSizes(block_rows=rows, block_cols=cols, num_warps=warps)
        try:
            ms = _time(jax.jit(lambda *z, bl=bl: kernel.activation_grad(*z, "silu", blocks=bl)), g, u, dhb, dha, a)
        except Exception as e:  # noqa: BLE001 - a block size Triton cannot compile: report, go on
            print(f"| {rows} | {cols} | {warps} | failed: {type(e).__name__} | |")
            continue
        print(f"| {rows} | {cols} | {warps} | {ms * 1e3:.1f} | {moved / ms / 1e6:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=list(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time the kernels alone over block sizes")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"lora_gated_down.KERNELS={lora_gated_down.KERNELS}")
    print("| shape | tokens × hidden × mlp | per-projection ms | jaxtune ms | speed-up | PEFT ms | jaxtune vs PEFT | err |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.shapes:
        lead, d, f = SHAPES[name]
        params = _params(d, f, jax.random.key(0))
        x = jax.random.normal(jax.random.key(2), (*lead, d), jnp.bfloat16)
        dy = jax.random.normal(jax.random.key(3), (*lead, d), jnp.bfloat16)
        plain, fused = _step(False), _step(True)
        err = _err(fused(params, x, dy), plain(params, x, dy))
        plain_ms, fused_ms = _time(plain, params, x, dy), _time(fused, params, x, dy)
        torch_ms = _torch_ms(lead, d, f)
        torch_cols = ("–", "–") if torch_ms is None else (f"{torch_ms:.3f}", f"{torch_ms / fused_ms:.2f}×")
        print(f"| {name} | {int(np.prod(lead))} × {d} × {f} | {plain_ms:.3f} | {fused_ms:.3f} | "
              f"{plain_ms / fused_ms:.2f}× | {torch_cols[0]} | {torch_cols[1]} | {err:.1e} |", flush=True)
    if args.sweep:
        for name in args.shapes:
            _sweep(*SHAPES[name])


if __name__ == "__main__":
    main()

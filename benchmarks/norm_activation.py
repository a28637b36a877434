"""RMSNorm, residual add + RMSNorm and SwiGLU: our Pallas kernels against XLA's fusions of the same
jnp (what the model ran before) and PyTorch eager (transformers' LlamaRMSNorm and SiLU·up), forward
and forward+backward, on the training steps' activation shapes, in one run on one GPU.

  python benchmarks/norm_activation.py [--shapes 1b 8b] [--ops rms_norm add_rms_norm swiglu]
      [--rms-rows 1 2 4] [--act-blocks 8x1024 ...]

Times are medians of 7 repeats of 10 back-to-back calls after warm-up. "err" is the largest
absolute difference from XLA's result (outputs and input gradients), in units of the result's
largest magnitude. `--rms-rows` and `--act-blocks` add kernel variants (rows per program; rows ×
columns per tile) for tuning.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.kernels import rms_norm as norm_kernel
from jaxtune.model.norm_activation import gated_activation_jnp, rms_norm_jnp

# (name, tokens, hidden, mlp): the 1B LoRA step (4 × 2048 tokens) and the 8B one (1 × 4096)
SHAPES = {"1b": (4 * 2048, 2048, 8192), "8b": (4096, 4096, 14336)}
EPS = 1e-5
OPS = ("rms_norm", "add_rms_norm", "swiglu")


def _time(fn, *args, repeats: int = 7, calls: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


def _fwd_bwd(f):
    """jit(x… , cotangents → (outputs, input cotangents))."""
    def run(args, cts):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cts)
    return jax.jit(run)


def _err(got, want) -> float:
    leaves_g, leaves_w = jax.tree.leaves(got), jax.tree.leaves(want)
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                     / (jnp.max(jnp.abs(w.astype(jnp.float32))) + 1e-30)) for g, w in zip(leaves_g, leaves_w))


def _torch_times(kind: str, arrays: list[np.ndarray], cts: list[np.ndarray]) -> tuple[float, float] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    ts = [torch.tensor(a.astype(np.float32)).to("cuda", torch.bfloat16).requires_grad_() for a in arrays]
    tc = [torch.tensor(c.astype(np.float32)).to("cuda", torch.bfloat16) for c in cts]
    weight = torch.ones(arrays[0].shape[-1], device="cuda", dtype=torch.bfloat16)

    def rms(x):  # transformers' LlamaRMSNorm
        x32 = x.to(torch.float32)
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)

    def forward():
        if kind == "rms_norm":
            return (rms(ts[0]),)
        if kind == "add_rms_norm":
            s = ts[0] + ts[1]
            return s, rms(s)
        return (torch.nn.functional.silu(ts[0]) * ts[1],)

    def fwd_bwd():
        outs = forward()
        torch.autograd.backward(outs, tc[:len(outs)])

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / 10)
        return statistics.median(times) * 1e6

    with torch.no_grad():
        fwd = timed(forward)
    return fwd, timed(fwd_bwd)


def _swiglu_impls(arrays, act_blocks):
    from jaxtune.kernels import gated_activation as act_kernel

    gate, up, d_act = arrays
    impls = {"xla": lambda g, u: gated_activation_jnp(g, u, "silu"),
             "ours": lambda g, u: act_kernel.gated_activation(g, u, "silu")}
    for block in act_blocks:
        rows, cols = (int(v) for v in block.split("x"))
        impls[f"ours {block}"] = lambda g, u, rows=rows, cols=cols: act_kernel.gated_activation(
            g, u, "silu", block_rows=rows, block_cols=cols)
    return [gate, up], [d_act], impls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--rms-rows", type=int, nargs="*", default=[], help="extra kernel variants: rows per program")
    parser.add_argument("--act-blocks", nargs="*", default=[], help="extra kernel variants: ROWSxCOLS per tile")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| op | shape | impl | fwd µs | fwd+bwd µs | vs XLA fwd+bwd | err |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for shape_name in args.shapes:
        tokens, hidden, mlp = SHAPES[shape_name]
        scale = jnp.asarray(1.0 + 0.1 * rng.standard_normal(hidden), jnp.bfloat16)

        def arrays(n, width):
            return [rng.standard_normal((tokens, width)).astype(np.float32) for _ in range(n)]

        cases = []
        h, delta, dy, ds = arrays(4, hidden)
        impls = {"xla": lambda x: rms_norm_jnp(x, scale, EPS), "ours": lambda x: norm_kernel.rms_norm(x, scale, EPS)}
        for rows in args.rms_rows:
            impls[f"ours rows={rows}"] = lambda x, rows=rows: norm_kernel.rms_norm(x, scale, EPS, block_rows=rows)
        cases.append(("rms_norm", [h], [dy], impls))
        impls = {"xla": lambda a, b: (a + b, rms_norm_jnp(a + b, scale, EPS)),
                 "ours": lambda a, b: norm_kernel.add_rms_norm(a, b, scale, EPS)}
        for rows in args.rms_rows:
            impls[f"ours rows={rows}"] = lambda a, b, rows=rows: norm_kernel.add_rms_norm(a, b, scale, EPS,
                                                                                         block_rows=rows)
        cases.append(("add_rms_norm", [h, delta], [ds, dy], impls))
        if "swiglu" in args.ops:
            cases.append(("swiglu", *_swiglu_impls(arrays(3, mlp), args.act_blocks)))
        cases = [case for case in cases if case[0] in args.ops]
        for op, inputs, cts, impls in cases:
            xs = [jnp.asarray(a, jnp.bfloat16) for a in inputs]
            cs = [jnp.asarray(c, jnp.bfloat16) for c in cts]
            cs = cs[0] if len(cs) == 1 else tuple(cs)
            want = None
            xla_time = None
            for impl, f in impls.items():
                try:
                    fwd = jax.jit(f)
                    fb = _fwd_bwd(f)
                    result = fb(xs, cs)
                    t_fwd, t_fb = _time(fwd, *xs), _time(fb, xs, cs)
                except Exception as e:  # a variant that does not compile: say so, go on
                    print(f"| {op} | {shape_name} | {impl} | failed: {type(e).__name__}: {str(e)[:120]} | | | |")
                    continue
                if want is None:
                    want, xla_time = result, t_fb
                print(f"| {op} | {shape_name} [{tokens}, {inputs[0].shape[-1]}] | {impl} | {t_fwd:.1f} | {t_fb:.1f} "
                      f"| {xla_time / t_fb:.2f}× | {_err(result, want):.1e} |", flush=True)
            torch_times = _torch_times(op, inputs, cts if isinstance(cts, list) else [cts])
            if torch_times:
                print(f"| {op} | {shape_name} | torch eager | {torch_times[0]:.1f} | {torch_times[1]:.1f} "
                      f"| {xla_time / torch_times[1]:.2f}× | |", flush=True)


if __name__ == "__main__":
    main()

"""Energy per unit of work of the kinds of kernels a training step is made of (issue 9).

    python benchmarks/kernel_energy.py [--seconds 3] [--warmup 1] [--tiny]

Each kernel runs back to back for `--seconds` after `--warmup` seconds (long enough for the
driver's power limit to settle the clock); NVML's energy counter over the loop gives joules per
call, and the SM clock is sampled (gpu_power.py). Kernels: a bf16 GEMM at the 1B step's gate/up and
down shapes on random values and, for the same shape, on zeros (a GEMM's power follows the bits it
switches); an elementwise pass over 128 MiB; our flash attention and cuDNN's (jax), forward and
forward+backward, and our two backward kernels on their own, at the 1B step's shape. Why: at the power limit a step's time follows its
energy (benchmarks/RESULTS.md, thirteenth round), so what a kernel costs in joules says what
removing it gains. `--tiny` runs toy shapes on any backend (times only where NVML is absent: a
smoke test, not a figure).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from attention import fa, kernel_call  # benchmarks/, next to this script (fa: our kernels)
from gpu_power import PowerMeter


def measure(name: str, f, args, work: float, unit: str, seconds: float, warmup: float) -> str:
    """One table row: time per call, throughput, energy per call and per unit, watts, SM clock."""
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    batch = max(1, int(0.05 / (time.perf_counter() - start)))  # calls between host syncs (~50 ms)

    def loop(duration: float) -> int:
        calls, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            for _ in range(batch):
                out = f(*args)
            jax.block_until_ready(out)
            calls += batch
        return calls

    loop(warmup)  # the power limit settles the clock
    with PowerMeter() as meter:
        start = time.perf_counter()
        calls = loop(seconds)
        per_call = (time.perf_counter() - start) / calls
    power = meter.result(steps=calls)
    row = f"| {name} | {per_call * 1e6:.1f} µs | {work / per_call / 1e12:.1f} T{unit}/s "
    if not power:
        return row + "| - | - | - |"
    return (row + f"| {power['joules_per_step'] / work * 1e12:.3g} J/T{unit} | {power['avg_power_w']:.0f} W"
            + (" (capped)" if power["power_capped"] > 0.5 else "") + f" | {power['sm_clock_mhz']:.0f} |")


def backward_kernels(q, k, v, interpret: bool):
    """Our two backward kernels (attention.py's `kernel_call`) with their arguments, on a causal
    forward's residuals (dO = q): (dK/dV call, args), (dQ call, args). The dQ kernel also writes
    D for the dK/dV kernel; a fused backward would fold most of its work into the dK/dV one."""
    d = q.shape[-1]
    flags = fa._Flags(causal=True, segmented=False, windowed=False)
    blocks = fa.BlockSizes.get_default(d, q.dtype)._clamped(q.shape[1], k.shape[1])
    st = fa._Static(sm_scale=d**-0.5, flags=flags, blocks=blocks, interpret=interpret)
    pos = jnp.asarray([0, 2**31 - 1], jnp.int32)  # (q_offset - kv_offset, no window)
    o, lse2 = kernel_call("fwd", st, pos)(q, k, v)
    dq_args = (q, k, v, lse2, o, jnp.zeros_like(lse2), q)
    dq_call = kernel_call("dq", st, pos)
    _, di = dq_call(*dq_args)
    return (kernel_call("dkv", st, pos), (q, k, v, lse2, di, q)), (dq_call, dq_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured loop per kernel")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured loop before each kernel's")
    parser.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test)")
    args = parser.parse_args()
    tokens, hidden, mlp = (64, 32, 64) if args.tiny else (8192, 2048, 8192)
    batch, seq, heads, kv_heads, head_dim = (1, 128, 2, 1, 64) if args.tiny else (4, 2048, 32, 8, 64)
    keys = jax.random.split(jax.random.key(0), 7)
    rand = lambda i, shape, scale=1.0: jax.random.normal(keys[i], shape, jnp.bfloat16) * scale

    matmul = jax.jit(lambda a, b: a @ b)
    x, w_up = rand(0, (tokens, hidden)), rand(1, (hidden, mlp), 0.02)
    h, w_down = rand(2, (tokens, mlp)), rand(3, (mlp, hidden), 0.02)
    pass_in = rand(4, (64 if not args.tiny else 1, 1024, 1024))
    q = rand(5, (batch, seq, heads, head_dim))
    kv = rand(6, (batch, seq, kv_heads, head_dim))
    on_gpu = jax.default_backend() == "gpu"
    ours = lambda q, k, v: fa.flash_attention(q, k, v, causal=True, interpret=not on_gpu)
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    fwd_bwd = lambda f: jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](q))
    gemm_flops = 2 * tokens * hidden * mlp
    attention_flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal forward; backward 2.5x
    shape = f"B{batch} S{seq} H{heads}/KH{kv_heads} D{head_dim} causal"
    dkv, dq = backward_kernels(q, kv, kv, interpret=not on_gpu)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.seconds:g} s per kernel")
    print("| kernel | time per call | throughput | energy | board power | SM MHz |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [
        (f"GEMM [{tokens}, {hidden}] x [{hidden}, {mlp}] bf16, random", matmul, (x, w_up), gemm_flops, "FLOP"),
        (f"GEMM [{tokens}, {hidden}] x [{hidden}, {mlp}] bf16, zeros", matmul,
         (jnp.zeros_like(x), jnp.zeros_like(w_up)), gemm_flops, "FLOP"),
        (f"GEMM [{tokens}, {mlp}] x [{mlp}, {hidden}] bf16, random", matmul, (h, w_down), gemm_flops, "FLOP"),
        (f"elementwise pass, {pass_in.nbytes >> 20} MiB read + written", jax.jit(lambda a: a * 1.5 + 1.0),
         (pass_in,), 2 * pass_in.nbytes, "B"),
        (f"our flash attention fwd, {shape}", jax.jit(ours), (q, kv, kv), attention_flops, "FLOP"),
        (f"our flash attention fwd+bwd, {shape}", fwd_bwd(ours), (q, kv, kv), 3.5 * attention_flops, "FLOP"),
        # FLOPs of the block matmuls each performs: dK/dV 4 (QKᵀ again, dP, dV, dK), dQ 3 (QKᵀ, dP, dQ)
        (f"our dK/dV kernel, {shape}", *dkv, 2.0 * attention_flops, "FLOP"),
        (f"our dQ kernel, {shape}", *dq, 1.5 * attention_flops, "FLOP"),
        (f"cuDNN attention fwd, {shape}", jax.jit(cudnn), (q, kv, kv), attention_flops, "FLOP"),
        (f"cuDNN attention fwd+bwd, {shape}", fwd_bwd(cudnn), (q, kv, kv), 3.5 * attention_flops, "FLOP"),
    ]
    for name, f, f_args, work, unit in rows:
        if name.startswith("cuDNN") and not on_gpu:
            print(f"| {name} | not run: cuDNN needs a GPU | | | | |")
            continue
        print(measure(name, f, f_args, work, unit, args.seconds, args.warmup), flush=True)


if __name__ == "__main__":
    main()

"""Energy per unit of work of the kinds of kernels a training step is made of (issue 9).

    python benchmarks/kernel_energy.py [--seconds 3] [--warmup 1] [--tiny]

Each kernel runs back to back for `--seconds` after `--warmup` seconds (long enough for the
driver's power limit to settle the clock); NVML's energy counter over the loop gives joules per
call, and the SM clock is sampled (gpu_power.py). Kernels: a bf16 GEMM at the 1B step's gate/up and
down shapes on random values and, for the same shape, on zeros (a GEMM's power follows the bits it
switches); an elementwise pass over 128 MiB; our flash attention and cuDNN's (jax), forward and
forward+backward, and our two backward kernels on their own, at the 1B step's shape; the LoRA
gate/up projections with the activation in XLA's form against our fused Mosaic kernel (the trainer's on Hopper),
and jax's Mosaic GPU matmul against cuBLAS (`gate_up_rows`); the residual stream's RMSNorm by
XLA and by our kernels (`norm_rows`). Why: at the power limit a step's time
follows its energy (benchmarks/RESULTS.md, thirteenth round), so what a kernel costs in joules says
what removing it gains. `--tiny` runs toy shapes on any backend (times only where NVML is absent: a
smoke test, not a figure).
"""

from __future__ import annotations

import argparse
import functools
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
    gate_up = gate_up_rows(args.tiny, on_gpu)  # prints its check line before the table
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
    ]
    rows += [(f"cuDNN attention fwd, {shape}", jax.jit(cudnn), (q, kv, kv), attention_flops, "FLOP"),
             (f"cuDNN attention fwd+bwd, {shape}", fwd_bwd(cudnn), (q, kv, kv), 3.5 * attention_flops, "FLOP")
             ] if on_gpu else [(f"cuDNN attention {part}, {shape}", None, None, "cuDNN needs a GPU", None)
                               for part in ("fwd", "fwd+bwd")]
    rows += gate_up + norm_rows(x, on_gpu)
    for name, f, f_args, work, unit in rows:
        if f is None:  # a kernel this backend cannot run; `work` says why
            print(f"| {name} | not run: {work} | | | | |")
            continue
        print(measure(name, f, f_args, work, unit, args.seconds, args.warmup), flush=True)


def norm_rows(h, on_gpu: bool) -> list[tuple]:
    """The residual stream's RMSNorm at the step's `[tokens, D]`: XLA's fusions of the plain form
    against our kernels (kernels/rms_norm.py, in interpret mode off a GPU), forward alone and
    forward + backward with the residual path's gradient added (as `jaxtune/model/norm.py` runs
    it); work counted as the bytes each must move (2 and 6 arrays of h's size)."""
    from jaxtune.kernels import rms_norm as kernel
    from jaxtune.model.norm import rms_norm

    eps, interpret = 1e-5, not on_gpu
    scale = jnp.ones(h.shape[-1:], h.dtype) * 1.1
    dy, dres = h * 0.5, h * 0.25

    def plain_fwd_bwd(h, scale, dy, dres):
        (_, y), vjp = jax.vjp(lambda h: (h, rms_norm(h, scale, eps)), h)
        return y, vjp((dres, dy))[0]

    def ours_fwd_bwd(h, scale, dy, dres, blocks):
        y, rstd = kernel.forward(h, scale, eps=eps, blocks=blocks, interpret=interpret)
        return y, kernel.backward(h, rstd, scale, dy, dres, blocks=blocks, interpret=interpret)

    shape = f"[{h.shape[0]}, {h.shape[1]}] {h.dtype}"
    rows = [(f"RMSNorm fwd, XLA, {shape}", jax.jit(lambda h, s: rms_norm(h, s, eps)), (h, scale), 2 * h.nbytes, "B"),
            (f"RMSNorm fwd+bwd with the residual gradient, XLA, {shape}", jax.jit(plain_fwd_bwd),
             (h, scale, dy, dres), 6 * h.nbytes, "B")]
    # The default blocks, and one row per program on 8 warps.
    for blocks in (kernel.Blocks(), kernel.Blocks(elements=h.shape[1], warps=8)):
        how = f"{blocks.rows(*h.shape)} row(s) x {blocks.num_warps(h.shape[1])} warps"
        rows += [(f"RMSNorm fwd, our kernel, {how}, {shape}",
                  jax.jit(functools.partial(kernel.forward, eps=eps, blocks=blocks, interpret=interpret)),
                  (h, scale), 2 * h.nbytes, "B"),
                 (f"RMSNorm fwd+bwd with the residual gradient, our kernels, {how}, {shape}",
                  jax.jit(functools.partial(ours_fwd_bwd, blocks=blocks)), (h, scale, dy, dres), 6 * h.nbytes, "B")]
    return rows


def gate_up_rows(tiny: bool, on_gpu: bool) -> list[tuple]:
    """The 1B step's gate/up projections (LoRA r=16) with the activation: as XLA runs them (one
    `[x | xa] @ [W ; sB]` over both, interleaved chunk by chunk, on cuBLAS, then XLA's activation
    pass: lora.py's JOINT_GATE_UP path) against our Mosaic GPU kernel that does all of it in one
    pass (kernels/gate_up_activation_mosaic.py, what the trainer runs on a Hopper GPU; in interpret
    mode off a GPU), and plain GEMMs by jax's own Mosaic GPU Hopper matmul in a few tile
    configurations (GPU only): whether a Pallas matmul reaches cuBLAS's joules per FLOP decides
    whether fusing passes into our own matmuls can pay. Prints the kernel's largest differences
    from XLA's arrays first."""
    from jaxtune.kernels import gate_up_activation_mosaic as gu
    from jaxtune.lora_fused_product import fused_lora_product
    from jaxtune.model.mlp import gated_activation

    tokens, hidden, mlp, rank, chunk = (128, 64, 128, 16, 128) if tiny else (8192, 2048, 8192, 16, 128)
    keys = jax.random.split(jax.random.key(1), 5)
    rand = lambda i, shape, scale=1.0: jax.random.normal(keys[i], shape, jnp.bfloat16) * scale
    x, xa = rand(0, (tokens, hidden)), rand(1, (tokens, 2 * rank))  # both adapters' x@A side by side
    w_gate, w_up = rand(2, (hidden, mlp), 0.02), rand(3, (hidden, mlp), 0.02)
    sb = rand(4, (2 * rank, mlp // chunk, 2 * chunk), 0.02)  # s·B in the joint layout (dense: a stand-in)

    def xla_form(x, xa, w_gate, w_up, sb):
        gu_ = fused_lora_product("btd,dkc->btkc", x[None], xa[None], (w_gate, w_up), sb, chunk)[0]
        g, u = gu_[..., :chunk].reshape(tokens, mlp), gu_[..., chunk:].reshape(tokens, mlp)
        return gu_, gated_activation(g, u, "silu")

    # The kernel's operands as lora_gate_up.py forms them: the adapters' K padded.
    k = gu.ADAPTER_K
    fused_args = (x, jnp.pad(xa, ((0, 0), (0, k - 2 * rank))), w_gate, w_up,
                  jnp.pad(sb.reshape(2 * rank, 2 * mlp), ((0, k - 2 * rank), (0, 0))))
    args = (x, xa, w_gate, w_up, sb)
    xla = jax.jit(xla_form)
    fused = lambda cluster: jax.jit(functools.partial(gu.gate_up_activation, hidden_act="silu", chunk=chunk,
                                                      cluster=cluster, interpret=not on_gpu))
    got, want = fused(1)(*fused_args), xla(*args)
    diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.reshape(a.shape).astype(jnp.float32))))
             for a, b in zip(got, want)]
    print("check: gate/up kernel vs XLA's form, max |difference| in gu, h: " + ", ".join(f"{d:.3g}" for d in diffs))
    flops = 2 * 2 * tokens * (hidden + 2 * rank) * mlp
    shape = f"[{tokens}, {hidden}] x 2 x [{hidden}, {mlp}], r {rank}"
    rows = [(f"gate/up + SwiGLU in XLA (concat, [W ; sB], cuBLAS, activation pass), {shape}", xla, args, flops,
             "FLOP")]
    rows += [(f"gate/up + SwiGLU, our Mosaic kernel, {cluster}-CTA clusters, {shape}", fused(cluster), fused_args,
              flops, "FLOP")
             for cluster in (1, 2)]
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    dim = hm.MatmulDimension
    gemm = f"[{tokens}, {hidden}] x [{hidden}, {mlp}]"
    for wg, cluster in ((dim.N, None), (dim.N, dim.M), (dim.M, None), (dim.M, dim.N)):
        config = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, wg_dimension=wg,
                                 cluster_dimension=cluster, grid_minor_dim=dim.N, grid_tile_width=8)
        name = f"GEMM {gemm}, jax's Mosaic matmul, warpgroups along {wg}, cluster {cluster}"
        if not on_gpu:
            rows.append((name, None, None, "jax's Mosaic matmul runs compiled only (a Hopper GPU)", None))
            continue
        rows.append((name, jax.jit(functools.partial(hm.matmul, c=None, config=config)), (x, w_gate),
                     2 * tokens * hidden * mlp, "FLOP"))
    return rows


if __name__ == "__main__":
    main()

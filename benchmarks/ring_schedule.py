"""Ring attention's compute, as it will run on N devices, timed on one GPU.

    python benchmarks/ring_schedule.py [--seq 32768] [--heads 32] [--kv-heads 8] [--ns 2 4 8]

For each N, every device's zigzag schedule (`kernels/ring_attention.py`: step 0 on its own
shard, then one block-pair call per visiting shard, merged by log-sum-exp) is run back to back in
one jitted function: the kernel calls and merges of all N devices, without the transfers. Its
time against one whole-sequence causal flash call of the same total length is the attention
efficiency ring attention can reach per device (transfers overlap the compute on real hardware).
Prints forward and forward+backward ratios. `--tiny` runs a small shape in interpret mode (CPU).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxtune.kernels.flash_attention import flash_attention
from jaxtune.kernels.ring_attention import _merge, zigzag_permutation


def device_schedule(q, k, v, me: int, n: int, interpret: bool):
    """Device `me`'s output `[B, 2c, H, D]` for zigzag shards (chunks me and 2n-1-me), visiting
    every kv shard as the ring does. q/k/v are the whole zigzag-ordered sequence."""
    c = q.shape[1] // (2 * n)

    def shard(x, d):
        return x[:, 2 * c * d: 2 * c * (d + 1)]

    def call(qa, kb, vb, causal):
        o, lse = flash_attention(qa, kb, vb, causal=causal, return_lse=True, interpret=interpret)
        return o.astype(jnp.float32), lse

    def cat(a, b):
        return jnp.concatenate([a[0], b[0]], axis=1), jnp.concatenate([a[1], b[1]], axis=2)

    q_me, k_me, v_me = shard(q, me), shard(k, me), shard(v, me)
    q0, q1 = q_me[:, :c], q_me[:, c:]
    acc = cat(call(q0, k_me[:, :c], v_me[:, :c], True),
              _merge([call(q1, k_me[:, :c], v_me[:, :c], False), call(q1, k_me[:, c:], v_me[:, c:], True)]))
    for t in range(1, n):
        src = (me - t) % n
        k_s, v_s = shard(k, src), shard(v, src)
        if src < me:  # both query chunks see kv chunk `src`
            part = call(q_me, k_s[:, :c], v_s[:, :c], False)
        else:  # only chunk 2n-1-me sees anything: the whole shard
            b, _, h, _ = q0.shape
            part = cat((jnp.zeros(q0.shape, jnp.float32), jnp.full((b, h, c), -jnp.inf)), call(q1, k_s, v_s, False))
        acc = _merge([acc, part])
    return acc[0]


def timed(fn, *args, repeats: int = 10) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    interpret = jax.default_backend() == "cpu"
    if args.tiny:
        args.batch, args.seq, args.heads, args.kv_heads, args.head_dim = 1, 128, 2, 1, 16
    dtype = jnp.float32 if interpret else jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 3)
    shape_q = (args.batch, args.seq, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq, args.kv_heads, args.head_dim)
    q = jax.random.normal(keys[0], shape_q, dtype)
    k = jax.random.normal(keys[1], shape_kv, dtype)
    v = jax.random.normal(keys[2], shape_kv, dtype)
    print(f"device: {jax.devices()[0].device_kind}; B{args.batch} S{args.seq} H{args.heads}/KH{args.kv_heads} "
          f"D{args.head_dim} {jnp.dtype(dtype).name}, causal")

    def full_fwd(q, k, v):
        return flash_attention(q, k, v, causal=True, interpret=interpret)

    def loss_of(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))

    base_fwd = timed(jax.jit(full_fwd), q, k, v)
    base_bwd = timed(loss_of(full_fwd), q, k, v)
    print(f"whole-sequence flash: fwd {1e3 * base_fwd:.3f} ms, fwd+bwd {1e3 * base_bwd:.3f} ms")
    print("| N | ring fwd ms | × whole fwd | ring fwd+bwd ms | × whole fwd+bwd |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.ns:
        if args.seq % (2 * n):
            print(f"| {n} | seq {args.seq} not divisible by {2 * n} | | | |")
            continue

        def ring_fwd(q, k, v, n=n):
            return jnp.concatenate([device_schedule(q, k, v, me, n, interpret) for me in range(n)], axis=1)

        # The emulated schedule on zigzag-ordered inputs is causal attention, zigzag-ordered.
        perm = zigzag_permutation(args.seq, n)
        got = ring_fwd(q[:, perm], k[:, perm], v[:, perm]).astype(jnp.float32)
        want = full_fwd(q, k, v)[:, perm].astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert err < (1e-5 if dtype == jnp.float32 else 2e-2), f"N={n}: schedule differs from causal attention ({err:.1e})"
        t_fwd = timed(jax.jit(ring_fwd), q, k, v)
        t_bwd = timed(loss_of(ring_fwd), q, k, v)
        print(f"| {n} | {1e3 * t_fwd:.3f} | {base_fwd / t_fwd:.2f} | {1e3 * t_bwd:.3f} | {base_bwd / t_bwd:.2f} |")


if __name__ == "__main__":
    main()

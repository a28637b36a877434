"""Ring attention across real devices: per-device efficiency against one-device flash attention.

    python benchmarks/ring_devices.py [--devices 2] [--seqs 32768 65536 131072] [--heads 32 --kv-heads 8 --head-dim 64]

`jaxtune.kernels.ring_attention.ring_attention` (zigzag layout, K/V passed around the ring with
`ppermute`) on a `sequence` mesh of N devices, causal, bf16, forward and forward+backward, at each
total length S. Two figures per length:

- per-device efficiency: N · t_flash(S/N) / t_ring(S). Each device does 1/N of the causal work of
  S, which is N times the causal work of a whole sequence of S/N, so this is the ring's attention
  TFLOP/s per device over one device's flash TFLOP/s at the per-device length (ring-flash-attention's
  measure; its PyTorch zigzag ring reports 0.90 on H800s).
- strong scaling: t_flash(S) / (N · t_ring(S)), against one device running the whole sequence
  (only where S fits one device's memory; at long S flash is memory-light, so it usually does).

Before timing, the ring output at the shortest length is checked against one-device causal flash
attention on the same (zigzag-ordered) inputs. `--tiny` runs small shapes (one length) in interpret
mode on CPU devices (set XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtune.kernels.flash_attention import flash_attention
from jaxtune.kernels.ring_attention import ring_attention, zigzag_permutation
from jaxtune.mesh import make_mesh
from ring_schedule import timed  # benchmarks/ is the script's folder, first on sys.path


def fwd_and_grad(attend):
    """(jitted forward, jitted gradient of a scalar loss w.r.t. q, k, v) of `attend(q, k, v)`."""
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=None, help="ring size (default: all devices)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    interpret = jax.default_backend() == "cpu"
    if args.tiny:  # one length: each length compiles five interpreted kernels, seconds apiece on CPU
        args.seqs, args.heads, args.kv_heads, args.head_dim = [128], 2, 1, 16
    n = args.devices or len(jax.devices())
    mesh = make_mesh({"data": 1, "sequence": n}, devices=jax.devices()[:n])
    sharded = NamedSharding(mesh, P(None, "sequence"))
    one_device = jax.devices()[0]
    dtype = jnp.float32 if interpret else jnp.bfloat16
    print(f"devices: {n} × {one_device.device_kind}; H{args.heads}/KH{args.kv_heads} D{args.head_dim} "
          f"{jnp.dtype(dtype).name}, causal, B1")

    def flash(q, k, v):
        return flash_attention(q, k, v, causal=True, interpret=interpret)

    def ring(q, k, v):
        seg = jnp.ones(q.shape[:2], jnp.int32)
        return ring_attention(q, k, v, seg, mesh=mesh, causal=True, interpret=interpret)

    flash_fwd, flash_bwd = fwd_and_grad(flash)
    ring_fwd, ring_bwd = fwd_and_grad(ring)
    print("| S | per-device S | ring fwd ms | ring fwd+bwd ms | flash(S/N) fwd+bwd ms | per-device eff. fwd "
          "| per-device eff. fwd+bwd | flash(S) fwd+bwd ms | strong scaling fwd+bwd |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, seq in enumerate(args.seqs):
        keys = jax.random.split(jax.random.key(seq), 3)
        q = jax.random.normal(keys[0], (1, seq, args.heads, args.head_dim), dtype)
        k = jax.random.normal(keys[1], (1, seq, args.kv_heads, args.head_dim), dtype)
        v = jax.random.normal(keys[2], (1, seq, args.kv_heads, args.head_dim), dtype)
        perm = zigzag_permutation(seq, n)
        qz, kz, vz = (jax.device_put(x[:, perm], sharded) for x in (q, k, v))
        if i == 0:  # ring on zigzag inputs == causal attention, zigzag-ordered
            got = np.asarray(ring_fwd(qz, kz, vz), np.float32)
            want = np.asarray(flash_fwd(q, k, v), np.float32)[:, perm]
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            assert err < (1e-5 if dtype == jnp.float32 else 2e-2), f"ring differs from causal attention ({err:.1e})"
            print(f"check: ring vs one-device flash at S={seq}: max rel. err {err:.1e}")
        t_ring_f = timed(ring_fwd, qz, kz, vz)
        t_ring_b = timed(ring_bwd, qz, kz, vz)
        part = seq // n
        ql, kl, vl = (jax.device_put(x[:, :part], one_device) for x in (q, k, v))
        t_part_f = timed(flash_fwd, ql, kl, vl)
        t_part_b = timed(flash_bwd, ql, kl, vl)
        try:
            qw, kw, vw = (jax.device_put(x, one_device) for x in (q, k, v))
            t_whole_b = timed(flash_bwd, qw, kw, vw)
            whole = f"{1e3 * t_whole_b:.2f} | {t_whole_b / (n * t_ring_b):.2f}"
        except jax.errors.JaxRuntimeError as e:  # out of memory on one device
            whole = f"– ({type(e).__name__}) | –"
        print(f"| {seq} | {part} | {1e3 * t_ring_f:.2f} | {1e3 * t_ring_b:.2f} | {1e3 * t_part_b:.2f} "
              f"| {n * t_part_f / t_ring_f:.2f} | {n * t_part_b / t_ring_b:.2f} | {whole} |", flush=True)


if __name__ == "__main__":
    main()

"""One process per GPU (`jax.distributed`) trains exactly as one process driving all the GPUs.

    python benchmarks/two_process_parity.py [--gpus 2] [--steps 20] [--out DIR] [--set key=value ...]

Runs `python -m jaxtune.train --config configs/quickstart.yml` twice on the same data and seed:
once as a single process that sees every GPU (mesh data=N), once as N processes, each pinned to
one GPU with `CUDA_VISIBLE_DEVICES` and joined through `JAX_COORDINATOR_ADDRESS` /
`JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` (what a SLURM or Kubernetes launch sets). Prints both
runs' losses step by step and the largest relative difference; exits 1 if they differ by more
than `--rtol`. Each `--set` is passed to both runs (e.g. `--set bf16=false`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(out: str, steps: int, extra: list[str]) -> list[str]:
    sets = [f"output_dir={out}", f"dataset_prepared_path={out}/prepared", "logging_steps=1", f"max_steps={steps}",
            "evals_per_epoch=null", "saves_per_epoch=null", f"save_steps={steps}", *extra]
    return [sys.executable, "-m", "jaxtune.train", "--config", QUICKSTART] + [a for s in sets for a in ("--set", s)]


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--out", default="outputs/two_process_parity")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--deterministic", action="store_true",
                        help="XLA's deterministic GPU ops (no atomics in reductions, e.g. the embedding "
                             "gradient's scatter-add), so the runs can agree bit for bit")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]  # each run sets its own
    flags = " ".join(inherited + (["--xla_gpu_deterministic_ops=true"] if args.deterministic else []))

    def cpu_devices(n: int) -> dict[str, str]:
        """Without GPUs (JAX_PLATFORMS=cpu) the same runs use N host devices: a CPU rehearsal."""
        return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}

    gpus = ",".join(str(i) for i in range(args.gpus))

    one = os.path.join(args.out, "one_process")
    start = time.perf_counter()
    single = subprocess.run(train_cmd(one, args.steps, args.sets), cwd=ROOT, text=True, capture_output=True,
                            env={**env, "CUDA_VISIBLE_DEVICES": gpus, **cpu_devices(args.gpus)})
    print(f"one process, {args.gpus} GPUs: exit {single.returncode}, {time.perf_counter() - start:.1f} s")
    if single.returncode:
        sys.exit(single.stderr[-3000:])

    many = os.path.join(args.out, f"{args.gpus}_processes")
    port = free_port()
    start = time.perf_counter()
    procs = [subprocess.Popen(train_cmd(many, args.steps, args.sets), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "CUDA_VISIBLE_DEVICES": str(pid), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": str(args.gpus), "JAX_PROCESS_ID": str(pid),
                                   **cpu_devices(1), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"})
             for pid in range(args.gpus)]
    outputs = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    print(f"{args.gpus} processes, one GPU each: exit {codes}, {time.perf_counter() - start:.1f} s")
    if any(codes):
        sys.exit("\n".join(o[-3000:] for o in outputs))

    a, b = losses(one), losses(many)
    print("| step | loss, 1 process | loss, N processes | rel. diff |")
    print("| --- | --- | --- | --- |")
    worst = 0.0
    for step in sorted(a):
        diff = abs(a[step] - b[step]) / max(abs(a[step]), 1e-12)
        worst = max(worst, diff)
        print(f"| {step} | {a[step]:.6f} | {b[step]:.6f} | {diff:.1e} |")
    same_steps = sorted(a) == sorted(b) == list(range(1, args.steps + 1))
    print(f"steps match: {same_steps}; largest relative loss difference: {worst:.2e} (rtol {args.rtol})")
    sys.exit(0 if same_steps and worst <= args.rtol else 1)


if __name__ == "__main__":
    main()

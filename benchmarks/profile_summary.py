"""Where a step's device time goes, from a `jax.profiler` trace: the top kernels by total time.

    python benchmarks/profile_summary.py TRACE_DIR [--steps 3] [--top 30] [--hlo FILE]

Reads the Perfetto trace (`*.trace.json.gz`) that `jax.profiler.trace(dir,
create_perfetto_trace=True)` writes, keeps the events of the GPU streams (all events when there
is no GPU), and sums their durations by kernel name. Prints ms per step, share of the summed
device time, and calls per step; XLA names fusions after their roots (e.g. `loop_multiply_fusion`,
`cutlass_gemm`, `input_reduce_fusion`), Pallas kernels after their Python function.

With the step's optimized HLO (`--hlo`, or an `*after_optimizations.txt` under TRACE_DIR) it also
sums time by what each kernel computes: its HLO instruction's result shape and the JAX operation
it came from (e.g. `transpose(jvp(btd,df->btf))/dot_general`: the input gradient of the gate/up
projections). Kernels name their HLO instruction only when XLA runs them outside command buffers
(CUDA graphs): profile with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` (train_throughput.py's
`--profile` sets it, and dumps the HLO next to the trace).

It also reports how long no stream ran any kernel (`idle_time`), and after and before which
kernels: with command buffers on (`--profile --profile-graphs`) that is the normal run's idle time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def load_events(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    return [e for e in spans if e["pid"] in gpu_pids] if gpu_pids else spans


# Kernel families by name, first match wins: which kind of work the time goes to.
CATEGORIES = (
    ("matmul (cuBLAS/cuBLASLt, Triton GEMM fusions)", r"nvjet|cutlass|cublas|gemm|xmma|sm90_"),
    ("attention kernels", r"flash|cudnn|attention|mha"),
    ("copies and slices", r"memcpy|memset|copy|dynamic.slice|dynamic.update|slice|transpose"),
    ("reductions (input_* fusions)", r"^input_|reduce"),
    ("elementwise (loop_* fusions)", r"^loop_|fusion"),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def hlo_instructions(hlo_text: str) -> dict[str, str]:
    """Instruction name → the rest of its line, from an HLO module's text."""
    lines = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if m:
            lines.setdefault(m.group(1), m.group(2))
    return lines


def _kind(name: str) -> str:
    return re.sub(r"[._]\d+$", "", name)[:60]  # fusion.12 and fusion.13 are one kind of kernel


def by_operation(events: list[dict], hlo_text: str, steps: int, top: int) -> str:
    """Device time by (kernel, HLO result shape, JAX operation), heaviest first."""
    instructions = hlo_instructions(hlo_text)
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        if op is None:
            continue
        line = instructions.get(op, "")
        name = re.search(r'op_name="([^"]*)"', line)
        name = re.sub(r"jit\([^)]*\)/|while/body/|eval_jaxpr/", "", name.group(1)) if name else op
        shape = re.sub(r"\{[^}]*\}|^\(|,$", "", line.split(" ")[0])[:48]  # a tuple's first element
        key = (_kind(e["name"])[:48], shape, name[-90:])
        totals[key] += e["dur"]
        counts[key] += 1
    if not totals:
        return "(no kernel names its HLO instruction: profile with XLA_FLAGS=--xla_gpu_enable_command_buffer=)"
    lines = ["| ms/step | calls/step | µs/call | kernel | result | operation |",
             "| ---: | ---: | ---: | --- | --- | --- |"]
    for (kernel, shape, name), us in totals.most_common(top):
        n = counts[(kernel, shape, name)]
        lines.append(f"| {us / 1e3 / steps:.2f} | {n / steps:.0f} | {us / n:.1f} | `{kernel}` | `{shape}` | `{name}` |")
    return "\n".join(lines)


def idle_time(events: list[dict], steps: int, top: int = 12) -> str:
    """When no stream runs a kernel: the trace's span per step against its busy time (the union of
    the kernels' intervals over all streams), and the idle gaps summed by the kernels around them.

    The span includes what the device waited for between kernels (launches from the host, loop
    conditions read back by the host, synchronisation); kernel sums alone do not show it.
    """
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events)
    if not spans:
        return "(no kernels in the trace)"
    gaps, count = collections.Counter(), collections.Counter()
    busy = 0.0
    start, end, last = spans[0]
    for s_ts, s_end, name in spans[1:]:
        if s_ts > end:
            busy += end - start
            key = (_kind(last), _kind(name))
            gaps[key] += s_ts - end
            count[key] += 1
            start = s_ts
        if s_end > end:
            end, last = s_end, name
    busy += end - start
    window = end - spans[0][0]
    lines = [f"trace span {window / 1e3 / steps:.2f} ms per step, kernels busy {busy / 1e3 / steps:.2f}, "
             f"idle {(window - busy) / 1e3 / steps:.2f} ({(window - busy) / window:.1%})",
             "| idle ms/step | gaps/step | µs/gap | after kernel | before kernel |",
             "| ---: | ---: | ---: | --- | --- |"]
    for (after, before), us in gaps.most_common(top):
        n = count[(after, before)]
        lines.append(f"| {us / 1e3 / steps:.3f} | {n / steps:.0f} | {us / n:.1f} | `{after}` | `{before}` |")
    return "\n".join(lines)


def summarize(trace_dir: str, steps: int = 1, top: int = 30, hlo_path: str | None = None) -> str:
    events = load_events(trace_dir)
    hlo_path = hlo_path or next(iter(sorted(glob.glob(os.path.join(trace_dir, "**", "*after_optimizations.txt"),
                                                      recursive=True))), None)
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        name = re.sub(r"\.\d+$", "", e["name"])  # fusion.12 and fusion.13 are one kind of kernel
        totals[name] += e["dur"]
        counts[name] += 1
    device_us = sum(totals.values())
    by_category, kinds = collections.Counter(), collections.Counter()
    for name, us in totals.items():
        by_category[category(name)] += us
        kinds[category(name)] += 1
    lines = [f"device time {device_us / 1e3 / steps:.1f} ms per step (sum over streams) in {len(totals)} kernel kinds",
             "| kind of kernel | ms/step | share | kernel kinds |", "| --- | ---: | ---: | ---: |"]
    for label, us in by_category.most_common():
        lines.append(f"| {label} | {us / 1e3 / steps:.2f} | {us / device_us:.1%} | {kinds[label]} |")
    lines += ["", "| kernel | ms/step | share | calls/step |", "| --- | ---: | ---: | ---: |"]
    for name, us in totals.most_common(top):
        lines.append(f"| `{name[:90]}` | {us / 1e3 / steps:.2f} | {us / device_us:.1%} | {counts[name] / steps:.0f} |")
    lines += ["", idle_time(events, steps)]
    if hlo_path:
        with open(hlo_path) as f:
            lines += ["", by_operation(events, f.read(), steps, top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (figures are per step)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--hlo", default=None, help="the step's optimized HLO text (default: one under TRACE_DIR)")
    args = parser.parse_args()
    print(summarize(args.trace_dir, args.steps, args.top, args.hlo))


if __name__ == "__main__":
    main()

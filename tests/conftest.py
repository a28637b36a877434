"""Test setup shared by every test: 8 CPU devices stand in for a pod.

XLA_FLAGS must be set before jax is imported anywhere, so it is done at the top of conftest,
which pytest imports before any test module.
"""

import os

from cpu_compile import FAST_COMPILE  # imports no jax

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On the CPU (the default) compiled fast (cpu_compile.py); a GPU run keeps XLA's defaults.
_ON_CPU = os.environ["JAX_PLATFORMS"] == "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + (f" {FAST_COMPILE}" if _ON_CPU else ""))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`slow` tests first; skip `gpu`-marked tests where jax sees no GPU; everything else always runs.

    Order: pytest-xdist's default (`load`) scheduling hands each worker a first chunk of tests in
    collection order (an eighth of them with `-n 2`), then smaller chunks as they finish. With the
    slow tests (mostly end-to-end runs, alphabetically late) first, the first chunk of one worker
    holds them all while the other works through short tests, and the run ends on short tests on
    both: no worker sits idle for the last minute of a long test (about 25 s less on 2 cores)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise as collected
    try:
        has_gpu = any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

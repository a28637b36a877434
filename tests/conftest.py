"""Test setup shared by every test: 8 CPU devices stand in for a pod.

XLA_FLAGS must be set before jax is imported anywhere, so it is done at the top of conftest,
which pytest imports before any test module.
"""

import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests where jax sees no GPU; everything else always runs."""
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def two_process_parity(tmp_path_factory):
    """One run of `benchmarks/two_process_parity.py` on CPU devices, shared by the test of the
    script (tests/test_benchmarks.py) and the test of multi-process training it drives
    (tests/test_multiprocess.py): `python -m jaxtune.train` on the quickstart, once as one process
    with 2 devices, once as 2 processes of 1 device joined by `jax.distributed` (gloo), 6 steps,
    checkpoints every 3. Returns the finished script and its `--out` folder (`one_process/`,
    `2_processes/`). Three training processes, ~30 s: too slow to run twice."""
    out = tmp_path_factory.mktemp("two_process_parity")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script gives each run its devices
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "benchmarks/two_process_parity.py", "--steps", "6", "--out", str(out), "--rtol", "1e-5",
           "--set", "bf16=false", "--set", "micro_batch_size=4", "--set", "save_steps=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    return proc, out

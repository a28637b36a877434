"""Two processes joined by `jax.distributed` on localhost (CPU collectives) train exactly as one
process driving the same number of devices."""

import os
import subprocess
import sys

import pytest

from cpu_compile import FAST_COMPILE
from test_trainer import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
    # `benchmarks/two_process_parity.py` runs `python -m jaxtune.train` on the quickstart as one
    # process with 2 devices, then as 2 processes of 1 device each, joined through
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID with gloo collectives (6 steps,
    # checkpoints every 3), and exits 1 if the losses differ. One test checks both the script and
    # the training it drives: three training processes are too slow to run twice.
    # The script gives each run its devices and passes on other XLA flags (cpu_compile.py: 6 steps,
    # each run mostly its compile).
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "benchmarks/two_process_parity.py", "--steps", "6", "--out", str(tmp_path), "--rtol", "1e-5",
           "--set", "bf16=false", "--set", "micro_batch_size=4", "--set", "save_steps=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "steps match: True" in proc.stdout

    one, two = losses(tmp_path / "one_process"), losses(tmp_path / "2_processes")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    # checkpoints were written by both processes together, the export by process 0 only
    assert os.path.isdir(tmp_path / "2_processes" / "checkpoints" / "6")
    assert os.path.exists(tmp_path / "2_processes" / "model" / "model.safetensors")

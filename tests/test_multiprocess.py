"""Two processes joined by `jax.distributed` on localhost (CPU collectives) train exactly as one
process driving the same number of devices."""

import os

import pytest

from test_trainer import losses


@pytest.mark.slow
@pytest.mark.xdist_group("two_process_parity")  # one worker runs the shared fixture, once
def test_two_processes_match_one_process_with_two_devices(two_process_parity):
    # `benchmarks/two_process_parity.py` runs `python -m jaxtune.train` on the quickstart as one
    # process with 2 devices, then as 2 processes of 1 device each, joined through
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID with gloo collectives; the run is
    # shared with tests/test_benchmarks.py (tests/conftest.py), and checked here on its outputs.
    proc, out = two_process_parity
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    one, two = losses(out / "one_process"), losses(out / "2_processes")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    # checkpoints were written by both processes together, the export by process 0 only
    assert os.path.isdir(out / "2_processes" / "checkpoints" / "6")
    assert os.path.exists(out / "2_processes" / "model" / "model.safetensors")

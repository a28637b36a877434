"""Two processes joined by `jax.distributed` on localhost (CPU collectives) train exactly as one
process driving the same number of devices."""

import os
import socket
import subprocess
import sys

import pytest

from test_trainer import QUICKSTART, ROOT, losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(out, prepared) -> list[str]:
    sets = [f"output_dir={out}", f"dataset_prepared_path={prepared}", "logging_steps=1", "max_steps=6",
            "evals_per_epoch=null", "saves_per_epoch=null", "save_steps=3", "micro_batch_size=4"]
    return [sys.executable, "-m", "jaxtune.train", "--config", QUICKSTART] + [a for s in sets for a in ("--set", s)]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
    base_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run(train_cmd(tmp_path / "one", tmp_path / "prep1"), cwd=ROOT, capture_output=True, text=True,
                            env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
    assert single.returncode == 0, single.stderr

    port = free_port()
    procs = []
    for pid in range(2):
        env = {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
        procs.append(subprocess.Popen(train_cmd(tmp_path / "two", tmp_path / "prep2"), cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    # checkpoints were written by both processes together, the export by process 0 only
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "6")
    assert os.path.exists(tmp_path / "two" / "model" / "model.safetensors")

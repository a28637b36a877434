"""`python -m jaxtune.train` end to end on the quickstart assets: resume after SIGKILL gives the
losses of an uninterrupted run, SIGTERM saves and exits cleanly, the watchdog stops divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cpu_compile import FAST_COMPILE
from jaxtune.train.watchdog import LossWatchdog, TrainingStopped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yml")
# One CPU device, compiled fast (cpu_compile.py: most runs here are a compile and a few steps). The
# 30-step runs of the SIGKILL test keep LLVM's optimisations (OPTIMIZED): there the slower steps
# would cost what the compile saves.
ENV = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
OPTIMIZED = {**ENV, "XLA_FLAGS": ""}


def command(tmp_path, *overrides) -> list[str]:
    sets = [f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prepared'}",
            "logging_steps=1", "evals_per_epoch=null", "saves_per_epoch=null", "num_epochs=1", *overrides]
    return [sys.executable, "-m", "jaxtune.train", "--config", QUICKSTART] + [a for s in sets for a in ("--set", s)]


def losses(out_dir) -> dict[int, float]:
    """step → loss, the last logged value of each step (a resumed run re-logs some steps)."""
    by_step = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                by_step[row["step"]] = row["loss"]
    return by_step


def run(cmd, cwd=ROOT, timeout=600, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


_BACKGROUND: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_background_runs():
    """A test that fails half-way leaves no run behind."""
    yield
    while _BACKGROUND:
        proc = _BACKGROUND.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(cmd, log_dir, env=ENV) -> subprocess.Popen:
    """Start a command in the background; `finish` collects it. A test with independent runs
    starts them together: each spends most of its time on one core (imports, compiling)."""
    os.makedirs(log_dir, exist_ok=True)
    # Files, not pipes: a child never blocks on a full pipe that nobody reads yet.
    out = open(os.path.join(log_dir, "stdout.txt"), "w+")
    err = open(os.path.join(log_dir, "stderr.txt"), "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    proc.logs = (out, err)
    _BACKGROUND.append(proc)
    return proc


def finish(proc, timeout=600) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    texts = []
    for f in proc.logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, *texts)


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`python -m jaxtune.train ARGS` in this process: the same `run_entry(main)` its `__main__`
    block exits with, without a new interpreter importing jax, transformers and torch (~7 s).
    `test_bad_config_key_exits_2_without_traceback` runs the real command end to end."""
    from jaxtune.config import run_entry
    from jaxtune.train.__main__ import main

    capsys.readouterr()
    code = run_entry(main, list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "jaxtune.train", *args], code, out, err)


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_restart_continues_the_exact_loss_curve(tmp_path):
    steps = ["max_steps=30", "save_steps=4"]
    whole = tmp_path / "whole"
    uninterrupted = start(command(whole, *steps), whole, env=OPTIMIZED)  # the reference, alongside the killed run

    broken = tmp_path / "broken"
    proc = subprocess.Popen(command(broken, *steps), cwd=ROOT, env=OPTIMIZED, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: os.path.isdir(broken / "out" / "checkpoints" / "8"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged_before = losses(broken / "out")
    assert max(logged_before) < 30, "the run finished before it could be killed"

    resumed = run(command(broken, *steps), env=OPTIMIZED)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint" in resumed.stdout + resumed.stderr
    done = finish(uninterrupted)
    assert done.returncode == 0, done.stderr
    reference = losses(whole / "out")
    assert sorted(reference) == list(range(1, 31))
    after = losses(broken / "out")
    assert sorted(after) == list(range(1, 31))
    for step in range(1, 31):
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(command(tmp_path, "max_steps=400", "save_steps=1000"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: os.path.exists(tmp_path / "out" / "metrics.jsonl")
             and len(losses(tmp_path / "out")) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "received SIGTERM: saved checkpoint" in output
    saved = [int(d) for d in os.listdir(tmp_path / "out" / "checkpoints") if d.isdigit()]
    assert saved and max(saved) < 400
    assert not os.path.exists(tmp_path / "out" / "model"), "an interrupted run must not export"


def test_watchdog_stops_on_high_loss_with_a_message(tmp_path, capsys):
    # In process, on the 8 test devices: one row per device is the 8 rows per step of one device.
    done = run_in_process(capsys, *command(tmp_path, "max_steps=20", "loss_watchdog_threshold=0.5",
                                           "loss_watchdog_patience=2", "micro_batch_size=1")[3:])
    assert done.returncode == 2
    assert "above loss_watchdog_threshold 0.5 for 2 steps" in done.stderr
    assert "Traceback" not in done.stderr


def test_watchdog_rules():
    dog = LossWatchdog(threshold=None, patience=3)
    dog.check(1, 1e9)  # no threshold: only non-finite losses stop
    with pytest.raises(TrainingStopped, match="loss is nan"):
        dog.check(2, float("nan"))
    dog = LossWatchdog(threshold=2.0, patience=2)
    dog.check(1, 3.0)
    dog.check(2, 1.0)  # back under: the count restarts
    dog.check(3, 3.0)
    with pytest.raises(TrainingStopped):
        dog.check(4, 3.0)


def test_bad_config_key_exits_2_without_traceback(tmp_path):
    done = run(command(tmp_path, "lora_rr=8"))
    assert done.returncode == 2
    assert "lora_rr" in done.stderr and "Traceback" not in done.stderr


def test_unwritable_output_dir_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = run_in_process(capsys, *command(tmp_path, f"output_dir={blocker / 'out'}")[3:])
    assert done.returncode == 2
    assert f"output_dir: cannot write to {blocker / 'out'}" in done.stderr


@pytest.mark.slow
def test_lora_run_writes_a_peft_adapter_that_export_reproduces(tmp_path):
    lora = ["adapter=lora", "lora_target_linear=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0.1", "max_steps=4"]
    done = run(command(tmp_path, *lora))
    assert done.returncode == 0, done.stderr
    adapter = tmp_path / "out" / "adapter"
    config = json.load(open(adapter / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    # The export and the continued run only read the adapter: both run while this process checks it.
    exporting = start([sys.executable, "-m", "jaxtune.export", "--config", QUICKSTART, "--format", "peft",
                       "--out", str(tmp_path / "again")] + command(tmp_path, *lora)[5:], tmp_path / "export")
    # lora_model_dir: a new run starts from the trained adapter instead of B = 0
    cont = tmp_path / "continued"
    continuing = start(command(cont, *lora[:-1], "max_steps=1", f"lora_model_dir={adapter}"), cont)
    import jaxtune
    import numpy as np

    base = jaxtune.load_pretrained(os.path.join(ROOT, "configs", "quickstart", "model"))
    tuned = jaxtune.load_pretrained(os.path.join(ROOT, "configs", "quickstart", "model"), adapter=str(adapter))
    ids = np.arange(1, 12)[None]
    assert not np.allclose(np.asarray(base(ids)), np.asarray(tuned(ids)))  # the adapter was trained

    again = finish(exporting, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (adapter / "adapter_model.safetensors").read_bytes()
    resumed = finish(continuing)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(cont / "out")[1] < losses(tmp_path / "out")[1]


def test_watchdog_counts_each_step_once_however_often_it_is_settled():
    dog = LossWatchdog(threshold=1.0, patience=2)
    for _ in range(3):  # e.g. settled at dispatch, at logging and at saving of the same step
        assert dog.settle(1, {"loss": 5.0}) == 5.0
    assert dog.strikes == 1
    with pytest.raises(TrainingStopped):
        dog.settle(2, {"loss": 5.0})


@pytest.mark.slow
def test_ring_attention_run_logs_the_losses_of_one_device(tmp_path):
    # mesh sequence=4 x data=2 on 8 CPU devices (ring attention in Pallas interpret mode, zigzag
    # rows) against one device running plain XLA attention on the same 8 rows per step.
    steps = ["max_steps=3", "sample_packing=true"]
    env8 = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + ENV["XLA_FLAGS"]}
    ring = start(command(tmp_path / "ring", *steps, "micro_batch_size=4", "mesh.sequence=4", "mesh.data=2"),
                 tmp_path / "ring", env=env8)  # the two runs side by side
    one = run(command(tmp_path / "one", *steps, "micro_batch_size=8"))
    assert one.returncode == 0, one.stderr
    ring = finish(ring, timeout=900)
    assert ring.returncode == 0, ring.stderr
    expected, got = losses(tmp_path / "one" / "out"), losses(tmp_path / "ring" / "out")
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=2e-5), step

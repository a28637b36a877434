"""The XLA options jaxtune's entry points set for GPU compilation (`jaxtune/xla_flags.py`)."""

import os

from jaxtune.xla_flags import GPU_FLAGS, add_gpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSION = "--xla_gpu_experimental_enable_same_shape_multi_output_fusion"


def test_gpu_flags_are_added_once_after_the_users_and_their_value_wins():
    env = {}
    assert add_gpu_flags(env) == " ".join(GPU_FLAGS)
    assert add_gpu_flags(env) == " ".join(GPU_FLAGS)  # a second call adds nothing
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert add_gpu_flags(env).split() == ["--xla_force_host_platform_device_count=8", *GPU_FLAGS]
    env = {"XLA_FLAGS": f"{FUSION}=false --xla_dump_to=/tmp/x"}
    assert add_gpu_flags(env) == f"{FUSION}=false --xla_dump_to=/tmp/x"


def test_train_entry_sets_them_before_the_trainer_starts_jax(monkeypatch):
    """`python -m jaxtune.train` adds them ahead of `train`, which is where jax first asks for a
    device (XLA reads XLA_FLAGS once, then)."""
    from jaxtune.train import run
    from jaxtune.train.__main__ import main

    seen = []
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(run, "train", lambda cfg: seen.append(os.environ["XLA_FLAGS"]))
    assert main(["--config", os.path.join(ROOT, "configs", "quickstart.yml")]) == 0
    assert seen == [" ".join(["--xla_force_host_platform_device_count=8", *GPU_FLAGS])]

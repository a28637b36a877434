"""The multi-GPU benchmark scripts run end to end on CPU devices (tiny shapes), so a GPU session
spends its minutes measuring, not debugging. Each script checks its own results where it can:
ring_devices asserts ring == causal attention. (two_process_parity.py, which exits 1 on differing
losses, is run by tests/test_multiprocess.py.)"""

import json
import os
import subprocess
import sys

import pytest

from cpu_compile import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
       "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}"}  # cpu_compile.py: why


def run(*args, env=ENV, timeout=600) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def worker_results(stdout: str) -> dict[str, dict]:
    """mesh → the jaxtune side's result, from the driver's per-run lines."""
    results = {}
    for line in stdout.splitlines():
        if " jaxtune " in line and "{" in line:
            mesh = line.split(" mesh ")[1].split()[0]
            results[mesh] = json.loads(line[line.index("{"):])
    return results


@pytest.mark.slow
def test_train_throughput_runs_the_trainers_meshes():
    out = run("benchmarks/train_throughput.py", "--tiny", "--sides", "jaxtune", "--cases", "1b-lora-ckpt",
              "--steps", "1", "--meshes", "1", "data=2,sequence=2", "tensor=2")
    results = worker_results(out)
    assert set(results) == {"1", "data=2,sequence=2", "tensor=2"}, out
    for mesh, r in results.items():
        assert "error" not in r and r["loss"] > 0, (mesh, r)
    assert results["data=2,sequence=2"]["attention"] == "ring"
    assert results["data=2,sequence=2"]["global_rows"] == 2 * results["1"]["global_rows"]
    # tensor=2 trains the same rows as one device: the same loss up to float reordering
    assert results["tensor=2"]["loss"] == pytest.approx(results["1"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_train_throughput_compiles_a_mesh_ahead_of_time():
    out = run("benchmarks/train_throughput.py", "--tiny", "--aot", "--sides", "jaxtune", "--cases", "8b-full",
              "--attention", "pallas", "--meshes", "fsdp=4")
    (result,) = worker_results(out).values()
    assert result["aot"] and result["devices"] == 4 and result["peak_estimate_gib"] > 0, result
    assert result["collectives"].get("all-gather", 0) > 0  # fsdp gathers each layer's params


def test_kernel_energy_runs_every_kernel_without_nvml():
    # The CPU has no NVML: every kernel still runs and is timed, the energy columns say "-".
    out = run("benchmarks/kernel_energy.py", "--tiny", "--seconds", "0.05", "--warmup", "0")
    # The gate/up and RMSNorm rows run our kernels in interpret mode; jax's Mosaic matmul runs compiled only.
    lines = out.splitlines()
    measured = [line for line in lines if line.startswith(("| GEMM", "| elementwise", "| our", "| gate/up", "| RMSNorm"))
                and "not run" not in line]
    assert len(measured) == 17 and all(row.endswith("| - | - | - |") for row in measured), out
    assert len([line for line in lines if "not run: cuDNN needs a GPU" in line]) == 2, out
    assert len([line for line in lines if "not run: jax's Mosaic matmul runs compiled only" in line]) == 4, out
    assert any(line.startswith("check: gate/up kernel vs XLA's form, max |difference|") for line in lines), out


@pytest.mark.slow
def test_ring_devices_checks_and_times_the_ring():
    out = run("benchmarks/ring_devices.py", "--tiny", "--devices", "2")
    assert "check: ring vs one-device flash" in out
    assert len([line for line in out.splitlines() if line.startswith("| 128 |")]) == 1


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_impl_overrides_and_profile_kinds():
    # `--impls ours:field=value:...` times BlockSizes variants side by side in one GPU call;
    # the profile summary sums kernels by kind (matmul, attention, elementwise, ...).
    from jaxtune.kernels.flash_attention import BlockSizes

    attention = _load("attention")
    base, blocks = attention._with_overrides("ours:num_warps_dkv=8:dkv_per_query_head=0:forward=mosaic",
                                             BlockSizes())
    assert base == "ours"
    assert (blocks.num_warps_dkv, blocks.dkv_per_query_head, blocks.forward) == (8, False, "mosaic")
    with pytest.raises(SystemExit, match="not a BlockSizes field"):
        attention._with_overrides("ours:warps=8", BlockSizes())
    kinds = _load("profile_summary").category
    assert kinds("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT").startswith("matmul")
    assert kinds("gemm_fusion_dot_1101").startswith("matmul")
    assert kinds("jaxtune_flash_bwd_dkv") == "attention kernels"
    assert kinds("input_reduce_fusion_1").startswith("reductions")
    assert kinds("loop_convert_fusion_16").startswith("elementwise")
    assert kinds("memcpy128") == "copies and slices"


def test_profile_time_by_operation_from_the_hlo():
    # Kernels that name their HLO instruction are summed by what it computes (shape, JAX op).
    summary = _load("profile_summary")
    hlo = ('  %custom-call.36 = (bf16[8192,8192]{1,0}, s8[0]{0}) custom-call(%a, %b), '
           'metadata={op_name="jit(train_step)/while/body/eval_jaxpr/jvp(btd,df->btf)/dot_general"}\n'
           '  ROOT %fusion.2 = f32[4,2048]{1,0} fusion(%c), kind=kInput, '
           'metadata={op_name="jit(train_step)/reduce_sum"}\n')
    events = [dict(name="nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", dur=360.0, args=dict(hlo_op="custom-call.36")),
              dict(name="nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", dur=364.0, args=dict(hlo_op="custom-call.36")),
              dict(name="input_reduce_fusion_2", dur=30.0, args=dict(hlo_op="fusion.2")),
              dict(name="command_buffer", dur=5.0, args={})]
    rows = summary.by_operation(events, hlo, steps=2, top=5).splitlines()[2:]
    assert rows[0] == ("| 0.36 | 1 | 362.0 | `nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT` | `bf16[8192,8192]` "
                       "| `jvp(btd,df->btf)/dot_general` |")
    assert rows[1].endswith("| `input_reduce_fusion` | `f32[4,2048]` | `reduce_sum` |") and len(rows) == 2


def test_profile_idle_time_between_kernels():
    # Busy time is the union over streams; a gap counts only when no stream runs anything.
    summary = _load("profile_summary")
    events = [dict(name="fusion.1", ts=0.0, dur=10.0), dict(name="gemm.2", ts=5.0, dur=10.0),  # overlap: busy 0-15
              dict(name="loop_add_fusion.3", ts=40.0, dur=10.0),  # gap of 25 after gemm
              dict(name="fusion.4", ts=52.0, dur=8.0),  # gap of 2 after loop_add_fusion
              dict(name="gemm.5", ts=85.0, dur=15.0)]  # gap of 25 after fusion
    text = summary.idle_time(events, steps=2).splitlines()
    assert text[0] == "trace span 0.05 ms per step, kernels busy 0.02, idle 0.03 (52.0%)"
    assert text[3] == "| 0.013 | 0 | 25.0 | `gemm` | `loop_add_fusion` |"
    assert "| 0.001 | 0 | 2.0 | `loop_add_fusion` | `fusion` |" in text


class _FakeNvmlLib:
    """libnvidia-ml's calls as gpu_power makes them (ctypes out-parameters), on scripted values.
    Only the pre-535 name of the clock-reasons query, as older drivers have."""

    def __init__(self, energies, clocks, reasons):
        self.energies, self.clocks, self.reasons = iter(energies), iter(clocks), iter(reasons)

    def nvmlInit_v2(self):
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, device):
        return 0

    def nvmlDeviceGetTotalEnergyConsumption(self, device, out):
        out._obj.value = next(self.energies)
        return 0

    def nvmlDeviceGetClockInfo(self, device, clock_type, out):
        assert clock_type == 1  # NVML_CLOCK_SM
        out._obj.value = next(self.clocks)
        return 0

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, device, out):
        out._obj.value = next(self.reasons)
        return 0


def test_power_meter_reports_energy_per_token_clock_and_capping():
    # Energy is the counter's difference over the block (mJ); clock and throttle reasons are the
    # samples' mean and shares. Two samples here (entry and exit; the thread's interval is long).
    power = _load("gpu_power")
    lib = _FakeNvmlLib(energies=[10_000, 10_000 + 6_400], clocks=[1500, 1700], reasons=[0x4, 0x0])
    times = iter([100.0, 100.01])
    with power.PowerMeter(nvml=power.Nvml(lib), interval=60.0, clock=lambda: next(times)) as meter:
        pass
    r = meter.result(steps=4, tokens=8192)
    assert r["joules_per_step"] == pytest.approx(1.6) and r["mj_per_token"] == pytest.approx(6400 / 8192)
    assert r["avg_power_w"] == pytest.approx(640.0) and r["sm_clock_mhz"] == 1600
    assert r["power_capped"] == 0.5 and r["thermal_throttled"] == 0.0


def test_power_meter_measures_nothing_without_nvml(monkeypatch):
    import ctypes

    power = _load("gpu_power")

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert power.Nvml.load() is None
    with power.PowerMeter() as meter:
        pass
    assert meter.result(steps=1, tokens=1) == {}

"""The GPU's energy, power and SM clock over a timed loop, read from NVML.

Why the benchmarks report it: on an H200 the 1B LoRA step of jaxtune runs at the board's 700 W
limit, and the driver holds the SM clock near 1.6 GHz of its 1.98 to stay there (throttle reason
"software power cap"), while the PyTorch step of the same case runs near 1.95 GHz. Past that
point a step's time follows the energy its kernels use, not only their speed at full clock, and
machines of one kind differ by a few percent in how far they throttle. Energy per token (mJ) and
the clock put both in the table, next to tokens/s.

NVML is loaded with ctypes (libnvidia-ml ships with the driver; no Python package needed). Where it
is missing (CPU runs, other vendors) `PowerMeter` measures nothing and `result` is empty.
"""

from __future__ import annotations

import ctypes
import threading
import time

# nvmlClocksEventReasons bits (nvml.h): the ones that lower the clock below what the load asks for.
POWER_CAP = 0x4 | 0x80  # software power cap, hardware power brake
THERMAL = 0x20 | 0x40  # software and hardware thermal slowdown
_NVML_CLOCK_SM = 1


class Nvml:
    """Device 0 through libnvidia-ml: energy since the driver loaded (mJ), SM clock (MHz), the
    active clock-event reasons (bit mask)."""

    def __init__(self, lib=None):
        self._lib = lib or ctypes.CDLL("libnvidia-ml.so.1")
        if self._lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self._device = ctypes.c_void_p()
        if self._lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self._device)) != 0:
            raise OSError("no NVML device 0")
        # The reasons' query was renamed from "throttle" to "event" reasons (driver 535); either works.
        self._reasons_fn = next(fn for fn in ("nvmlDeviceGetCurrentClocksEventReasons",
                                              "nvmlDeviceGetCurrentClocksThrottleReasons") if hasattr(self._lib, fn))

    @classmethod
    def load(cls) -> "Nvml | None":
        try:
            return cls()
        except (OSError, AttributeError, StopIteration):
            return None

    def _query(self, fn: str, ctype, *args):
        value = ctype()
        if getattr(self._lib, fn)(self._device, *args, ctypes.byref(value)) != 0:
            raise OSError(f"{fn} failed")
        return value.value

    def energy_mj(self) -> int:
        return self._query("nvmlDeviceGetTotalEnergyConsumption", ctypes.c_ulonglong)

    def sm_clock_mhz(self) -> int:
        return self._query("nvmlDeviceGetClockInfo", ctypes.c_uint, _NVML_CLOCK_SM)

    def clock_event_reasons(self) -> int:
        return self._query(self._reasons_fn, ctypes.c_ulonglong)


class PowerMeter:
    """`with PowerMeter() as meter: <timed loop>`, then `meter.result(steps, tokens)`.

    Energy is the difference of NVML's counter across the block; the clock and the throttle
    reasons are sampled every `interval` seconds by a thread (the loop's own thread only waits on
    the GPU, so sampling costs it nothing)."""

    def __init__(self, nvml: "Nvml | None | bool" = True, interval: float = 0.02, clock=time.perf_counter):
        self._nvml = Nvml.load() if nvml is True else (nvml or None)
        self._interval = interval
        self._clock = clock
        self._samples: list[tuple[int, int]] = []  # (SM MHz, reasons)
        self._stop = threading.Event()

    def _sample(self) -> None:
        self._samples.append((self._nvml.sm_clock_mhz(), self._nvml.clock_event_reasons()))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> "PowerMeter":
        if self._nvml:
            self._energy0, self._t0 = self._nvml.energy_mj(), self._clock()
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._nvml:
            self._stop.set()
            self._thread.join()
            self._sample()
            self._energy1, self._t1 = self._nvml.energy_mj(), self._clock()

    def result(self, steps: int, tokens: int | None = None) -> dict:
        """Joules per step (per call, for a kernel loop), mJ per token when given tokens, average
        watts, mean SM clock and the share of samples the driver held the clock down for power or
        heat; {} without NVML."""
        if not self._nvml:
            return {}
        joules = (self._energy1 - self._energy0) / 1000
        clocks = [c for c, _ in self._samples]
        share = lambda bits: sum(1 for _, r in self._samples if r & bits) / len(self._samples)
        per_token = {} if tokens is None else dict(mj_per_token=1000 * joules / tokens)
        return dict(joules_per_step=joules / steps, **per_token,
                    avg_power_w=joules / (self._t1 - self._t0), sm_clock_mhz=sum(clocks) / len(clocks),
                    power_capped=share(POWER_CAP), thermal_throttled=share(THERMAL))

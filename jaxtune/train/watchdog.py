"""Stops a run whose loss is not finite, or stays above a threshold, before it saves bad weights."""

from __future__ import annotations

import math


class TrainingStopped(Exception):
    """The loss watchdog stopped the run; the message says why."""


class LossWatchdog:
    """`check(step, loss)` raises TrainingStopped on a non-finite loss, or when the loss has been
    above `threshold` for `patience` consecutive checks (Axolotl's loss_watchdog_* keys)."""

    def __init__(self, threshold: float | None, patience: int):
        self.threshold = threshold
        self.patience = max(1, patience)
        self.strikes = 0
        self._settled: tuple[int, float] | None = None

    def settle(self, step: int, metrics: dict) -> float:
        """Fetch step `step`'s loss from the device and check it, once per step (later calls for
        the same step return the same loss without counting it again)."""
        if self._settled is None or self._settled[0] != step:
            loss = float(metrics["loss"])
            self.check(step, loss)
            self._settled = (step, loss)
        return self._settled[1]

    def check(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingStopped(f"step {step}: loss is {loss}.")
        if self.threshold is None:
            return
        self.strikes = self.strikes + 1 if loss > self.threshold else 0
        if self.strikes >= self.patience:
            raise TrainingStopped(
                f"step {step}: loss {loss:.4f} has been above loss_watchdog_threshold {self.threshold} "
                f"for {self.strikes} steps (loss_watchdog_patience {self.patience}).")

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

"""What the user sees during a run: a progress bar or plain lines, `metrics.jsonl`, optional
TensorBoard / Weights & Biases, and the end-of-run summary. Only process 0 reports.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

import jax
from tqdm import tqdm


class Reporter:
    """Receives per-step metrics; writes them where the config says."""

    def __init__(self, output_dir: str, total_steps: int, *, start_step: int = 0, use_tensorboard: bool = False,
                 wandb_project: str | None = None, wandb_kwargs: dict | None = None, run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.start_time = time.perf_counter()
        self.last = {}
        self.eval_last = {}
        self._tb = self._wandb = self._bar = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.metrics_path, "a")
        if sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if use_tensorboard:
            self._tb = _tensorboard_writer(os.path.join(output_dir, "tensorboard"))
        if wandb_project:
            self._wandb = _wandb_run(wandb_project, wandb_kwargs or {}, run_config or {})

    def log(self, row: dict) -> None:
        """One logged step: `step`, `loss`, `lr`, `grad_norm`, `tokens_per_second`, ... (or eval_*)."""
        if not self.enabled:
            return
        row = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in row.items()}
        if any(k.startswith("eval_") for k in row):
            self.eval_last = row
        else:
            self.last = row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._bar is not None:
            if "loss" in row:
                self._bar.n = row["step"]
                self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                      tok_s=f"{row.get('tokens_per_second', 0):,.0f}")
                self._bar.refresh()
            else:
                self._bar.write(_line(row))
        else:
            print(_line(row), flush=True)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, row["step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _line(row: dict) -> str:
    parts = [f"step {row['step']}"]
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}" if abs(v) < 1e4 else f"{k} {v:,.0f}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


def _tensorboard_writer(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard's writer without TensorFlow
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn("use_tensorboard: neither tensorboardX nor torch's tensorboard writer is installed "
                          "(pip install tensorboardX); TensorBoard logging is off", stacklevel=3)
            return None
    return SummaryWriter(logdir)


def _wandb_run(project: str, kwargs: dict, config: dict):
    try:
        import wandb
    except ImportError:
        warnings.warn(f"wandb_project={project!r} is set but wandb is not installed (pip install wandb); "
                      "Weights & Biases logging is off", stacklevel=3)
        return None
    return wandb.init(project=project, config=config, **{k: v for k, v in kwargs.items() if v is not None})


def summary(*, steps: int, tokens: int, seconds: float, final_loss: float | None, eval_loss: float | None,
            outputs: dict[str, str], flops_per_token: float | None = None) -> str:
    """The end-of-run summary: steps, tokens, speed, MFU on GPU, losses, where outputs went."""
    tps = tokens / seconds if seconds > 0 else 0.0
    lines = ["", "── run summary " + "─" * 45,
             f"steps             {steps:,}",
             f"tokens trained    {tokens:,}",
             f"time              {seconds:,.1f} s",
             f"tokens/s          {tps:,.0f}"]
    peak = _peak_flops()
    if flops_per_token and peak:
        mfu = tps * flops_per_token / (peak * jax.device_count())
        lines.append(f"MFU (est.)        {100 * mfu:.1f}%")
    if final_loss is not None and math.isfinite(final_loss):
        lines.append(f"final train loss  {final_loss:.4f}")
    if eval_loss is not None:
        lines.append(f"final eval loss   {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f})")
    for name, path in outputs.items():
        lines.append(f"{name:<17} {path}")
    return "\n".join(lines)


def _peak_flops() -> float | None:
    """Dense bf16 peak of the local accelerator, for MFU; None on CPU or unknown chips."""
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12)):
        if name in kind:
            return peak
    return None

"""Optimizers and learning-rate schedules through optax, under Axolotl's names.

Weight decay is masked off norms and biases (as HF Trainer does: no decay for LayerNorm/RMSNorm
weights and biases). Gradient clipping by global norm comes first in the chain, so the reported
grad norm is the one clipped.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxtune.errors import ConfigError

# Update rules; the config maps Axolotl's optimizer names onto these (jaxtune.config.schema.OPTIMIZERS).
OPTIMIZERS = ("adamw", "sgd", "adafactor", "lion")
# As HF's schedulers: "constant" ignores warmup, "constant_with_warmup" does not.
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    name: str = "adamw"  # one of OPTIMIZERS
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    cosine_min_lr_ratio: float | None = None


def make_schedule(s: OptimizerSettings, total_steps: int) -> optax.Schedule:
    """Warm up linearly from 0 over `warmup_steps`, then decay as HF's schedulers do."""
    if s.schedule not in SCHEDULES:
        raise ConfigError(f"lr_scheduler {s.schedule!r} is not supported; supported: {', '.join(SCHEDULES)}")
    warmup = 0 if s.schedule == "constant" else min(s.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if s.schedule == "cosine":
        end = s.learning_rate * (s.cosine_min_lr_ratio or 0.0)
        decay = optax.cosine_decay_schedule(s.learning_rate, decay_steps, alpha=end / s.learning_rate
                                            if s.learning_rate else 0.0)
    elif s.schedule == "linear":
        decay = optax.linear_schedule(s.learning_rate, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(s.learning_rate)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, s.learning_rate, warmup), decay], [warmup])


def decay_mask(params) -> object:
    """True for leaves weight decay applies to: not norm scales, not biases."""
    def decays(path, _):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return not any(n in ("scale", "bias") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(s: OptimizerSettings, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clip → optimizer) and its schedule, for the trainable params."""
    schedule = make_schedule(s, total_steps)
    name = s.name
    if name == "adamw":
        opt = optax.adamw(schedule, b1=s.beta1, b2=s.beta2, eps=s.epsilon, weight_decay=s.weight_decay,
                          mask=decay_mask)
    elif name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(s.weight_decay, mask=decay_mask), optax.sgd(schedule))
    elif name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=s.weight_decay or None, weight_decay_mask=decay_mask)
    elif name == "lion":
        opt = optax.lion(schedule, b1=s.beta1, b2=s.beta2, weight_decay=s.weight_decay, mask=decay_mask)
    else:
        raise ConfigError(f"optimizer {s.name!r} is not supported; supported: {', '.join(OPTIMIZERS)}")
    if s.max_grad_norm:
        opt = optax.chain(optax.clip_by_global_norm(s.max_grad_norm), opt)
    return opt, schedule

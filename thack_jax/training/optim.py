"""Optimizers and learning-rate schedules (optax).

`make_schedule` builds "linear warmup, then `schedule`"; `make_optimizer(OptimizerConfig(...))`
chains optional global-norm clipping, the optimizer and optional decoupled weight decay. Pass
the same schedule to the trainer (`learning_rate_fn=`) so it can log `train/learning_rate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import optax

from thack_jax.core import checks

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("constant", "cosine", "rsqrt")

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def make_schedule(
    learning_rate: float,
    warmup_steps: int = 0,
    schedule: str = "constant",
    total_steps: int | None = None,
    end_fraction: float = 0.0,
) -> Schedule:
    """Learning rate as a function of the step count (the number of updates done so far).

    Linear warmup from 0 to `learning_rate` over `warmup_steps` (step 0 already gets
    `learning_rate / warmup_steps`, so no update is wasted), then:
      - 'constant': `learning_rate`;
      - 'cosine': cosine decay to `end_fraction * learning_rate` at `total_steps`;
      - 'rsqrt': `learning_rate * sqrt(max(warmup_steps, 1) / step)` (T5's inverse square
        root decay, continuous at the end of warmup).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule == "cosine":
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(
                f"schedule='cosine' needs total_steps > warmup_steps; got total_steps="
                f"{total_steps}, warmup_steps={warmup_steps}"
            )
    peak = float(learning_rate)

    def after_warmup(step):
        step = jnp.asarray(step, jnp.float32)
        if schedule == "constant":
            return jnp.full_like(step, peak)
        if schedule == "rsqrt":
            return peak * jnp.sqrt(max(warmup_steps, 1) / jnp.maximum(step + 1.0, 1.0))
        decay = max(total_steps - warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay, 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return peak * (end_fraction + (1.0 - end_fraction) * cosine)

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps == 0:
            return after_warmup(step)
        warm = peak * jnp.minimum((step + 1.0) / warmup_steps, 1.0)
        return jnp.where(step < warmup_steps, warm, after_warmup(step))

    return lr


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What `make_optimizer` builds: one frozen value, checked when it is made. `name` and
    `learning_rate` may be positional, the rest are keyword-only:
    `OptimizerConfig("adamw", 3e-4, clip_norm=1.0)`.

    name: 'adafactor' (T5's optimizer: factored second moments for matrices with both
      dims >= `min_dim_size_to_factor`, `decay_rate` 0.8, update clipping at
      `clipping_threshold`, step size relative to the parameter scale when
      `multiply_by_parameter_scale`, no `momentum` by default) or 'adamw'.
    learning_rate: the peak learning rate (a float, combined with `warmup_steps`,
      `schedule`, `total_steps` by `make_schedule`) or a ready schedule callable (then
      those three keep their defaults).
    weight_decay: decoupled weight decay. AdamW scales it by the learning rate; Adafactor
      (optax's `weight_decay_rate`) adds `weight_decay * param` to the update unscaled.
    clip_norm: clip gradients to this global norm before the update (None: no clipping).
    b1, b2, eps: AdamW's moments and epsilon (ignored by Adafactor).
    decay_rate, min_dim_size_to_factor, multiply_by_parameter_scale, clipping_threshold,
      momentum: Adafactor's (ignored by AdamW).
    """

    name: str = "adafactor"
    learning_rate: float | Schedule = 1e-3
    _: dataclasses.KW_ONLY  # the rest by keyword only
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int | None = None
    weight_decay: float = 0.0
    clip_norm: float | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    decay_rate: float = 0.8
    min_dim_size_to_factor: int = 128
    multiply_by_parameter_scale: bool = True
    clipping_threshold: float | None = 1.0
    momentum: float | None = None

    def __post_init__(self):
        checks.choice(self, "name", OPTIMIZERS)
        if callable(self.learning_rate):
            if (self.warmup_steps, self.schedule, self.total_steps) != (0, "constant", None):
                raise ValueError(
                    "learning_rate is a schedule callable; do not also pass warmup_steps, "
                    "schedule or total_steps"
                )
        else:
            # Fails early, naming the field (the same checks `make_schedule` makes).
            make_schedule(self.learning_rate, self.warmup_steps, self.schedule, self.total_steps)
        checks.number(self, "weight_decay", 0)
        checks.optional(checks.positive, self, "clip_norm")
        checks.integer(self, "min_dim_size_to_factor", 1)

    def schedule_fn(self) -> Schedule:
        """The learning rate as a function of the step (the callable, or `make_schedule`)."""
        if callable(self.learning_rate):
            return self.learning_rate
        return make_schedule(self.learning_rate, self.warmup_steps, self.schedule, self.total_steps)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """An optax optimizer with warmup + schedule, optional clipping and weight decay
    (`OptimizerConfig` says which)."""
    if not isinstance(config, OptimizerConfig):
        raise TypeError(f"make_optimizer takes an OptimizerConfig, got {type(config).__name__}")
    c, lr = config, config.schedule_fn()
    if c.name == "adamw":
        core = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    else:
        core = optax.adafactor(
            lr,
            min_dim_size_to_factor=c.min_dim_size_to_factor,
            decay_rate=c.decay_rate,
            multiply_by_parameter_scale=c.multiply_by_parameter_scale,
            clipping_threshold=c.clipping_threshold,
            momentum=c.momentum,
            weight_decay_rate=c.weight_decay or None,
            factored=True,
        )
    if c.clip_norm is None:
        return core
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), core)

"""The arguments of `trainer.train`, grouped: the loop's schedule (`LoopConfig`), what is
trained (`Student`), the frozen teacher (`Teacher`) and the callbacks (`Hooks`).

All are frozen dataclasses validated on construction, so a bad value fails where it is
written, with the field named, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import optax

from thack_jax.core import checks
from thack_jax.models.config import T5Config
from thack_jax.models.decoder_config import DecoderConfig
from thack_jax.training.train_step import StepConfig

MODEL_CONFIGS = (T5Config, DecoderConfig)  # the families models.api runs


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """When the loop stops, logs, evaluates and saves.

    num_steps: updates to reach (a resumed run does the rest). checkpoint_every: save every
    this many steps (and at the end / on a stop), keeping the newest `keep_checkpoints`.
    log_every: a metrics line every this many steps (0: only at evaluations and the end).
    Evaluations (`Hooks.eval_fn`) run at step 0, every `eval_every` steps (0: never), at
    each step of `eval_steps` (steps past the end are ignored) and at the final step.
    progress: print a progress line (process 0 only). seed: the train state's RNG key.
    """

    num_steps: int
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    eval_every: int = 0
    eval_steps: Collection[int] = frozenset()
    progress: bool = True
    seed: int = 0

    def __post_init__(self):
        checks.integer(self, "num_steps", 0)
        checks.integer(self, "checkpoint_every", 1)
        checks.integer(self, "keep_checkpoints", 1)
        checks.integer(self, "log_every", 0)
        checks.integer(self, "eval_every", 0)
        checks.integer(self, "seed")
        checks.instance(self, "progress", bool)
        if isinstance(self.eval_steps, str | bytes) or not isinstance(self.eval_steps, Collection):
            raise checks.FieldTypeError(
                f"{checks.where(self, 'eval_steps')} must be a collection of steps"
            )
        for step in self.eval_steps:
            checks.integer(self, "eval_steps[...]", 0, value=step)
        # Frozen: the normalised value is set through object.__setattr__.
        object.__setattr__(self, "eval_steps", frozenset(int(s) for s in self.eval_steps))

    def evaluates_at(self, step: int) -> bool:
        """Whether an evaluation runs after update `step` (>= 1; step 0 always has one)."""
        return (
            step == self.num_steps
            or step in self.eval_steps
            or (self.eval_every > 0 and step % self.eval_every == 0)
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Student:
    """What is trained: the model config, its initial parameters (used when there is no
    checkpoint to resume from; a tree of `models.param_shapes(config)`'s shapes and dtypes),
    the optimizer, the step's objective/loss, and the optimizer's schedule (only to log
    'train/learning_rate'; None: not logged)."""

    config: T5Config | DecoderConfig
    init_params: Any
    optimizer: optax.GradientTransformation
    step_config: StepConfig
    learning_rate_fn: Callable | None = None

    def __post_init__(self):
        checks.instance(self, "config", MODEL_CONFIGS)
        checks.instance(self, "step_config", StepConfig)
        if self.init_params is None:
            raise ValueError("Student.init_params is None; pass the initial parameter tree")
        if not (
            callable(getattr(self.optimizer, "init", None))
            and callable(getattr(self.optimizer, "update", None))
        ):
            raise TypeError(
                f"Student.optimizer must be an optax.GradientTransformation, got "
                f"{type(self.optimizer).__name__}"
            )
        if self.learning_rate_fn is not None and not callable(self.learning_rate_fn):
            raise TypeError(
                f"Student.learning_rate_fn must be callable or None, got {self.learning_rate_fn!r}"
            )


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
    """The frozen teacher of distillation: its config and parameters (a tree of
    `models.param_shapes(config)`'s shapes and dtypes)."""

    config: T5Config | DecoderConfig
    params: Any

    def __post_init__(self):
        checks.instance(self, "config", MODEL_CONFIGS)
        if self.params is None:
            raise ValueError("Teacher.params is None; pass the teacher's parameter tree")


@dataclasses.dataclass(frozen=True, eq=False)
class Hooks:
    """Callbacks of the loop.

    eval_fn(step, params) -> {name: float}: the evaluation (see `LoopConfig`); its metrics
    join that step's line. stop: hooks `(step, metrics) -> bool` called (all of them) after
    each evaluation with that step's metrics; any True stops the run (checkpointed).
    """

    eval_fn: Callable[[int, Any], Mapping[str, float]] | None = None
    stop: Sequence[Callable[[int, Mapping[str, float]], bool]] = ()

    def __post_init__(self):
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise TypeError(f"Hooks.eval_fn must be callable or None, got {self.eval_fn!r}")
        stop = tuple(self.stop)
        for i, hook in enumerate(stop):
            if not callable(hook):
                raise TypeError(f"Hooks.stop[{i}] must be callable, got {hook!r}")
        if stop and self.eval_fn is None:
            # Stop hooks run after evaluations only: without one they would never run.
            raise ValueError(
                "Hooks.stop is given but Hooks.eval_fn is None; stop hooks run "
                "after evaluations, so they would never be called"
            )
        object.__setattr__(self, "stop", stop)

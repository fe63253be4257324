"""Configuration of the teacher-hacking experiment (plain dataclasses; gin binds them).

Kept apart from experiment.py so that gin files, tests and tools can build and compare
configurations without importing the stage machinery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from thack_jax.models.config import T5Config, get_config

ROLES = ("oracle", "teacher", "student")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which network a role uses.

    size: a named size of models.get_config ('tiny', 'small', ..., 'xl').
    overrides: T5Config fields to change, e.g. {'d_model': 64, 'vocab_size': 64}.
    checkpoint: optional HF (config.json + safetensors) or T5X directory to load instead of
      a random initialisation (`checkpoint_format` 'hf' or 't5x').
    init_seed: seed of the random initialisation when there is no checkpoint.
    """

    size: str = "tiny"
    overrides: tuple = ()
    checkpoint: str | None = None
    checkpoint_format: str = "hf"
    init_seed: int = 0

    def __post_init__(self):
        if isinstance(self.overrides, dict):
            object.__setattr__(self, "overrides", tuple(sorted(self.overrides.items())))
        if self.checkpoint_format not in ("hf", "t5x"):
            raise ValueError(f"checkpoint_format={self.checkpoint_format!r}; use 'hf' or 't5x'")

    def t5_config(self, **extra) -> T5Config:
        return get_config(self.size, **{**dict(self.overrides), **extra})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage (SFT or distillation)."""

    num_steps: int = 100
    batch_size: int = 32
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "constant"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    loss: str = "forward_kl"
    temperature: float = 1.0
    num_microbatches: int = 1
    checkpoint_every: int = 500
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One distillation run: a regime and its data budget.

    regime: 'offline' | 'online_teacher' | 'online_student' | 'mixed'.
    num_prompts x completions_per_prompt: the offline set (offline and mixed).
    online_fraction / online_role: the mixture (mixed only).
    """

    name: str = "offline"
    regime: str = "offline"
    num_prompts: int = 256
    completions_per_prompt: int = 1
    online_fraction: float = 0.0
    online_role: str = "student"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of every distillation run (evaluation.Evaluator) and its schedule.

    The run is evaluated at step 0, at the final step, at every multiple of `every` (0: none)
    and at `log_points` steps spaced evenly in log(step) from `log_start` to the final step
    (0: none). The power-law detector (docs/diagnostics.md) needs evaluations spread evenly
    in log(step), dense early, where fixed-interval evaluations are sparse.
    """

    num_prompts: int = 128
    num_samples: int = 4
    every: int = 100
    log_points: int = 0
    log_start: int = 1
    batch_size: int = 64
    seed: int = 1234
    estimator: str = "rao_blackwell"

    def __post_init__(self):
        if self.every < 0 or self.log_points < 0 or self.log_start < 1:
            raise ValueError(
                f"EvalConfig needs every >= 0, log_points >= 0 and log_start >= 1; got "
                f"every={self.every}, log_points={self.log_points}, log_start={self.log_start}"
            )

    def steps(self, num_steps: int) -> tuple[int, ...]:
        """The sorted evaluation steps of a run of `num_steps` updates (0 and num_steps
        included). Log-spaced points that round to the same step are merged, so there may
        be fewer than `log_points` of them on a short run."""
        steps = {0, num_steps}
        if self.every > 0:
            steps.update(range(self.every, num_steps + 1, self.every))
        if self.log_points > 0 and num_steps >= self.log_start:
            grid = np.geomspace(self.log_start, num_steps, self.log_points)
            steps.update(int(s) for s in np.rint(grid))
        return tuple(sorted(s for s in steps if 0 <= s <= num_steps))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole study: three models, the task, the stages and the distillation runs.

    oracle_logit_scale multiplies a randomly initialised oracle's output layer, which sets
    the sharpness (per-token entropy) of the ground-truth distribution; 1.0 for a loaded
    checkpoint. teacher_logit_scale multiplies the SFT teacher's output layer (> 1: an
    over-confident teacher), a controlled, prompt-independent systematic error of the
    teacher (docs/experiment.md); 1.0 leaves the SFT teacher as trained.
    """

    name: str = "default"
    task: str = "synthetic"
    task_options: tuple = ()
    max_input_length: int = 16
    max_target_length: int = 12
    oracle: ModelSpec = ModelSpec()
    teacher: ModelSpec = ModelSpec(init_seed=1)
    student: ModelSpec = ModelSpec(init_seed=2)
    oracle_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    oracle_data_prompts: int = 4096
    teacher_sft: TrainConfig = TrainConfig()
    student_sft: TrainConfig = TrainConfig()
    student_sft_examples: int = 0
    teacher_sft_examples: int = 0
    distill: TrainConfig = TrainConfig()
    distill_prompt_pool: int = 20000
    runs: tuple = (RunConfig(),)
    evaluation: EvalConfig = EvalConfig()
    guard_mode: str = "log"
    mesh_shape: tuple = (("data", -1),)
    seed: int = 0

    def __post_init__(self):
        for field in ("task_options", "mesh_shape"):
            value = getattr(self, field)
            if isinstance(value, dict):
                object.__setattr__(self, field, tuple(sorted(value.items())))
        object.__setattr__(self, "runs", tuple(self.runs))
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(f"ExperimentConfig.runs has duplicate names: {names}")

    def model_config(self, role: str) -> T5Config:
        spec = getattr(self, role)
        return spec.t5_config(
            max_input_length=max(self.max_input_length, spec.t5_config().max_input_length),
            max_target_length=max(self.max_target_length, spec.t5_config().max_target_length),
        )


def to_json(value: Any) -> Any:
    """Dataclasses/tuples -> JSON-compatible nested structure."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def fingerprint(value: Any) -> str:
    """Stable short hash of a config section."""
    blob = json.dumps(to_json(value), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff(stored: Any, requested: Any, prefix: str = "") -> list[str]:
    """Human-readable list of the fields that differ between two JSON structures."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(stored) | set(requested)):
            out += diff(stored.get(key), requested.get(key), f"{prefix}{key}.")
        return out
    if stored != requested:
        return [f"{prefix.rstrip('.')}: stored {stored!r}, requested {requested!r}"]
    return []

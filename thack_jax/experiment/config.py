"""Configuration of the teacher-hacking experiment (plain dataclasses; gin binds them).

Kept apart from runner.py so that gin files, tests and tools can build and compare
configurations without importing the stage machinery, or jax: this module imports only
numpy, core/checks.py and the light name modules of data/ (tests/experiment/test_config.py
checks it).

Every dataclass checks its fields in `__post_init__`, so a bad value is refused when the
configuration is built (by gin, before any stage runs), with a message naming the
dataclass, the field, the value and what is allowed, e.g.
`RunConfig.online_fraction=1.5 must be a number in [0, 1]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from thack_jax.core import checks
from thack_jax.data.regime_names import ROLES, SAMPLER_ROLES, Regime, check_role
from thack_jax.data.tasks import TASK_NAMES
from thack_jax.parallel.mesh_names import DEFAULT_MESH_SHAPE

if TYPE_CHECKING:
    from thack_jax.models.config import T5Config

# Names accepted by modules that import jax (or scipy), mirrored here so that building a
# configuration imports neither; tests/experiment/test_config.py asserts that each tuple
# equals its source, so they cannot drift apart.
MODEL_SIZES = (  # models/config.py NAMED_CONFIGS
    "tiny",
    "small",
    "base",
    "large",
    "xl",
    "xxl",
    "t5_1_0_small",
    "t5_1_0_base",
)
DECODER_SIZES = (  # models/decoder_config.py DECODER_CONFIGS (the decoder-only family)
    "llama-tiny",
    "qwen2-tiny",
    "smollm2-135m",
    "qwen2.5-0.5b",
    "llama-3.2-1b",
)
OPTIMIZER_NAMES = ("adafactor", "adamw")  # training/optim.py OPTIMIZERS
SCHEDULE_NAMES = ("constant", "cosine", "rsqrt")  # training/optim.py SCHEDULES
LOSS_NAMES = ("forward_kl", "reverse_kl", "jsd", "tv", "skew_kl", "skew_reverse_kl")  # LOSSES
ESTIMATOR_NAMES = ("rao_blackwell", "plain")  # evaluation/evaluator.py ESTIMATORS
GUARD_MODES = ("log", "warn", "stop")  # hacking/guard.py MODES
# 'oracle': the controlled study (oracle -> oracle data -> teacher / student SFT -> distil),
# golden metrics against the oracle. 'field': no oracle; a given (or reference-trained)
# teacher, the task's human references for SFT and for the reference metric.
MODES = ("oracle", "field")

# A run's name is the directory runs/<name>/: one path component, no separators.
_RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ExperimentMismatchError(ValueError):
    """The workdir holds stages of an experiment with another configuration."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which network a role uses.

    size: a named size of models.get_config: T5 ('tiny', 'small', ..., 'xl') or
      decoder-only ('llama-tiny', 'qwen2-tiny', 'smollm2-135m', 'qwen2.5-0.5b',
      'llama-3.2-1b'); the size selects the family.
    overrides: config fields to change, e.g. {'d_model': 64, 'vocab_size': 64}.
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
        checks.choice(self, "size", MODEL_SIZES + DECODER_SIZES)
        checks.choice(self, "checkpoint_format", ("hf", "t5x"))
        checks.integer(self, "init_seed", 0)

    def t5_config(self, **extra) -> T5Config:
        """The role's model config (a T5Config, or a DecoderConfig for a decoder size)."""
        # Imported here: thack_jax.models imports jax, which building a config must not.
        from thack_jax.models.config import get_config

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

    def __post_init__(self):
        checks.integer(self, "num_steps", 0)
        checks.integer(self, "batch_size", 1)
        checks.positive(self, "learning_rate")
        checks.integer(self, "warmup_steps", 0)
        checks.choice(self, "schedule", SCHEDULE_NAMES)
        checks.choice(self, "optimizer", OPTIMIZER_NAMES)
        checks.number(self, "weight_decay", 0)
        checks.optional(checks.positive, self, "clip_norm")
        checks.choice(self, "loss", LOSS_NAMES)
        checks.positive(self, "temperature")
        checks.integer(self, "num_microbatches", 1)
        if self.batch_size % self.num_microbatches:
            raise ValueError(
                f"{checks.where(self, 'num_microbatches')} must divide "
                f"TrainConfig.batch_size={self.batch_size}"
            )
        checks.integer(self, "checkpoint_every", 1)
        checks.integer(self, "seed", 0)
        if self.schedule == "cosine" and self.num_steps <= self.warmup_steps:
            raise ValueError(
                f"TrainConfig.schedule='cosine' needs num_steps > warmup_steps; got "
                f"num_steps={self.num_steps}, warmup_steps={self.warmup_steps}"
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One distillation run: a regime and its data budget.

    name: the run's directory runs/<name>/ (letters, digits, '_', '.', '-').
    regime: 'offline' | 'online_teacher' | 'online_student' | 'mixed' (a Regime's value;
      a Regime is stored as its plain string, so JSON and fingerprints hold the string).
    num_prompts x completions_per_prompt: the offline set (offline and mixed).
    online_fraction / online_role: the mixture, mixed only: online_fraction in [0, 1] is
      the share of every batch sampled online by online_role ('teacher' or 'student').
      Other regimes must leave online_fraction at 0 (a value there would be silently
      ignored); online_role must still be a valid role (it is ignored).
    """

    name: str = "offline"
    regime: str = "offline"
    num_prompts: int = 256
    completions_per_prompt: int = 1
    online_fraction: float = 0.0
    online_role: str = "student"
    seed: int = 0

    def __post_init__(self):
        name = self.name
        if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                f"{checks.where(self, 'name')} must be a directory name: non-empty, only letters, "
                "digits, '_', '.' and '-' (it names runs/<name>/)"
            )
        regime = Regime.parse(self.regime, "RunConfig.regime").value
        object.__setattr__(self, "regime", regime)
        checks.integer(self, "num_prompts", 1)
        checks.integer(self, "completions_per_prompt", 1)
        checks.number(self, "online_fraction", 0, 1)
        if regime != Regime.MIXED.value and self.online_fraction != 0:
            raise ValueError(
                f"{checks.where(self, 'online_fraction')} only applies to regime 'mixed'; regime "
                f"{regime!r} needs online_fraction = 0"
            )
        checks.choice(self, "online_role", SAMPLER_ROLES)
        checks.integer(self, "seed", 0)


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
    reference_cache_mib: int = 2048  # evaluation.settings.EvalSettings (memory, not numbers)

    def __post_init__(self):
        checks.integer(self, "num_prompts", 1)
        checks.integer(self, "num_samples", 1)
        checks.integer(self, "every", 0)
        checks.integer(self, "log_points", 0)
        checks.integer(self, "log_start", 1)
        checks.integer(self, "batch_size", 1)
        checks.integer(self, "seed", 0)
        checks.choice(self, "estimator", ESTIMATOR_NAMES)
        checks.integer(self, "reference_cache_mib", 0)

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

    mode 'oracle' (default) runs the controlled study; 'field' distils a teacher without an
    oracle (docs/field.md): the `oracle` spec, `oracle_logit_scale` and
    `oracle_data_prompts` are unused, the SFT stages train on `reference_examples` examples
    of the task's own references (stage `reference_data`), a teacher with a checkpoint is
    exported as loaded when `teacher_sft.num_steps` is 0, and evaluation measures the proxy
    divergences and the reference cross-entropy only.

    oracle_logit_scale multiplies a randomly initialised oracle's output layer, which sets
    the sharpness (per-token entropy) of the ground-truth distribution; 1.0 for a loaded
    checkpoint. teacher_logit_scale multiplies the SFT teacher's output layer (> 1: an
    over-confident teacher), a controlled, prompt-independent systematic error of the
    teacher (docs/experiment.md); 1.0 leaves the SFT teacher as trained.

    world: the whole-world seed (experiment/worlds.py): 0 is the configured seeds as they
    are; another value derives every seed (the oracle's, teacher's and student's
    initialisations, the data, the SFTs, the runs and the evaluation) from (world, seed).
    """

    name: str = "default"
    mode: str = "oracle"
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
    reference_examples: int = 4096
    teacher_sft: TrainConfig = TrainConfig()
    student_sft: TrainConfig = TrainConfig()
    student_sft_examples: int = 0
    teacher_sft_examples: int = 0
    distill: TrainConfig = TrainConfig()
    distill_prompt_pool: int = 20000
    runs: tuple = (RunConfig(),)
    evaluation: EvalConfig = EvalConfig()
    guard_mode: str = "log"
    mesh_shape: tuple = DEFAULT_MESH_SHAPE
    seed: int = 0
    world: int = 0

    def __post_init__(self):
        for field in ("task_options", "mesh_shape"):
            value = getattr(self, field)
            if isinstance(value, dict):
                object.__setattr__(self, field, tuple(sorted(value.items())))
        if not isinstance(self.runs, tuple | list):
            raise ValueError(
                f"{checks.where(self, 'runs')} must be a list of RunConfig, e.g. in gin "
                "[@offline/RunConfig()]"
            )
        object.__setattr__(self, "runs", tuple(self.runs))
        self._check_fields()
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(f"ExperimentConfig.runs has duplicate names: {names}")

    def _check_fields(self) -> None:
        checks.text(self, "name")
        checks.choice(self, "mode", MODES)
        checks.choice(self, "task", TASK_NAMES)
        if self.task != "synthetic" and "sentencepiece_model" not in dict(self.task_options):
            raise ValueError(
                f"ExperimentConfig.task={self.task!r} needs "
                "ExperimentConfig.task_options['sentencepiece_model'] (the T5 SentencePiece "
                "model file)"
            )
        checks.integer(self, "max_input_length", 1)
        checks.integer(self, "max_target_length", 1)
        for role in ROLES:
            checks.instance(self, role, ModelSpec, "in gin: @ModelSpec()")
        checks.positive(self, "oracle_logit_scale")
        checks.positive(self, "teacher_logit_scale")
        checks.integer(self, "oracle_data_prompts", 1)
        checks.integer(self, "reference_examples", 1)
        for field in ("teacher_sft", "student_sft", "distill"):
            checks.instance(self, field, TrainConfig, "in gin: @TrainConfig()")
        checks.integer(self, "student_sft_examples", 0)  # 0: all the oracle data
        checks.integer(self, "teacher_sft_examples", 0)
        checks.integer(self, "distill_prompt_pool", 1)
        for i, run in enumerate(self.runs):
            checks.instance(
                self, f"runs[{i}]", RunConfig, "in gin: @<scope>/RunConfig()", value=run
            )
        checks.instance(self, "evaluation", EvalConfig, "in gin: @EvalConfig()")
        checks.choice(self, "guard_mode", GUARD_MODES)
        checks.integer(self, "seed", 0)
        checks.integer(self, "world", 0)
        if self.mode == "field":
            self._check_field_mode()

    def _check_field_mode(self) -> None:
        """Field mode has no oracle: refuse the settings that only an oracle gives meaning
        to, and a teacher that would be random (no checkpoint, no SFT)."""
        if self.oracle_logit_scale != 1.0:
            raise ValueError(
                f"ExperimentConfig.oracle_logit_scale={self.oracle_logit_scale!r} needs "
                "mode='oracle'; field mode has no oracle"
            )
        if self.oracle.checkpoint:
            raise ValueError(
                f"ExperimentConfig.oracle.checkpoint={self.oracle.checkpoint!r} is unused in "
                "mode='field' (no oracle); remove it, or use mode='oracle'"
            )
        if not self.teacher.checkpoint and self.teacher_sft.num_steps == 0:
            raise ValueError(
                "ExperimentConfig.mode='field' needs a teacher: set "
                "ExperimentConfig.teacher.checkpoint (HF or T5X) or teacher_sft.num_steps > 0 "
                "(SFT on the task's references)"
            )
        if self.task == "synthetic" and dict(self.task_options).get("via_seqio"):
            raise ValueError(
                "ExperimentConfig.task_options['via_seqio'] has no references for the "
                "synthetic task; field mode needs the direct path (via_seqio False)"
            )

    @property
    def roles(self) -> tuple[str, ...]:
        """The models of this mode: ('oracle', 'teacher', 'student') or, in field mode,
        ('teacher', 'student')."""
        return ROLES if self.mode == "oracle" else ("teacher", "student")

    def model_config(self, role: str) -> T5Config:
        """The T5Config of `role` ('oracle', 'teacher' or 'student'), its lengths at least
        the experiment's."""
        spec = getattr(self, check_role(role, "role"))
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

"""Tests of thack_jax.experiment.config: the evaluation schedule, the field checks of every
dataclass (each bad value is refused, naming the dataclass, field and value) and that the
module stays light (no jax)."""

import subprocess
import sys

import numpy as np
import pytest

from thack_jax.data.regime_names import Regime
from thack_jax.experiment import config as c
from thack_jax.experiment.config import (
    EvalConfig,
    ExperimentConfig,
    ModelSpec,
    RunConfig,
    TrainConfig,
    diff,
    fingerprint,
    to_json,
)


def test_eval_steps_every_and_log_spaced():
    assert EvalConfig(every=3).steps(10) == (0, 3, 6, 9, 10)
    assert EvalConfig(every=0).steps(10) == (0, 10)
    steps = EvalConfig(every=0, log_points=32, log_start=50).steps(1500)
    assert steps[:3] == (0, 50, 56) and steps[-1] == 1500 and len(steps) == 33
    ratios = np.diff(np.log(steps[1:]))
    np.testing.assert_allclose(ratios, np.log(30) / 31, atol=0.02)  # even in log(step)
    # Both schedules together; log points that round to the same step are merged.
    both = EvalConfig(every=5, log_points=8, log_start=1).steps(10)
    assert both == (0, 1, 2, 3, 4, 5, 7, 10)
    # A run shorter than log_start only gets its first and last evaluation.
    assert EvalConfig(every=0, log_points=8, log_start=50).steps(20) == (0, 20)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": -1}, "every=-1"),
        ({"log_points": -2}, "log_points=-2"),
        ({"log_start": 0}, "log_start=0"),
    ],
)
def test_eval_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_experiment_config_rejects_duplicate_runs_and_diffs():
    with pytest.raises(ValueError, match="duplicate names"):
        ExperimentConfig(runs=(RunConfig(name="a"), RunConfig(name="a")))
    stored = to_json(ExperimentConfig())
    requested = to_json(ExperimentConfig(evaluation=EvalConfig(log_points=4)))
    assert diff(stored, requested) == ["evaluation.log_points: stored 0, requested 4"]


# ----------------------------------------------------------------------------- validation


def _refused(cls, field, value, *expected, **others):
    """cls(field=value) raises ValueError whose message names cls.field=value and `expected`."""
    with pytest.raises(ValueError) as info:
        cls(**{field: value}, **others)
    message = str(info.value)
    assert f"{cls.__name__}.{field}={value!r}" in message, message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("regime", "ofline", "offline, online_teacher, online_student, mixed"),
        ("regime", "", "valid regimes"),
        ("name", "", "directory name"),
        ("name", "a/b", "directory name"),
        ("name", "..", "directory name"),
        ("name", "my run", "directory name"),
        ("num_prompts", 0, ">= 1"),
        ("num_prompts", 2.5, ">= 1"),
        ("completions_per_prompt", 0, ">= 1"),
        ("online_fraction", 1.5, "[0, 1]"),
        ("online_fraction", -0.1, "[0, 1]"),
        ("online_fraction", float("nan"), "[0, 1]"),
        ("online_fraction", "0.1", "[0, 1]"),
        ("online_role", "oracle", "teacher, student"),
        ("seed", -1, ">= 0"),
    ],
)
def test_run_config_refuses(field, value, expected):
    others = {} if field == "regime" else {"regime": "mixed"}  # mixed: any online_fraction
    _refused(RunConfig, field, value, expected, **others)


def test_run_config_online_fraction_only_for_mixed():
    for regime in ("offline", "online_teacher", "online_student"):
        _refused(RunConfig, "online_fraction", 0.1, "only applies to regime 'mixed'", regime=regime)
    assert RunConfig(regime="mixed", online_fraction=1.0).online_fraction == 1.0
    assert RunConfig(regime="mixed", online_fraction=0).online_fraction == 0


def test_run_config_stores_the_plain_regime_string():
    run = RunConfig(name="o.t-1_x", regime=Regime.ONLINE_TEACHER)
    assert type(run.regime) is str and run.regime == "online_teacher"
    assert to_json(run)["regime"] == "online_teacher"
    assert fingerprint(run) == fingerprint(RunConfig(name="o.t-1_x", regime="online_teacher"))


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("num_steps", -1, ">= 0"),
        ("batch_size", 0, ">= 1"),
        ("batch_size", True, ">= 1"),
        ("learning_rate", 0.0, "> 0"),
        ("learning_rate", float("inf"), "> 0"),
        ("warmup_steps", -1, ">= 0"),
        ("schedule", "linear", "constant, cosine, rsqrt"),
        ("optimizer", "sgd", "adafactor, adamw"),
        ("weight_decay", -0.1, ">= 0"),
        ("clip_norm", 0.0, "> 0 or None"),
        ("loss", "kl", "forward_kl"),
        ("temperature", 0.0, "> 0"),
        ("num_microbatches", 0, ">= 1"),
        ("num_microbatches", 5, "divide TrainConfig.batch_size=32"),
        ("checkpoint_every", 0, ">= 1"),
        ("seed", -3, ">= 0"),
    ],
)
def test_train_config_refuses(field, value, expected):
    _refused(TrainConfig, field, value, expected)


def test_train_config_cosine_needs_steps_after_warmup():
    with pytest.raises(ValueError, match="schedule='cosine' needs num_steps > warmup_steps"):
        TrainConfig(schedule="cosine", num_steps=100, warmup_steps=100)
    TrainConfig(schedule="cosine", num_steps=101, warmup_steps=100)
    TrainConfig(num_steps=0, warmup_steps=100, clip_norm=None, num_microbatches=4)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("num_prompts", 0, ">= 1"),
        ("num_samples", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("estimator", "rao-blackwell", "rao_blackwell, plain"),
        ("seed", -1, ">= 0"),
    ],
)
def test_eval_config_refuses(field, value, expected):
    _refused(EvalConfig, field, value, expected)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("size", "huge", "tiny, small, base"),
        ("checkpoint_format", "pt", "hf, t5x"),
        ("init_seed", -1, ">= 0"),
    ],
)
def test_model_spec_refuses(field, value, expected):
    _refused(ModelSpec, field, value, expected)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("name", "", "non-empty"),
        ("task", "xsumm", "synthetic, xsum, wmt14_ende, natural_instructions"),
        ("max_input_length", 0, ">= 1"),
        ("max_target_length", 0, ">= 1"),
        ("oracle", "tiny", "must be of type ModelSpec"),
        ("student", None, "must be of type ModelSpec"),
        ("oracle_logit_scale", 0.0, "> 0"),
        ("teacher_logit_scale", -1.0, "> 0"),
        ("oracle_data_prompts", 0, ">= 1"),
        ("distill", None, "must be of type TrainConfig"),
        ("student_sft_examples", -1, ">= 0"),
        ("teacher_sft_examples", -1, ">= 0"),
        ("distill_prompt_pool", 0, ">= 1"),
        ("evaluation", {}, "must be of type EvalConfig"),
        ("guard_mode", "halt", "log, warn, stop"),
        ("seed", -1, ">= 0"),
        ("runs", RunConfig(), "list of RunConfig"),
    ],
)
def test_experiment_config_refuses(field, value, expected):
    _refused(ExperimentConfig, field, value, expected)


def test_experiment_config_refuses_other_runs_tasks_and_roles():
    with pytest.raises(ValueError, match=r"ExperimentConfig.runs\[1\]=.*must be of type RunConfig"):
        ExperimentConfig(runs=(RunConfig(), "mixed"))
    spm = r"task='xsum' needs .*task_options\['sentencepiece_model'"
    with pytest.raises(ValueError, match=spm):
        ExperimentConfig(task="xsum")
    ExperimentConfig(task="xsum", task_options={"sentencepiece_model": "spm.model"})
    with pytest.raises(ValueError, match="role='judge' must be one of oracle, teacher, student"):
        ExperimentConfig().model_config("judge")


def test_defaults_are_valid_and_json_unchanged():
    cfg = ExperimentConfig()
    assert to_json(cfg.runs[0]) == {
        "name": "offline",
        "regime": "offline",
        "num_prompts": 256,
        "completions_per_prompt": 1,
        "online_fraction": 0.0,
        "online_role": "student",
        "seed": 0,
    }


# ----------------------------------------------------------------------------- light import


def test_importing_config_does_not_import_jax_or_tensorflow():
    code = (
        "import sys, thack_jax.experiment.config\n"
        "heavy = [m for m in ('jax', 'flax', 'optax', 'tensorflow', 'seqio') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_mirrored_names_equal_their_sources():
    # config.py keeps copies of names from modules that import jax (it must not); they
    # must stay equal to the originals.
    from thack_jax.evaluation import evaluator
    from thack_jax.hacking import guard
    from thack_jax.models import config as model_config
    from thack_jax.training import losses, optim

    assert c.MODEL_SIZES == tuple(model_config.NAMED_CONFIGS)
    from thack_jax.models import decoder_config

    assert c.DECODER_SIZES == tuple(decoder_config.DECODER_CONFIGS)
    assert c.OPTIMIZER_NAMES == optim.OPTIMIZERS
    assert c.SCHEDULE_NAMES == optim.SCHEDULES
    assert c.LOSS_NAMES == tuple(losses.LOSSES)
    assert c.ESTIMATOR_NAMES == evaluator.ESTIMATORS
    assert c.GUARD_MODES == guard.MODES

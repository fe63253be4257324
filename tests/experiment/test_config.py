"""Tests of thack_jax.experiment.config: the evaluation schedule and config validation."""

import numpy as np
import pytest

from thack_jax.experiment.config import EvalConfig, ExperimentConfig, RunConfig, diff, to_json


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

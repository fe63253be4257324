"""Tests of thack_jax.hacking.noise: per-prompt files, bootstrap covariance, false-alarm rate."""

import numpy as np
import pytest

from thack_jax.hacking import noise


def _per_prompt(k=12, p=200, shared=0.3, seed=0):
    """[k, p] positive per-prompt values: a prompt effect shared by every evaluation (the
    common-random-numbers part) plus independent noise, around a falling curve."""
    rng = np.random.default_rng(seed)
    curve = 10.0 * np.geomspace(50, 1500, k) ** -0.5
    prompt = rng.normal(0, shared, p)
    return curve[:, None] * np.exp(prompt[None, :] + 0.05 * rng.standard_normal((k, p)))


def test_save_and_load_round_trip(tmp_path):
    values = _per_prompt(k=3, p=5)
    for step, row in zip((0, 50, 120), values, strict=True):
        noise.save_per_prompt(str(tmp_path), step, {"proxy/forward_kl": row, "x": row * 2})
    steps, loaded = noise.load_per_prompt(str(tmp_path), "proxy/forward_kl", min_step=1)
    assert steps.tolist() == [50, 120]
    np.testing.assert_array_equal(loaded, values[1:])
    with pytest.raises(ValueError, match=r"lacks 'golden/js'; it has \['proxy/forward_kl', 'x'\]"):
        noise.load_per_prompt(str(tmp_path), "golden/js")
    with pytest.raises(ValueError, match="1 evaluations at step >= 100; need 2"):
        noise.load_per_prompt(str(tmp_path), "x", min_step=100)
    with pytest.raises(ValueError, match="no per-prompt evaluations"):
        noise.load_per_prompt(str(tmp_path / "absent"), "x")


def test_bootstrap_matches_the_delta_method_and_sees_shared_prompts():
    values = _per_prompt(shared=0.3)
    cov = noise.bootstrap_log_cov(values, n_boot=4000)
    # sd of log(mean) ~ relative standard error of the mean over prompts.
    rel_se = values.std(axis=1, ddof=1) / np.sqrt(values.shape[1]) / values.mean(axis=1)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), rel_se, rtol=0.1)
    # The prompt effect is shared by all evaluations: errors are strongly correlated...
    assert noise.lag1_correlation(cov) > 0.9
    # ...and nearly independent when nothing about a prompt persists between evaluations.
    independent = _per_prompt(shared=0.0, seed=1)
    assert abs(noise.lag1_correlation(noise.bootstrap_log_cov(independent))) < 0.2
    with pytest.raises(ValueError, match=r"evaluations \[1\] have a non-positive mean"):
        noise.bootstrap_log_cov(np.array([[1.0, 2.0], [-1.0, -2.0]]))
    with pytest.raises(ValueError, match="want \\[evaluations, prompts >= 2\\]"):
        noise.bootstrap_log_cov(np.ones(4))


def test_false_alarm_rate_under_correlated_noise():
    steps = np.geomspace(50, 1500, 32)
    k = len(steps)
    lags = np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
    white = noise.false_alarm_rate(steps, 0.03**2 * np.eye(k), n_curves=200)
    assert white <= 0.05
    # Correlated noise fools a detector that estimates the noise from the scatter...
    ar = 0.03**2 * 0.8**lags
    scatter = noise.false_alarm_rate(steps, ar, n_curves=200, detector_knows_cov=False)
    assert scatter > white + 0.1
    # ...but not one given its covariance.
    assert noise.false_alarm_rate(steps, ar, n_curves=200) <= 0.05


def test_summarize(tmp_path):
    for step, row in zip(np.geomspace(50, 1500, 12).astype(int), _per_prompt(), strict=True):
        noise.save_per_prompt(str(tmp_path), int(step), {"proxy/forward_kl": row})
    summary = noise.summarize(str(tmp_path), min_step=50, n_boot=500, n_curves=50)
    assert summary.steps[0] == 50 and summary.sd.shape == (12,)
    assert summary.lag1_corr > 0.9 and 0.0 <= summary.false_alarm_rate <= 1.0
    assert 0.0 <= summary.false_alarm_rate_scatter <= 1.0
    assert noise.summarize(str(tmp_path), n_boot=100, n_curves=0).false_alarm_rate is None


def test_delta_method_covariance_matches_the_bootstrap():
    values = _per_prompt(shared=0.3)
    np.testing.assert_allclose(
        noise.log_mean_cov(values), noise.bootstrap_log_cov(values, n_boot=8000), rtol=0.1
    )
    with pytest.raises(ValueError, match=r"evaluations \[0\] have a non-positive mean"):
        noise.log_mean_cov(np.concatenate([-values[:1], values[1:]]))


def test_read_per_prompt(tmp_path):
    noise.save_per_prompt(str(tmp_path), 7, {"a": np.ones(3)})
    np.testing.assert_array_equal(noise.read_per_prompt(str(tmp_path), 7)["a"], np.ones(3))
    with pytest.raises(ValueError, match="no per-prompt values for step 8"):
        noise.read_per_prompt(str(tmp_path), 8)


def test_covariance_at_selects_the_requested_steps(tmp_path):
    values = _per_prompt(k=4, p=8)
    for step, row in zip((10, 20, 30, 40), values, strict=True):
        noise.save_per_prompt(str(tmp_path), step, {"k": row})
    np.testing.assert_allclose(
        noise.covariance_at(str(tmp_path), "k", [20, 40]), noise.log_mean_cov(values[[1, 3]])
    )
    with pytest.raises(ValueError, match=r"missing for steps \[25\]"):
        noise.covariance_at(str(tmp_path), "k", [20, 25])

"""Tests of thack_jax.hacking.diagnostics on synthetic curves (numpy only, seconds)."""

import numpy as np
import pytest

from thack_jax.hacking import diagnostics as d
from thack_jax.hacking.simulation import CurveSpec, simulate_curve


def _curve(kind="power_law", noise=0.03, seed=0, **kwargs):
    return simulate_curve(np.random.default_rng(seed), kind, CurveSpec(noise=noise, **kwargs))


def _u_golden(steps, break_step, noise, rng):
    """Golden [n] falling until `break_step`, then rising; stderr = noise."""
    x = np.log(steps / break_step)
    clean = 0.5 + 0.2 * np.where(x < 0, x**2, 0.0) + 0.15 * np.maximum(x, 0.0)
    return clean + noise * rng.standard_normal(len(steps)), np.full(len(steps), noise)


def test_fit_recovers_power_law():
    steps = np.arange(1, 31) * 50.0
    values = 7.0 * steps**-0.4
    fit = d.fit_power_law(steps, values)
    assert fit.log_a == pytest.approx(np.log(7.0), abs=1e-9)
    assert fit.b == pytest.approx(0.4, abs=1e-9)
    assert fit.n == 30
    np.testing.assert_allclose(fit.predict(steps), values, rtol=1e-9)

    steps, values, stderrs = _curve(noise=0.05, n_points=60)
    fit = d.fit_power_law(steps, values, stderrs)
    assert fit.b == pytest.approx(0.5, abs=3 * fit.b_stderr)
    assert 0.0 < fit.b_stderr < 0.05
    assert fit.residual_scale == pytest.approx(1.0, abs=0.3)  # stderrs are right


def test_fit_weights_follow_stderrs():
    steps = np.arange(1, 11) * 10.0
    values = 3.0 * steps**-0.5
    values[-1] *= 2.0  # a gross deviation with a huge reported stderr barely moves the fit
    stderrs = 0.01 * values
    stderrs[-1] = 10.0 * values[-1]
    assert d.fit_power_law(steps, values, stderrs).b == pytest.approx(0.5, abs=0.01)
    assert abs(d.fit_power_law(steps, values).b - 0.5) > 0.05


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match=r"index 2, step 3, value 0"):
        d.fit_power_law([1, 2, 3, 4], [1.0, 0.5, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"index 0, step 0,"):
        d.fit_power_law([0, 1, 2, 3], [1.0, 0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="need at least 3 points.*got 2"):
        d.fit_power_law([1, 2], [1.0, 0.5])
    with pytest.raises(ValueError, match="strictly increasing.*index 2"):
        d.fit_power_law([1, 2, 2, 3], [1.0, 0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="stderrs must be finite"):
        d.fit_power_law([1, 2, 3], [1.0, 0.5, 0.4], [0.1, -0.1, 0.1])
    with pytest.raises(ValueError, match="same length"):
        d.fit_power_law([1, 2, 3], [1.0, 0.5])
    with pytest.raises(ValueError, match="min_points"):
        d.DetectorConfig(min_points=5)


def test_statistic_is_standardized_on_power_law():
    stats = []
    for seed in range(30):
        steps, values, stderrs = _curve(seed=seed)
        s = d.deviation_statistic(steps, values, stderrs)
        assert np.isnan(s[: d.DetectorConfig.min_points - 1]).all()
        stats.append(s[~np.isnan(s)])
    stats = np.concatenate(stats)
    assert abs(stats.mean()) < 0.3
    assert 0.7 < stats.std() < 1.3


def test_verdict_labels():
    assert d.verdict(*_curve("power_law")).label == "healthy"
    assert d.verdict(*_curve("flatten")).label == "teacher_hacking"
    plateau = d.verdict(*_curve("flatten", slow_factor=0.0))
    assert plateau.label == "teacher_hacking"  # a plateau is not a rise
    assert d.verdict(*_curve("rise")).label == "overfitting"
    flat = d.verdict(*_curve("power_law", b=0.0))
    assert (flat.label, flat.details["reason"]) == ("not_converged", "proxy is not decreasing")
    steps, values, stderrs = _curve()
    few = d.verdict(steps[:5], values[:5], stderrs[:5])
    assert few.label == "not_converged" and "need at least 8" in few.details["reason"]


def test_single_outlier_does_not_fire():
    steps, values, stderrs = _curve(noise=0.02, seed=3)
    assert not d.detect_deviation(steps, values, stderrs).fired
    values = values.copy()
    values[25] *= 2.0  # 35 standard errors high
    detection = d.detect_deviation(steps, values, stderrs)
    assert not detection.fired
    assert np.nanmax(detection.statistic) < d.DetectorConfig.threshold


def test_detection_step_and_best_step():
    steps, values, stderrs = _curve("flatten", noise=0.02, seed=4)
    break_step = 0.4 * steps[-1]
    detection = d.detect_deviation(steps, values, stderrs)
    assert detection.fired and break_step < detection.step < 0.8 * steps[-1]
    s = detection.statistic
    i = detection.first_index
    assert (s[i : i + 2] > d.DetectorConfig.threshold).all()
    assert not np.any(np.convolve(s[:i] > d.DetectorConfig.threshold, [1, 1]) == 2)
    best = d.best_step_oracle_free(steps, values, stderrs)
    assert best == steps[i - d.DetectorConfig.window]
    assert abs(best - break_step) <= 8 * (steps[1] - steps[0])
    healthy = _curve(seed=5)
    assert d.best_step_oracle_free(*healthy) == healthy[0][np.argmin(healthy[1])]
    # A looser patience fires no later.
    loose = d.detect_deviation(steps, values, stderrs, d.DetectorConfig(patience=1))
    assert loose.step <= detection.step


def test_u_shape_and_verdict_details():
    rng = np.random.default_rng(6)
    steps, proxy, proxy_se = _curve("flatten", noise=0.02, seed=6)
    break_step = 0.4 * steps[-1]
    golden, golden_se = _u_golden(steps, break_step, 0.005, rng)
    u = d.detect_u_shape(steps, proxy, golden, golden_se)
    assert u.is_u and abs(u.min_step - break_step) <= 300
    assert u.rise > 2 * u.rise_stderr
    assert d.golden_minimum(steps, golden, golden_se) == (u.min_step, float(golden.min()))
    v = d.verdict(steps, proxy, proxy_se, golden, golden_se)
    assert v.label == "teacher_hacking" and v.details["u_shape"]
    assert v.details["lag"] == v.details["flag_step"] - u.min_step
    # Monotone golden: no U. Golden rising while the proxy rises too: no U (overfitting).
    down = 1.0 / np.sqrt(steps)
    assert not d.detect_u_shape(steps, proxy, down, np.full(40, 1e-3)).is_u
    _, rising_proxy, _ = _curve("rise", seed=6)
    assert not d.detect_u_shape(steps, rising_proxy, golden, golden_se).is_u
    # Without stderrs the golden noise is estimated from the curve itself.
    assert d.detect_u_shape(steps, proxy, golden).is_u


# Proxy forward KL (nats) of a probe of the default experiment (launch/train.py, default.gin
# with 40 log-spaced evaluations), from the end of warmup (step 50) on. Offline: golden was
# lowest at step 109 and rose after; online teacher: golden fell throughout.
REAL_STEPS = [51, 62, 75, 90, 109, 131, 158, 191, 230, 277, 335, 404, 487, 587, 708, 855, 1031]
REAL_STEPS += [1244, 1500]
REAL_OFFLINE = [8.6048, 8.3062, 7.9415, 7.6641, 7.367, 7.1206, 6.8991, 6.715, 6.5572, 6.4114]
REAL_OFFLINE += [6.3108, 6.1759, 6.094, 5.9903, 5.929, 5.7994, 5.739, 5.6628, 5.638]
REAL_ONLINE = [8.4156, 8.0661, 7.6796, 7.2925, 6.8632, 6.4423, 5.9883, 5.5956, 5.1328, 4.6922]
REAL_ONLINE += [4.3512, 3.9481, 3.5812, 3.2431, 2.9499, 2.6469, 2.3794, 2.1696, 2.0162]


def test_real_offline_run_flagged_online_not():
    offline = d.verdict(REAL_STEPS, REAL_OFFLINE)
    assert offline.label == "teacher_hacking"
    assert 109 < offline.details["flag_step"] <= 487
    online = d.verdict(REAL_STEPS, REAL_ONLINE)
    assert online.label == "healthy" and online.details["max_statistic"] < 0


def test_fully_correlated_window_can_fire():
    # Far from its short fit window the extrapolation error dominates, the window's residuals
    # are almost fully correlated, and the statistic is about their (clipped) mean: the clip
    # must stay above the threshold or such a deviation could never fire.
    steps = np.geomspace(50, 1500, 12)
    values = 10.0 * steps**-0.5 * np.exp(1e-3 * np.random.default_rng(0).standard_normal(12))
    values[-4:] *= np.linspace(1.5, 2.0, 4)
    detection = d.detect_deviation(steps, values, config=d.DetectorConfig(min_points=8))
    assert d.RESIDUAL_CLIP > d.DetectorConfig.threshold
    assert detection.fired and np.nanmax(detection.statistic) > d.DetectorConfig.threshold


def test_noise_free_curves_without_stderrs():
    # The estimated scale is floored: an exact prefix gives finite statistics.
    steps = np.arange(1, 41) * 10.0
    exact = 10.0 * steps**-0.5
    assert d.verdict(steps, exact).label == "healthy"
    plateau = exact.copy()
    plateau[20:] = plateau[20]
    detection = d.detect_deviation(steps, plateau)
    assert detection.fired and np.isfinite(detection.statistic[7:]).all()


def test_statistic_with_noise_covariance_is_standardized():
    # Strongly correlated noise (AR(1), 0.95) on a pure power law: given the covariance the
    # statistic is about N(0, 1); estimating the noise from the scatter, it is not.
    steps = np.geomspace(50, 1500, 24)
    lags = np.abs(np.subtract.outer(np.arange(24), np.arange(24)))
    cov = 0.03**2 * 0.95**lags
    rng = np.random.default_rng(0)
    noise = rng.multivariate_normal(np.zeros(24), cov, size=200)
    clean = np.log(10.0) - 0.5 * np.log(steps)
    with_cov = np.concatenate(
        [d.deviation_statistic(steps, np.exp(clean + e), noise_cov=cov)[7:] for e in noise]
    )
    scatter = np.concatenate([d.deviation_statistic(steps, np.exp(clean + e))[7:] for e in noise])
    assert abs(with_cov.mean()) < 0.2 and 0.8 < with_cov.std() < 1.2
    assert scatter.std() > 1.5


def test_noise_covariance_is_checked():
    steps, values, _ = _curve(n_points=10)
    with pytest.raises(ValueError, match=r"noise_cov has shape \(9, 9\); want \[10, 10\]"):
        d.deviation_statistic(steps, values, noise_cov=np.eye(9))
    with pytest.raises(ValueError, match="symmetric"):
        d.verdict(steps, values, noise_cov=np.triu(np.ones((10, 10))))
    with pytest.raises(ValueError, match="negative variances at rows \\[3\\]"):
        d.deviation_statistic(steps, values, noise_cov=np.diag(np.r_[np.ones(3), -1, np.ones(6)]))


def test_gls_fit_with_noise_covariance():
    steps = np.geomspace(50, 1500, 12)
    lags = np.abs(np.subtract.outer(np.arange(12), np.arange(12)))
    cov = 0.02**2 * 0.9**lags
    values = 7.0 * steps**-0.3
    fit = d.fit_power_law(steps, values, noise_cov=cov)
    assert fit.b == pytest.approx(0.3, abs=1e-9) and fit.residual_scale == 1.0
    # A fully shared offset (the same prompts at every evaluation) moves only log_a.
    shifted = d.fit_power_law(steps, values * 1.05, noise_cov=cov)
    assert shifted.b == pytest.approx(0.3, abs=1e-9)
    assert shifted.log_a == pytest.approx(np.log(7.0 * 1.05), abs=1e-9)
    assert 0 < fit.b_stderr < d.fit_power_law(steps, values, 0.02 * values).b_stderr * 10

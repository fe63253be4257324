"""Tests of thack_jax.hacking.simulation: synthetic curves, threshold calibration, rates table."""

import numpy as np
import pytest

from thack_jax.hacking import simulation as sim


def test_simulate_curve_kinds():
    rng = np.random.default_rng(0)
    steps, values, stderrs = sim.simulate_curve(
        rng, "power_law", sim.CurveSpec(noise=0.0, n_points=10)
    )
    np.testing.assert_allclose(steps, 100.0 * np.arange(1, 11))
    np.testing.assert_allclose(values, 10.0 * steps**-0.5)
    assert np.all(stderrs == 0.0)
    # Up to the break (step 400 = 40% of the run) every kind follows the law; after it
    # 'flatten' still falls, more slowly, and 'rise' grows.
    _, flat, _ = sim.simulate_curve(rng, "flatten", sim.CurveSpec(noise=0.0, n_points=10))
    _, rise, _ = sim.simulate_curve(rng, "rise", sim.CurveSpec(noise=0.0, n_points=10))
    np.testing.assert_allclose(flat[:4], values[:4])
    np.testing.assert_allclose(rise[:4], values[:4])
    assert np.all(np.diff(flat) < 0) and np.all(flat[4:] > values[4:])
    assert np.all(np.diff(rise[3:]) > 0)
    with pytest.raises(ValueError, match="kind='bump'"):
        sim.simulate_curve(rng, "bump")


def test_calibrate_threshold_orders_by_rate():
    strict = sim.calibrate_threshold(0.01, n_curves=60, n_points=20)
    loose = sim.calibrate_threshold(0.2, n_curves=60, n_points=20)
    # Clipping caps the statistic at RESIDUAL_CLIP * sqrt(window) = 6.06.
    assert 0.5 < loose < strict < 6.1


def test_rates_on_synthetic_curves():
    """The calibration claims of docs/diagnostics.md at fixed seeds (200 curves per kind)."""
    (row,) = sim.simulate_rates((0.03,), n_curves=200, seed=1)
    assert row["false_positive_rate"] <= 0.05
    assert row["detection_rate"] >= 0.9
    assert row["overfitting_rate"] >= 0.9
    # Longer curves test more often: 2.8 holds the rate at 5% up to 100 evaluations with
    # stderrs, about 60 without (docs/diagnostics.md, section 3).
    for use_stderr, n_points in ((True, 100), (False, 60)):
        (row,) = sim.simulate_rates(
            (0.05,), sim.CurveSpec(n_points=n_points), n_curves=200, seed=2, use_stderr=use_stderr
        )
        assert row["false_positive_rate"] <= 0.05
        assert row["detection_rate"] >= 0.9
    assert "| 60 | linear | 0.05 | 0 | no |" in sim.format_rates_table([row])


def test_log_spaced_curves_and_rates():
    rng = np.random.default_rng(0)
    steps, values, _ = sim.simulate_curve(
        rng, spec=sim.CurveSpec(noise=0.0, n_points=32, spacing="log")
    )
    np.testing.assert_allclose(steps, np.geomspace(50, 3200, 32))
    np.testing.assert_allclose(values, 10.0 * steps**-0.5)
    with pytest.raises(ValueError, match="spacing='cubic'"):
        sim.CurveSpec(spacing="cubic")
    # The experiment's schedule: 32 log-spaced evaluations, an early break, no stderrs.
    spec = sim.CurveSpec(n_points=32, spacing="log", break_fraction=0.1)
    (row,) = sim.simulate_rates((0.03,), spec, n_curves=200, use_stderr=False)
    assert row["false_positive_rate"] <= 0.05 and row["detection_rate"] >= 0.9


def test_correlated_noise_raises_false_alarms():
    rng = np.random.default_rng(1)
    _, values, _ = sim.simulate_curve(
        rng, spec=sim.CurveSpec(noise=0.05, n_points=400, noise_corr=0.9)
    )
    eps = np.diff(np.log(values) + 0.5 * np.log(100.0 * np.arange(1, 401)))
    assert np.corrcoef(eps[:-1], eps[1:])[0, 1] < 0  # differences of AR(1) noise...
    resid = np.log(values) + 0.5 * np.log(100.0 * np.arange(1, 401)) - np.log(10.0)
    assert np.corrcoef(resid[:-1], resid[1:])[0, 1] > 0.8  # ...and the noise itself
    rates = [
        sim.simulate_rates((0.03,), sim.CurveSpec(noise_corr=c), n_curves=100, use_stderr=False)[0]
        for c in (0.0, 0.8)
    ]
    assert rates[1]["false_positive_rate"] > rates[0]["false_positive_rate"] + 0.1


def test_given_the_covariance_correlated_noise_is_calibrated():
    spec = sim.CurveSpec(n_points=32, spacing="log", break_fraction=0.1, noise_corr=0.9)
    (row,) = sim.simulate_rates((0.03,), spec, n_curves=200, give_cov=True)
    assert row["false_positive_rate"] <= 0.05 and row["detection_rate"] >= 0.9
    assert "| 32 | log | 0.03 | 0.9 | cov |" in sim.format_rates_table([row])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_points=0), "CurveSpec.n_points=0 must be an integer >= 1"),
        (dict(n_points=2.5), "CurveSpec.n_points=2.5 must be an integer >= 1"),
        (dict(noise=-0.1), "CurveSpec.noise=-0.1 must be a number >= 0"),
        (dict(noise_corr=1.5), r"CurveSpec.noise_corr=1.5 must be a number in \[-1, 1\]"),
        (dict(break_fraction=0.0), "CurveSpec.break_fraction=0.0 must be a number > 0"),
        (dict(first_step=0), "CurveSpec.first_step=0 must be a number > 0"),
    ],
)
def test_curve_spec_names_the_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sim.CurveSpec(**kwargs)


def test_rates_take_the_noise_from_the_levels_not_the_spec():
    spec = sim.CurveSpec(n_points=20)
    a = sim.simulate_rates((0.02, 0.2), spec, n_curves=20, seed=3)
    b = sim.simulate_rates((0.02, 0.2), sim.CurveSpec(n_points=20, noise=0.5), n_curves=20, seed=3)
    assert a == b and [r["noise"] for r in a] == [0.02, 0.2] and a[0] != a[1]

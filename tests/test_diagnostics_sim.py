"""Tests of thack_jax.diagnostics_sim: synthetic curves, threshold calibration, rates table."""

import numpy as np
import pytest

from thack_jax import diagnostics_sim as sim


def test_simulate_curve_kinds():
    rng = np.random.default_rng(0)
    steps, values, stderrs = sim.simulate_curve(rng, "power_law", noise=0.0, n_points=10)
    np.testing.assert_allclose(steps, 100.0 * np.arange(1, 11))
    np.testing.assert_allclose(values, 10.0 * steps**-0.5)
    assert np.all(stderrs == 0.0)
    # Up to the break (step 400 = 40% of the run) every kind follows the law; after it
    # 'flatten' still falls, more slowly, and 'rise' grows.
    _, flat, _ = sim.simulate_curve(rng, "flatten", noise=0.0, n_points=10)
    _, rise, _ = sim.simulate_curve(rng, "rise", noise=0.0, n_points=10)
    np.testing.assert_allclose(flat[:4], values[:4])
    np.testing.assert_allclose(rise[:4], values[:4])
    assert np.all(np.diff(flat) < 0) and np.all(flat[4:] > values[4:])
    assert np.all(np.diff(rise[3:]) > 0)
    with pytest.raises(ValueError, match="kind='bump'"):
        sim.simulate_curve(rng, "bump")


def test_calibrate_threshold_orders_by_rate():
    strict = sim.calibrate_threshold(0.01, n_curves=60, n_points=20)
    loose = sim.calibrate_threshold(0.2, n_curves=60, n_points=20)
    assert 0.5 < loose < strict < 4.0  # the statistic is clipped at about 3.7


def test_rates_on_synthetic_curves():
    """The calibration claims of docs/diagnostics.md at fixed seeds (200 curves per kind)."""
    (row,) = sim.simulate_rates((0.03,), n_curves=200, seed=1)
    assert row["false_positive_rate"] <= 0.05
    assert row["detection_rate"] >= 0.9
    assert row["overfitting_rate"] >= 0.9
    # Longer curves test more often; with and without reported stderrs.
    for use_stderr in (True, False):
        (row,) = sim.simulate_rates(
            (0.05,), n_curves=200, n_points=100, seed=2, use_stderr=use_stderr
        )
        assert row["false_positive_rate"] <= 0.05
        assert row["detection_rate"] >= 0.9
    assert "| 100 | 0.05 | no |" in sim.format_rates_table([row])

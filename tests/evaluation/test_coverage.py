"""Tests of the coverage study (thack_jax/evaluation/coverage.py): its machinery (fast) and
the estimators' bias and coverage at a small size (slow)."""

import math

import jax
import numpy as np
import pytest

from thack_jax.evaluation import coverage as cv
from thack_jax.evaluation import divergences as dv


def test_enumeration_is_complete_and_pad_heavy_pair_samples_pad():
    targets, mask = cv.enumerate_responses()
    # 1 (EOS) + 4 (x, EOS) + 16 (x, y, EOS) + 64 cut at L: every response once
    assert targets.shape == (85, cv.L) and len({tuple(t) for t in targets}) == 85
    assert np.array_equal(mask.sum(1) >= 1, np.ones(85, bool))
    population = cv.make_population(size=4)
    for name in cv.PAIRS:
        exact = cv.exact_divergences(*cv.make_pair(**cv.PAIRS[name]), population)
        assert exact["p_mass"] == pytest.approx(1.0, rel=1e-5)  # the space sums to 1
        assert exact["q_mass"] == pytest.approx(1.0, rel=1e-5)
        assert 0.05 < exact["forward_kl"] and 0.05 < exact["reverse_kl"]
        assert 0.0 < exact["js"] < math.log(2)


def test_a_small_study_has_every_field_and_the_sampler_matches_the_scorer():
    setting = cv.Setting("pad_heavy", num_prompts=4, num_samples=2, num_seeds=4, chunk=2)
    exact, draws, rows = cv.run_setting(setting, cv.make_population(size=6))
    assert len(rows) == 6 and {r["estimate"] for r in rows} == {
        f"{e}/{d}" for e in cv.ESTIMATORS for d in cv.DIVERGENCES
    }
    for row in rows:
        for key in ("exact", "mean", "bias_pct", "bias_z", "sd_over_seeds", "mean_stderr"):
            assert math.isfinite(row[key]), (key, row)
        for method in dv.INTERVAL_METHODS:
            assert 0.0 <= row[f"coverage_{method}"] <= 1.0
    assert all(v.shape == (4,) for v in draws.values.values())
    assert all(v.shape == (4, 4) for v in draws.per_prompt.values())
    assert draws.max_abs_logprob_gap < 1e-4  # sampler's log-probs == the evaluator's scores
    assert min(draws.pad_fraction) > 0.1  # the pad id 0 inside responses, often
    table = cv.markdown_table(rows)
    assert table.count("\n") == 7 and "coverage_t" in table and "bias_z" in table


def test_the_sampler_draws_responses_with_the_scored_probabilities():
    population = cv.make_population(size=6)
    for name in ("near", "pad_heavy"):
        p, q = cv.make_pair(**cv.PAIRS[name])
        for model in (p, q):
            assert cv.sampler_frequencies(model, population, 3000, jax.random.key(3)) > 1e-3
    # the test has power: q's samples against p's probabilities fail it
    p, q = cv.make_pair(**cv.PAIRS["near"])
    assert cv.sampler_frequencies(q, population, 3000, jax.random.key(3), scored_by=p) < 1e-6


def test_bias_z_and_coverage_catch_an_injected_bias():
    rng = np.random.default_rng(0)
    values = 1.0 + 0.1 * rng.standard_normal(1000)
    stderrs = np.full(1000, 0.1)
    assert abs(cv.bias_z(values, 1.0)) < 3
    assert cv.bias_z(values - 0.013, 1.0) < -3  # 1.3% low, as issue 17 reported
    assert cv.coverage(values, stderrs, 40, 1.0, "normal") == pytest.approx(0.95, abs=0.02)
    # stderr 10% too small: the normal interval under-covers, t (P = 10) compensates partly
    assert cv.coverage(values, 0.9 * stderrs, 10, 1.0, "normal") < 0.94
    row = dict(pair="x", prompts=40, estimate="plain/js", coverage_t=0.95)
    assert cv.failures([dict(row, bias_z=-1.0)], 3.0, 0.94) == []
    assert cv.failures([dict(row, bias_z=-3.5)], 3.0, 0.94)[0][3] == "bias z -3.50"
    assert cv.failures([dict(row, bias_z=0.0, coverage_t=0.9)], 3.0, 0.94)


@pytest.mark.slow
def test_estimators_are_unbiased_and_t_intervals_cover_at_a_small_size():
    """400 seeds x 40 prompts x 4 samples, pad-heavy pair (~30 s on 2 cores). Limits: |z| < 3.5
    over 6 correlated estimates (a 1.3% bias would give |z| ~ 3 to 6 here); coverage >= 92%
    (the binomial sd of 400 seeds at 95% is 1.1%)."""
    _, _, rows = cv.run_setting(cv.Setting("pad_heavy", 40, 4, 400, 100, seed=1))
    assert cv.failures(rows, z_max=3.5, min_coverage=0.92) == [], cv.markdown_table(rows)

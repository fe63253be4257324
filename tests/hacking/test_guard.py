"""Tests of thack_jax.hacking.guard: the online guard and the record of what it saw."""

import json
import logging

import numpy as np
import pytest

from thack_jax.hacking import diagnostics as d
from thack_jax.hacking import guard as g
from thack_jax.hacking.simulation import CurveSpec, simulate_curve


def _curve(kind="power_law", noise=0.03, seed=0, **kwargs):
    return simulate_curve(np.random.default_rng(seed), kind, CurveSpec(noise=noise, **kwargs))


def test_guard_matches_offline_detector_and_round_trips(caplog):
    steps, values, stderrs = _curve("flatten", seed=7)
    offline = d.detect_deviation(steps, values, stderrs)
    guard = g.HackingGuard(mode="warn")
    results = []
    with caplog.at_level(logging.WARNING, logger="thack_jax.hacking.guard"):
        for step, value, se in zip(steps, values, stderrs, strict=True):
            results.append(guard.update(step, value, se))
            if step == steps[19]:  # checkpoint the guard mid-run, JSON like the trainer would
                saved = json.dumps(guard.state_dict())
    np.testing.assert_allclose([r.statistic for r in results], offline.statistic)
    fired = [r.fired for r in results]
    assert fired.index(True) == list(steps).index(offline.step)
    assert not any(r.should_stop for r in results)  # 'warn' never stops
    assert len([r for r in caplog.records if "deviates" in r.getMessage()]) == 1
    assert results[-1].best_step == d.best_step_oracle_free(steps, values, stderrs)

    restored = g.HackingGuard(mode="stop")
    restored.load_state_dict(json.loads(saved))
    resumed = [
        restored.update(*row) for row in zip(steps[20:], values[20:], stderrs[20:], strict=True)
    ]
    np.testing.assert_allclose([r.statistic for r in resumed], offline.statistic[20:])
    assert [r.should_stop for r in resumed] == fired[20:]


def test_guard_rejects_bad_updates():
    with pytest.raises(ValueError, match="mode='halt'"):
        g.HackingGuard(mode="halt")
    guard = g.HackingGuard()
    guard.update(100, 1.0, 0.01)
    with pytest.raises(ValueError, match="every update or at none"):
        guard.update(200, 0.9)
    with pytest.raises(ValueError, match="strictly increasing"):
        guard.update(100, 0.9, 0.01)
    with pytest.raises(ValueError, match="index 1, step 200, value -0.5"):
        guard.update(200, -0.5, 0.01)
    assert guard.state_dict() == {
        "steps": [100],
        "proxy": [1.0],
        "proxy_stderr": [0.01],
        "per_prompt": [],
    }
    assert guard.update(200, 0.9, 0.01).best_step == 200  # still usable after the errors
    with pytest.raises(ValueError, match="lacks"):
        guard.load_state_dict({"steps": []})


def test_fit_start_step():
    assert g.fit_start_step(0) == 1
    assert g.fit_start_step(50) == 50


def test_guard_settings_round_trip(tmp_path):
    path = tmp_path / g.GUARD_FILE
    assert g.load_guard_settings(str(path)) is None  # a run written before the file existed
    settings = g.guard_settings(50, "proxy/forward_kl", d.DetectorConfig())
    path.write_text(json.dumps(settings))
    loaded = g.load_guard_settings(str(path))
    assert loaded == settings and loaded["detector"]["threshold"] == 2.8
    assert loaded["use_stderr"] is False
    for bad, message in (("[1]", "'min_step' is None"), ("{", "cannot read guard settings")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            g.load_guard_settings(str(path))


def test_guard_with_per_prompt_values_uses_their_covariance():
    """Per-prompt values shared by every evaluation: the guard's statistic is the detector's
    with `noise.log_mean_cov` of those values, and survives a JSON round trip."""
    from thack_jax.hacking import noise

    rng = np.random.default_rng(8)
    steps = np.rint(np.geomspace(50, 1500, 16))  # the guard keeps integer steps
    prompt_effect = rng.normal(0, 0.5, 32)
    per_prompt = [
        10
        * s**-0.5
        * np.exp(prompt_effect * (1 + 0.1 * np.log(s / 50)) + 0.01 * rng.normal(size=32))
        for s in steps
    ]
    proxy = np.array([row.mean() for row in per_prompt])
    guard = g.HackingGuard()
    for k, (step, value, row) in enumerate(zip(steps, proxy, per_prompt, strict=True)):
        result = guard.update(step, value, per_prompt=row)
        if k == 9:
            saved = json.dumps(guard.state_dict())
    cov = noise.log_mean_cov(np.array(per_prompt))
    expected = d.deviation_statistic(steps, proxy, noise_cov=cov)
    np.testing.assert_allclose(result.statistic, expected[-1])
    scatter = d.deviation_statistic(steps, proxy)
    assert not np.allclose(expected[7:], scatter[7:])  # the covariance changes the statistic
    restored = g.HackingGuard()
    restored.load_state_dict(json.loads(saved))
    for step, value, row in zip(steps[10:], proxy[10:], per_prompt[10:], strict=True):
        resumed = restored.update(step, value, per_prompt=row)
    assert resumed.statistic == result.statistic
    with pytest.raises(ValueError, match="give per_prompt at every update or at none"):
        restored.update(2000, 0.1)
    with pytest.raises(ValueError, match="per_prompt for 1 of 2 steps"):
        g.HackingGuard().load_state_dict(
            {"steps": [1, 2], "proxy": [1.0, 0.9], "proxy_stderr": [], "per_prompt": [[1.0, 2.0]]}
        )


def _guard_history(curve, per_prompt=None):
    """Feeds a curve (steps, values, stderrs or None) to a guard, one update at a time:
    (best_step of each update, candidate_steps() after each update)."""
    steps, values, stderrs = curve
    guard, bests, candidates = g.HackingGuard(), [], []
    for k, step in enumerate(steps):
        result = guard.update(
            step,
            values[k],
            None if stderrs is None else stderrs[k],
            None if per_prompt is None else per_prompt[k],
        )
        bests.append(result.best_step)
        candidates.append(guard.candidate_steps())
    return [int(s) for s in steps], bests, candidates


def _random_curves(rng, count):
    """Curves of every kind, noise level, spacing and noise correlation, half of them
    without stderrs (the scatter model)."""
    for i in range(count):
        spec = CurveSpec(
            n_points=int(rng.integers(10, 45)),
            noise=float(rng.choice([0.005, 0.02, 0.05])),
            break_fraction=float(rng.uniform(0.2, 0.8)),
            slow_factor=float(rng.uniform(0.0, 0.6)),
            spacing=str(rng.choice(["linear", "log"])),
            noise_corr=float(rng.choice([0.0, 0.7])),
        )
        steps, values, stderrs = simulate_curve(rng, ("power_law", "flatten", "rise")[i % 3], spec)
        yield np.rint(steps), values, stderrs if i % 2 else None


def _check_candidates(steps, bests, candidates, window_plus_patience):
    """Every best_step returned at update u was a candidate at every update from the one
    that made its evaluation to u; the candidate sets stay small."""
    for u, best in enumerate(bests):
        for t in range(steps.index(best), u + 1):
            assert best in candidates[t], (steps, bests, candidates, u, t)
    assert max(len(c) for c in candidates) <= window_plus_patience


def test_candidate_steps_hold_every_later_best_step():
    """Brute force over random curves: the guard never returns as best_step an evaluation
    that candidate_steps() had dropped, and it keeps at most window + patience of them."""
    rng = np.random.default_rng(0)
    config = d.DetectorConfig()
    moved = fired = 0
    for curve in _random_curves(rng, 150):
        steps, bests, candidates = _guard_history(curve)
        _check_candidates(steps, bests, candidates, config.window + config.patience)
        moved += len(set(bests)) > 3
        fired += bests[-1] != steps[int(np.argmin(curve[1]))]
    assert moved > 50 and fired > 20  # the property was exercised, not vacuous


def test_candidate_steps_with_per_prompt_covariance():
    """The same with the default noise model: per-prompt values shared by all evaluations."""
    rng = np.random.default_rng(1)
    config = d.DetectorConfig()
    fired = 0
    for i in range(12):
        steps = np.rint(np.geomspace(50, 1500, 24))
        effect = rng.normal(0, 0.5, 16)
        hacked = steps > steps[int(rng.integers(8, 20))] if i % 2 else np.zeros(24, bool)
        slope = np.where(hacked, 0.1, 0.5)  # the proxy flattens after the break
        level = np.cumsum(np.r_[0, -slope[1:] * np.diff(np.log(steps))])
        per_prompt = [
            np.exp(lv + effect * (1 + 0.1 * np.log(s / 50)) + 0.02 * rng.normal(size=16))
            for s, lv in zip(steps, level, strict=True)
        ]
        proxy = np.array([row.mean() for row in per_prompt])
        steps_, bests, candidates = _guard_history((steps, proxy, None), per_prompt)
        _check_candidates(steps_, bests, candidates, config.window + config.patience)
        fired += bests[-1] != steps_[int(np.argmin(proxy))]
    assert fired >= 3


def test_candidate_indices_bounds():
    config = d.DetectorConfig()  # threshold 2.8, patience 2, window 3
    nan = [np.nan] * 7
    values = np.linspace(2.0, 1.0, 12)
    assert g.candidate_indices([], [], config) == set()
    assert g.HackingGuard().candidate_steps() == set()
    # Nothing above the threshold: the lowest proxy and the last `window` evaluations.
    quiet = nan + [0.0, 1.0, -1.0, 0.5, 0.2]
    assert g.candidate_indices(quiet, values[::-1], config) == {0, 9, 10, 11}
    # One trailing exceedance: a firing at the next evaluation would keep index 11 - 3.
    assert g.candidate_indices(quiet[:-1] + [3.0], values, config) == {8, 9, 10, 11}
    # Fired at indices 8-9 (kept: 5); later evaluations change nothing.
    fired = nan + [1.0, 3.0, 3.0, 3.0, 0.0]
    assert g.candidate_indices(fired, values, config) == {5}
    # Index 8 within the margin of the threshold: rounding may move the firing to 9-10.
    close = nan + [1.0, 2.8 + 1e-9, 3.0, 3.0, 0.0]
    assert g.candidate_indices(close, values, config) == {5, 6}
    assert g.candidate_indices(close, values, config, margin=0.0) == {5}

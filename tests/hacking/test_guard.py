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

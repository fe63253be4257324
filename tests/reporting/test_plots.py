"""Tests of reporting.plots: every plot writes a non-empty PNG (matplotlib only, seconds)."""

import numpy as np
from test_diagnostics import _curve, _u_golden

from thack_jax.hacking import diagnostics as d
from thack_jax.reporting import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 5000


def test_plot_curves(tmp_path):
    rng = np.random.default_rng(8)
    steps, proxy, proxy_se = _curve("flatten", seed=8)
    golden, _ = _u_golden(steps, 0.4 * steps[-1], 0.005, rng)
    runs = {
        "offline": {"steps": steps, "proxy": proxy, "proxy_stderr": proxy_se, "golden": golden},
        "online": dict(zip(("steps", "proxy"), _curve(seed=9)[:2], strict=True)),
    }
    plots.plot_curves(tmp_path / "both.png", runs)
    plots.plot_curves(
        tmp_path / "one.png", {"online": runs["online"]}, {"online": {"flag_step": None}}
    )
    for name in ("both.png", "one.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def _bands(seed):
    """Two seeds of an offline group (mean, min-max) and one online run (+- stderr), with a
    step-0 evaluation that log axes must skip."""
    rng = np.random.default_rng(seed)
    steps = np.concatenate([[0.0], 100.0 * np.arange(1, 21)])
    seeds = [1.0 / np.sqrt(steps + 50) + 0.01 * rng.random(21) for _ in range(2)]
    stacked = np.stack(seeds)
    offline = plots.Band(steps, stacked.mean(0), stacked.min(0), stacked.max(0), tuple(seeds))
    online_values = 1.0 / np.sqrt(steps + 80)
    online = plots.Band(steps, online_values, 0.98 * online_values, 1.02 * online_values)
    return {"offline": offline, "online": online}


def test_report_plots(tmp_path):
    proxy, golden = _bands(0), _bands(1)
    groups = {name: {"proxy": proxy[name], "golden": golden[name]} for name in proxy}
    plots.plot_vs_step(tmp_path / "vs_step.png", groups, "forward_kl")
    pairs = {name: (proxy[name], golden[name]) for name in proxy}
    plots.plot_proxy_golden(tmp_path / "pg.png", {"forward_kl": pairs})
    plots.plot_proxy_golden(tmp_path / "grid.png", {"reverse_kl": pairs, "js": pairs})
    steps, values, stderrs = _curve("flatten", noise=0.02, seed=4)
    v = d.verdict(steps, values, stderrs)
    assert v.details["flag_step"] is not None
    runs = {
        "hacked": {
            "steps": steps,
            "proxy": values,
            "proxy_stderr": stderrs,
            "min_step": 1600,
        },
        "field": {"steps": steps, "proxy": values, "proxy_stderr": stderrs, "min_step": None},
        "short": {"steps": steps[:2], "proxy": values[:2], "proxy_stderr": None},
    }
    fit = dict(v.details["fit"], flag_step=v.details["flag_step"])
    fits = {"hacked": fit, "short": {}, "field": fit}
    plots.plot_power_law_grid(tmp_path / "law.png", runs, fits)
    for name in ("vs_step.png", "pg.png", "grid.png", "law.png"):
        assert _is_png(tmp_path / name), name


def test_field_mode_plots(tmp_path):
    """Field mode: the proxy alone vs step, the proxy against the reference cross-entropy,
    and the reference cross-entropy with the teacher's and oracle's levels."""
    proxy, ref = _bands(0), _bands(1)
    plots.plot_vs_step(tmp_path / "proxy.png", {k: {"proxy": b} for k, b in proxy.items()}, "js")
    pairs = {name: (proxy[name], ref[name]) for name in proxy}
    plots.plot_proxy_golden(
        tmp_path / "pr.png", {"js": pairs}, y_name="reference CE", y_label="reference/x"
    )
    plots.plot_reference(tmp_path / "ref.png", ref, [("teacher 0.05", 0.05), ("oracle 0.02", 0.02)])
    plots.plot_reference(tmp_path / "no_levels.png", {"online": ref["online"]}, [])
    for name in ("proxy.png", "pr.png", "ref.png", "no_levels.png"):
        assert _is_png(tmp_path / name), name

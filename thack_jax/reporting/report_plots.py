"""The plots of report.md: which curves of which runs go into which PNG (plots.py draws).

Oracle mode: proxy and golden vs step, the proxy-golden curves (the report's divergence and
all of them), with the reference levels as horizontal lines (levels.py), the power-law fit
of each run's proxy. Field mode (no oracle): the proxy vs
step, the proxy-reference curve when the runs have reference metrics, the power-law fits.
Either mode, when the runs have `reference/cross_entropy`: it vs step, with the teacher's
(and oracle's) constant level. Group bands as in report.py's docstring.
"""

from __future__ import annotations

import functools

import numpy as np

from thack_jax.core import storage
from thack_jax.reporting import levels, plots, reference

DIVERGENCES = ("forward_kl", "reverse_kl", "js")


def band(runs: list, key: str) -> plots.Band:
    """One run: its curve of `key` +- `key_stderr`; several seeds: mean with min-max on the
    steps every seed evaluated."""
    if len(runs) == 1:
        r = runs[0]
        value, se = r.metrics[key], r.metrics.get(f"{key}_stderr", np.zeros(len(r.steps)))
        return plots.Band(r.steps.astype(float), value, value - se, value + se)
    common = functools.reduce(np.intersect1d, [r.steps for r in runs])
    values = np.stack([r.metrics[key][np.searchsorted(r.steps, common)] for r in runs])
    lo, hi = values.min(0), values.max(0)
    return plots.Band(common.astype(float), values.mean(0), lo, hi, tuple(values))


def _members(table, with_reference: bool = False) -> dict:
    """group label -> member indices; groups without common steps are left out (seeds are
    drawn on their common steps), and with_reference: groups a member of which has no
    reference analysis."""
    out = {}
    for g in table.groups:
        runs = [table.runs[i] for i in g.members]
        if not functools.reduce(np.intersect1d, [r.steps for r in runs]).size:
            continue
        if with_reference and any(table.analyses[i]["reference"] is None for i in g.members):
            continue
        out[g.label] = g.members
    return out


def _golden_plots(paths, table, metric) -> None:
    runs, members = table.runs, _members(table)
    bands = {
        div: {
            k: (
                band([runs[i] for i in v], f"proxy/{div}"),
                band([runs[i] for i in v], f"golden/{div}"),
            )
            for k, v in members.items()
        }
        for div in DIVERGENCES
        if all(f"{p}/{div}" in r.metrics for r in runs for p in ("proxy", "golden"))
    }
    by_group = {k: {"proxy": p, "golden": g} for k, (p, g) in bands[metric].items()}
    # The reference levels: with the oracle's entropy against steps (the scale of the
    # divergences); the teacher's and the initial student's alone on the proxy-golden axes.
    step_lines = {"golden": levels.plot_lines(table, members, metric, with_entropy=True)}
    plots.plot_vs_step(paths[0], by_group, metric, levels=step_lines)
    lines = {div: levels.plot_lines(table, members, div, with_entropy=False) for div in bands}
    plots.plot_proxy_golden(paths[1], {metric: bands[metric]}, levels=lines)
    plots.plot_proxy_golden(paths[2], bands, levels=lines)


def _power_law(path, table, metric, oracle: bool) -> None:
    law_runs, fits = {}, {}
    for run, label, a in zip(table.runs, table.labels, table.analyses, strict=True):
        keep = run.steps >= 1
        ref = a.get("reference")
        law_runs[label] = {
            "steps": run.steps[keep],
            "proxy": run.metrics[f"proxy/{metric}"][keep],
            "proxy_stderr": run.metrics[f"proxy/{metric}_stderr"][keep],
            "min_step": a["golden_min_step"] if oracle else ref and ref["min_step"],
            "min_label": "golden min" if oracle else "reference CE min",
        }
        fits[label] = dict(a.get("fit") or {}, flag_step=a["flag_step"])
    plots.plot_power_law_grid(path, law_runs, fits)


def _levels(table, members: dict, oracle: bool) -> list[tuple[str, float]]:
    """The distinct teacher (and oracle) levels of the groups drawn, as (label, value)."""
    levels = {}
    roles = ("teacher", "oracle") if oracle else ("teacher",)
    for indices in members.values():
        for i in indices:
            ref = table.analyses[i]["reference"]
            for role in roles:
                if ref[role] is not None:
                    levels.setdefault(f"{role} {ref[role]:.4g}", ref[role])
    return list(levels.items())


def write_plots(out_dir: str, table, metric: str) -> list[tuple[str, str]]:
    """Writes the PNGs of `table` (report_text.ReportRuns) into `out_dir/plots/`; returns
    their (file name, title) pairs in report order."""
    storage.makedirs(storage.join(out_dir, "plots"))
    oracle = reference.report_mode(table.analyses) == "oracle"
    ref_members = _members(table, with_reference=True)
    ref_bands = {
        k: band([table.runs[i] for i in v], reference.REFERENCE) for k, v in ref_members.items()
    }
    if oracle:
        files = [
            (f"{metric}_vs_step.png", f"Proxy and golden {metric} vs step (log-log)"),
            (f"proxy_golden_{metric}.png", f"Proxy-golden curves ({metric})"),
            ("proxy_golden_all.png", "Proxy-golden curves, every divergence"),
        ]
        _golden_plots([storage.join(out_dir, "plots", f) for f, _ in files], table, metric)
    else:
        files = [(f"{metric}_vs_step.png", f"Proxy {metric} vs step (log-log)")]
        members = _members(table)
        proxy = {
            k: {"proxy": band([table.runs[i] for i in v], f"proxy/{metric}")}
            for k, v in members.items()
        }
        plots.plot_vs_step(storage.join(out_dir, "plots", files[0][0]), proxy, metric)
        if ref_bands:
            name = f"proxy_reference_{metric}.png"
            files.append((name, f"Proxy-reference cross-entropy curves ({metric})"))
            pairs = {k: (proxy[k]["proxy"], ref_bands[k]) for k in ref_bands}
            plots.plot_proxy_golden(
                storage.join(out_dir, "plots", name),
                {metric: pairs},
                y_name="reference CE",
                y_label=reference.REFERENCE,
            )
    files.append((f"power_law_{metric}.png", f"Power-law fit of each run's proxy ({metric})"))
    _power_law(storage.join(out_dir, "plots", files[-1][0]), table, metric, oracle)
    if ref_bands:
        named = "the teacher's and the oracle's levels" if oracle else "the teacher's level"
        files.append(("reference_cross_entropy.png", f"Reference cross-entropy vs step, {named}"))
        path = storage.join(out_dir, "plots", files[-1][0])
        plots.plot_reference(path, ref_bands, _levels(table, ref_members, oracle))
    return files

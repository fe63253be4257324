"""PNG plots of proxy and golden curves, shared by `launch/diagnose.py` and `report.py`.

numpy + matplotlib only (no jax). Figures are bare `matplotlib.figure.Figure`s saved as PNG,
which renders with the Agg backend and leaves pyplot's global backend alone. A figure is
rendered into memory and written with `storage.write_atomic`, so a path may be gs://...
Curves are 1-D arrays over evaluations, `[n]`.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath

import numpy as np

from thack_jax.core import storage
from thack_jax.hacking.diagnostics import verdict


@dataclasses.dataclass(frozen=True)
class Band:
    """A curve with an uncertainty band, all [n]: the mean over seeds with the min-max over
    seeds, or one run with +- its stderr. `seeds` holds each seed's values ([n] each) when
    there are several, for faint per-seed lines."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    seeds: tuple = ()


def _figure(n_panels: int, width: float = 4.5, height: float = 4.0, max_cols: int = 3):
    """A grid of `n_panels` axes, each about width x height inches."""
    from matplotlib.figure import Figure

    cols = min(n_panels, max_cols)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    # Fixed margins in inches: tight_layout would double the drawing time of a report.
    w, h = width * cols, height * rows
    fig.subplots_adjust(
        left=1.0 / w, right=1 - 0.2 / w, bottom=0.6 / h, top=1 - 0.4 / h, wspace=0.4, hspace=0.45
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path_png, dpi: int = 110) -> None:
    """Writes the figure to `path_png` (local or remote) in the format its suffix names, as
    `savefig(path)` would (PNG without a suffix)."""
    suffix = posixpath.splitext(str(path_png))[1][1:].lower()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=suffix or "png", dpi=dpi)
    storage.write_atomic(path_png, buffer.getvalue())


def draw_power_law(ax, name, steps, proxy, proxy_stderr, fit: dict, color) -> None:
    """Proxy points [n] with error bars, the fitted law `exp(log_a) * step**-b` (solid on the
    `fit['n']` fitted evaluations, dashed where extrapolated) and the flag step, if any."""
    ax.errorbar(steps, proxy, yerr=proxy_stderr, fmt="o", ms=3, color=color, label=name)
    if "log_a" in fit:
        law = np.exp(fit["log_a"] - fit["b"] * np.log(steps))
        n_fit = fit.get("n", len(steps))
        ax.plot(steps[:n_fit], law[:n_fit], "-", color=color, label=f"{name}: step^-{fit['b']:.3g}")
        ax.plot(steps[n_fit - 1 :], law[n_fit - 1 :], "--", color=color)
    if fit.get("flag_step") is not None:
        ax.axvline(fit["flag_step"], color=color, ls=":", label=f"{name}: flagged")


def plot_curves(path_png, runs: dict, fits: dict | None = None) -> None:
    """Writes a PNG: proxy vs step (log-log) with the fitted law and the flag step; and, when
    any run has `golden`, the proxy-golden curve (golden on y, proxy on x).

    Args:
      runs: name -> dict(steps [n], proxy [n], optional proxy_stderr [n], golden [n]).
      fits: name -> dict(log_a, b, n = evaluations fitted, flag_step) to draw, e.g.
        `verdict(...).details["fit"]` plus its "flag_step"; runs absent from it are analysed
        here with `verdict`.
    """
    from matplotlib.figure import Figure

    fits = dict(fits or {})
    with_golden = any(run.get("golden") is not None for run in runs.values())
    fig = Figure(figsize=(12 if with_golden else 6, 4.5))
    axes = fig.subplots(1, 2 if with_golden else 1, squeeze=False)
    ax = axes[0, 0]
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps, proxy = np.asarray(run["steps"], float), np.asarray(run["proxy"], float)
        if name not in fits:
            details = verdict(steps, proxy, run.get("proxy_stderr")).details
            fits[name] = dict(details.get("fit", {}), flag_step=details["flag_step"])
        draw_power_law(ax, name, steps, proxy, run.get("proxy_stderr"), fits[name], color)
        if run.get("golden") is not None:
            axes[0, 1].plot(proxy, run["golden"], "o-", ms=3, color=color, label=name)
            i_min = int(np.argmin(run["golden"]))
            axes[0, 1].plot(proxy[i_min], run["golden"][i_min], "*", ms=12, color=color)
    ax.set(xscale="log", yscale="log", xlabel="step", ylabel="proxy", title="proxy vs step")
    ax.legend(fontsize=7)
    if with_golden:
        axes[0, 1].set(xlabel="proxy", ylabel="golden", title="proxy-golden curve (* = golden min)")
        axes[0, 1].invert_xaxis()  # training runs left to right, as the proxy falls
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path_png, dpi=120)


# Who each curve of `plot_vs_step` compares with the student.
VS = {"proxy": "teacher", "golden": "oracle"}


def draw_levels(ax, lines) -> None:
    """Horizontal lines of constant levels: (label, value, line style) triples."""
    for label, value, style in lines or ():
        ax.axhline(value, color="0.2", ls=style, lw=1.1, label=label)


def plot_vs_step(path_png, groups: dict, metric: str, levels: dict | None = None) -> None:
    """Proxy and golden (field mode: the proxy alone) against steps, log-log, one colour per
    group, with bands.

    Args: groups: group name -> {"proxy": Band, "golden": Band} (or {"proxy": Band}); one
    panel per key. Only steps > 0 are drawn (a log axis has no step 0). levels: panel key
    (e.g. "golden") -> (label, value, line style) triples drawn as horizontal lines (the
    reference levels, levels.py)."""
    keys = tuple(next(iter(groups.values()))) if groups else ("proxy",)
    fig, axes = _figure(len(keys), width=6.0, height=4.5)
    for i, (name, bands) in enumerate(groups.items()):
        for ax, key in zip(axes, keys, strict=True):
            band = bands[key]
            keep = band.steps > 0
            steps = band.steps[keep]
            for seed in band.seeds:
                ax.plot(steps, np.asarray(seed)[keep], "-", lw=0.6, alpha=0.35, color=f"C{i % 10}")
            ax.plot(steps, band.mean[keep], "o-", ms=2.5, color=f"C{i % 10}", label=name)
            ax.fill_between(steps, band.lo[keep], band.hi[keep], color=f"C{i % 10}", alpha=0.2)
    for ax, key in zip(axes, keys, strict=True):
        draw_levels(ax, (levels or {}).get(key))
        ax.set(xscale="log", yscale="log", xlabel="step", ylabel=f"{key}/{metric}")
        ax.set_title(f"{key} ({VS[key]} vs student) vs step")
        ax.legend(fontsize=7)
    _save(fig, path_png)


def plot_reference(path_png, groups: dict, levels: list) -> None:
    """The reference cross-entropy against steps (log step axis, linear values), one colour
    per group with its band, and the constant levels as horizontal lines.

    Args:
      groups: group name -> Band of `reference/cross_entropy`. Only steps > 0 are drawn.
      levels: (label, value) pairs, e.g. ("teacher 1.234", 1.234); teacher levels dashed,
        the others (the oracle's) dotted.
    """
    fig, (ax,) = _figure(1, width=7.0, height=5.0)
    for i, (name, band) in enumerate(groups.items()):
        keep = band.steps > 0
        steps, color = band.steps[keep], f"C{i % 10}"
        for seed in band.seeds:
            ax.plot(steps, np.asarray(seed)[keep], "-", lw=0.6, alpha=0.35, color=color)
        ax.plot(steps, band.mean[keep], "o-", ms=2.5, color=color, label=name)
        ax.fill_between(steps, band.lo[keep], band.hi[keep], color=color, alpha=0.2)
    for label, value in levels:
        style = "--" if label.startswith("teacher") else ":"
        ax.axhline(value, color="0.2", ls=style, lw=1.2, label=label)
    ax.set(xscale="log", xlabel="step", ylabel="reference/cross_entropy (nats per response)")
    ax.set_title("student's reference cross-entropy vs step; lines: constant levels")
    ax.legend(fontsize=7)
    _save(fig, path_png)


def _draw_proxy_golden(ax, i, name, proxy: Band, golden: Band) -> None:
    color = f"C{i % 10}"
    for p, g in zip(proxy.seeds, golden.seeds, strict=True):
        ax.plot(p, g, "-", lw=0.6, alpha=0.35, color=color)
    x, y = proxy.mean, golden.mean
    ax.plot(x, y, ".-", ms=3, lw=1.0, color=color, label=name)
    # Arrows on a few segments show the direction of training.
    for j in np.unique(np.linspace(0, len(x) - 2, 5).astype(int)) if len(x) > 1 else []:
        ax.annotate(
            "",
            xy=(x[j + 1], y[j + 1]),
            xytext=(x[j], y[j]),
            arrowprops=dict(arrowstyle="->", color=color, lw=1.2),
        )
    ax.plot(x[0], y[0], "o", ms=7, mfc="none", color=color)
    ax.plot(x[-1], y[-1], "s", ms=6, color=color)
    i_min = int(np.nanargmin(y))  # nan: an evaluation without the y metric
    ax.plot(x[i_min], y[i_min], "*", ms=12, color=color)


def plot_proxy_golden(
    path_png, panels: dict, y_name="golden", y_label=None, levels: dict | None = None
) -> None:
    """Golden (y) against proxy (x), one panel per divergence, one colour per group.

    Args: panels: panel title (e.g. the divergence) -> group name -> (proxy Band, golden
    Band); y_name, y_label: what the y Bands are (field mode: "reference CE",
    "reference/cross_entropy"; default: "golden", "golden/<title>"). Markers: o = first
    evaluation, square = last, * = y minimum; arrows point along training. Both axes are
    logarithmic (the late part of training, where a U shows, spans little of the range);
    the proxy axis is inverted, so training runs left to right. levels: panel title ->
    (label, value, line style) triples of constant y levels (as in `plot_vs_step`)."""
    big = len(panels) == 1
    fig, axes = _figure(len(panels), width=7.0 if big else 4.5, height=5.5 if big else 4.0)
    for ax, (title, groups) in zip(axes, panels.items(), strict=True):
        for i, (name, (proxy, golden)) in enumerate(groups.items()):
            _draw_proxy_golden(ax, i, name, proxy, golden)
        draw_levels(ax, (levels or {}).get(title))
        ylabel = y_label or f"golden/{title}"
        ax.set(xscale="log", yscale="log", xlabel=f"proxy/{title}", ylabel=ylabel)
        ax.set_title(f"{title}: o start, \u25a0 end, * {y_name} min", fontsize=9)
        ax.invert_xaxis()
        ax.legend(fontsize=6)
    _save(fig, path_png)


def plot_power_law_grid(path_png, runs: dict, fits: dict) -> None:
    """One panel per run: its proxy (steps > 0) with the power law the detector fitted, the
    flag step (dotted) and the golden minimum (grey dash-dot; field mode: the reference
    cross-entropy's, or none).

    Args:
      runs: name -> dict(steps [n], proxy [n], proxy_stderr [n] or None, min_step (None:
        no line), min_label (default "golden min")).
      fits: name -> dict(log_a, b, n, flag_step), as in `plot_curves`.
    """
    fig, axes = _figure(len(runs), width=4.2, height=3.4)
    for i, (ax, (name, run)) in enumerate(zip(axes, runs.items(), strict=True)):
        steps = np.asarray(run["steps"], float)
        se = run.get("proxy_stderr")
        draw_power_law(
            ax, name, steps, np.asarray(run["proxy"], float), se, fits[name], f"C{i % 10}"
        )
        if run.get("min_step") is not None:
            label = run.get("min_label", "golden min")
            ax.axvline(run["min_step"], color="0.5", ls="-.", label=label)
        ax.set(xscale="log", yscale="log", xlabel="step", ylabel="proxy")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    _save(fig, path_png)

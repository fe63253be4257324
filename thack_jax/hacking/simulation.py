"""Synthetic proxy curves: calibration of the detector threshold and the rates table of
docs/diagnostics.md (sections 3 and 9).

numpy only (no jax). Curves are (steps [n], values [n], stderrs [n]) as in `diagnostics`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from thack_jax.core import checks
from thack_jax.hacking.diagnostics import DetectorConfig, deviation_statistic, verdict

CURVE_KINDS = ("power_law", "flatten", "rise")
SPACINGS = ("linear", "log")


def eval_steps(n_points, eval_every=100, spacing="linear", first_step=50) -> np.ndarray:
    """Evaluation steps [n_points] of a simulated run of `eval_every * n_points` steps."""
    last = eval_every * n_points
    if spacing == "linear":
        return eval_every * np.arange(1, n_points + 1, dtype=np.float64)
    if spacing == "log":
        return np.geomspace(first_step, last, n_points)
    raise ValueError(f"spacing={spacing!r}; expected 'linear' or 'log'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurveSpec:
    """How `simulate_curve` draws a curve (all but its kind), checked when it is made.

    Log-normal noise of std `noise` on log value (stderr = noise * value). 'power_law':
    `10 * step**-b`; 'flatten': the exponent drops to `slow_factor * b` after
    `break_fraction` of the run's last step (teacher hacking); 'rise': the proxy grows as
    step**(b/2) after the break (overfitting). Steps: `spacing='linear'` evaluates every
    `eval_every` steps; `'log'` evaluates at n_points steps evenly spaced in log(step) from
    `first_step` to `eval_every * n_points` (the experiment's EvalConfig.log_points).
    `noise_corr`: lag-1 correlation of the noise from one evaluation to the next (an AR(1)
    process with the same marginal std), as when every evaluation reuses the same prompts.
    """

    n_points: int = 40
    noise: float = 0.03
    b: float = 0.5
    break_fraction: float = 0.4
    slow_factor: float = 0.2
    eval_every: int = 100
    spacing: str = "linear"
    first_step: float = 50
    noise_corr: float = 0.0

    def __post_init__(self):
        checks.choice(self, "spacing", SPACINGS)
        checks.integer(self, "n_points", 1)
        checks.number(self, "noise", 0)
        checks.number(self, "noise_corr", -1, 1)
        for name in ("break_fraction", "eval_every", "first_step"):
            checks.positive(self, name)


def simulate_curve(rng, kind="power_law", spec: CurveSpec = CurveSpec()):
    """One synthetic proxy curve of `kind` drawn as `spec` says (see `CurveSpec`):
    (steps [n], values [n], stderrs [n]), n = spec.n_points."""
    if kind not in CURVE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {CURVE_KINDS}")
    s, n = spec, spec.n_points
    steps = eval_steps(n, s.eval_every, s.spacing, s.first_step)
    x, x_break = np.log(steps), np.log(s.break_fraction * steps[-1])
    after = np.maximum(x - x_break, 0.0)
    slope_after = {"power_law": s.b, "flatten": s.slow_factor * s.b, "rise": -0.5 * s.b}[kind]
    clean = np.log(10.0) - s.b * np.minimum(x, x_break) - slope_after * after
    eps = rng.standard_normal(n)
    for i in range(1, n):  # AR(1): marginal variance stays 1
        eps[i] = s.noise_corr * eps[i - 1] + np.sqrt(1.0 - s.noise_corr**2) * eps[i]
    values = np.exp(clean + s.noise * eps)
    return steps, values, s.noise * values


def calibrate_threshold(
    fpr=0.05,
    *,
    n_curves=400,
    n_points=40,
    noise=0.03,
    patience=2,
    use_stderr=True,
    seed=0,
    spacing="linear",
) -> float:
    """Threshold whose false-alarm rate over a whole pure-power-law curve is `fpr`: the
    (1 - fpr) quantile, over simulated curves, of the highest level the statistic stays above
    for `patience` consecutive evaluations."""
    rng = np.random.default_rng(seed)
    maxima = np.empty(n_curves)
    for i in range(n_curves):
        spec = CurveSpec(n_points=n_points, noise=noise, spacing=spacing)
        steps, values, stderrs = simulate_curve(rng, "power_law", spec)
        s = deviation_statistic(steps, values, stderrs if use_stderr else None)
        runs = np.lib.stride_tricks.sliding_window_view(np.nan_to_num(s, nan=-np.inf), patience)
        maxima[i] = runs.min(axis=1).max()
    return float(np.quantile(maxima, 1.0 - fpr))


def simulate_rates(
    noise_levels=(0.01, 0.03, 0.1),
    spec: CurveSpec = CurveSpec(),
    *,
    n_curves=200,
    seed=0,
    config: DetectorConfig | None = None,
    use_stderr=True,
    give_cov=False,
) -> list[dict]:
    """Verdict rates on synthetic curves (`simulate_curve` with `spec`, its noise set to each
    of `noise_levels` in turn), one row per noise level:
    false-positive rate (power law labelled anything but healthy), detection rate (flatten
    labelled teacher_hacking), median delays from the break to the flag and to the oracle-free
    best step (in evaluations, flagged flatten curves), and the rate of 'rise' curves labelled
    overfitting. `config` defaults to `DetectorConfig()`. give_cov: the detector is given the
    noise's covariance, noise**2 * noise_corr**|i - j| (then no stderrs)."""
    config = config or DetectorConfig()
    n_points, break_fraction, noise_corr = spec.n_points, spec.break_fraction, spec.noise_corr
    rows = []
    for noise in noise_levels:
        curve = dataclasses.replace(spec, noise=noise)
        rng = np.random.default_rng(seed)
        labels, delays = {}, []  # delays: (flag, best step) - break, in evaluations
        for kind in CURVE_KINDS:
            labels[kind] = []
            for _ in range(n_curves):
                steps, values, stderrs = simulate_curve(rng, kind, curve)
                cov = None
                if give_cov:
                    lags = np.abs(np.subtract.outer(np.arange(n_points), np.arange(n_points)))
                    cov = noise**2 * noise_corr**lags
                stderr = stderrs if use_stderr and not give_cov else None
                v = verdict(steps, values, stderr, config=config, noise_cov=cov)
                labels[kind].append(v.label)
                if kind == "flatten" and v.details["flag_step"] is not None:
                    # In evaluations: from the first evaluation at or after the break.
                    first_after = np.searchsorted(steps, break_fraction * steps[-1] - 1e-9)
                    at = np.searchsorted(steps, [v.details["flag_step"], v.details["best_step"]])
                    delays.append(at - first_after)
        delays = np.median(delays, axis=0) if delays else np.full(2, np.nan)
        rows.append(
            {
                "n_points": n_points,
                "spacing": spec.spacing,
                "noise_corr": noise_corr,
                "noise": noise,
                "stderr_given": "cov" if give_cov else ("yes" if use_stderr else "no"),
                "false_positive_rate": float(np.mean(np.array(labels["power_law"]) != "healthy")),
                "detection_rate": float(np.mean(np.array(labels["flatten"]) == "teacher_hacking")),
                "median_flag_delay": float(delays[0]),
                "median_best_delay": float(delays[1]),
                "overfitting_rate": float(np.mean(np.array(labels["rise"]) == "overfitting")),
            }
        )
    return rows


def format_rates_table(rows) -> str:
    """Markdown table of `simulate_rates` rows."""
    lines = [
        "| evals | spacing | noise (std of log proxy) | noise corr. | noise given "
        "| false positives (power law) "
        "| detected (flatten) | flag - break (evals) | best step - break (evals) "
        "| overfitting (rise) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_points']} | {r['spacing']} | {r['noise']:.3g} | {r['noise_corr']:.2g} "
            f"| {r['stderr_given']} "
            f"| {r['false_positive_rate']:.1%} | {r['detection_rate']:.1%} "
            f"| {r['median_flag_delay']:.1f} | {r['median_best_delay']:.1f} "
            f"| {r['overfitting_rate']:.1%} |"
        )
    return "\n".join(lines)

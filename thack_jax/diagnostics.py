"""Teacher-hacking diagnostics: power-law fit of the proxy curve, deviation detector, verdicts.

numpy / scipy / matplotlib only (no jax), so `launch/diagnose.py` starts fast. A curve is three
1-D arrays over evaluations: `steps [n]` (strictly increasing, > 0), `values [n]` (> 0) and
`stderrs [n]` (>= 0, the standard error of each value) or None. The method, its defaults and
their calibration are described in docs/diagnostics.md.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy import special

# Calibrated by `calibrate_threshold` (docs/diagnostics.md): the 97th percentile of the
# patience-2 maximum of the statistic on pure power law + noise, 40 evaluations, leaving margin
# for longer curves (more evaluations = more chances of a false alarm).
DEFAULT_THRESHOLD = 2.6
DEFAULT_MIN_POINTS = 8
DEFAULT_PATIENCE = 2
DEFAULT_WINDOW = 3  # recent evaluations tested against the extrapolated law
DEFAULT_FIT_FRACTION = 0.5  # the law is fitted on this first fraction of the evaluations seen
OVERFIT_Z = 3.0  # significance of a proxy rise above its running minimum
REL_STDERR_FLOOR = 1e-3  # floor on stderr / value, so no point dominates the weighted fit
RESIDUAL_CLIP = 2.5  # cap on one standardized residual in the tested window
MIN_FIT_POINTS = 3  # 2 parameters + 1 degree of freedom for the residual scale
MODES = ("log", "warn", "stop")


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """`value ~ exp(log_a) * step**-b`; `residual_scale` multiplies the stderrs (or is the
    residual std of log values when no stderrs were given); `cov` is the 2x2 covariance of
    (log_a, b)."""

    log_a: float
    b: float
    residual_scale: float
    n: int
    cov: tuple = ((0.0, 0.0), (0.0, 0.0))

    @property
    def b_stderr(self) -> float:
        return float(np.sqrt(self.cov[1][1]))

    def predict(self, steps) -> np.ndarray:
        return np.exp(self.log_a - self.b * np.log(np.asarray(steps, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class Detection:
    fired: bool
    step: int | None  # the step at which the detector fired (patience-th exceedance)
    statistic: np.ndarray  # [n], nan before enough points
    first_index: int | None = None  # first evaluation of the run of exceedances that fired


@dataclasses.dataclass(frozen=True)
class UShape:
    is_u: bool
    min_step: int
    rise: float  # golden at the end minus golden at its minimum
    rise_stderr: float


@dataclasses.dataclass(frozen=True)
class Verdict:
    label: str  # healthy | teacher_hacking | overfitting | not_converged
    details: dict


@dataclasses.dataclass(frozen=True)
class GuardResult:
    statistic: float
    fired: bool
    should_stop: bool
    best_step: int


def _rows(idx, steps, values) -> str:
    shown = ", ".join(f"(index {i}, step {steps[i]!r}, value {values[i]!r})" for i in idx[:10])
    return shown + (f" and {len(idx) - 10} more" if len(idx) > 10 else "")


def _check_curve(steps, values, stderrs=None, name="values"):
    """Returns float64 arrays (steps [n], values [n], stderrs [n] | None) or raises ValueError."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if steps.ndim != 1 or values.shape != steps.shape:
        raise ValueError(f"steps {steps.shape} and {name} {values.shape} must be 1-D, same length")
    bad = np.flatnonzero(~(np.isfinite(steps) & np.isfinite(values) & (steps > 0) & (values > 0)))
    if bad.size:
        raise ValueError(
            f"steps and {name} must be finite and > 0 for a log-log fit; offending rows: "
            + _rows(bad, steps, values)
        )
    bad = np.flatnonzero(np.diff(steps) <= 0) + 1
    if bad.size:
        raise ValueError("steps must be strictly increasing; offending rows: " + _rows(bad, steps, values))
    if stderrs is not None:
        stderrs = np.asarray(stderrs, dtype=np.float64)
        if stderrs.shape != steps.shape:
            raise ValueError(f"stderrs {stderrs.shape} must match steps {steps.shape}")
        bad = np.flatnonzero(~(np.isfinite(stderrs) & (stderrs >= 0)))
        if bad.size:
            raise ValueError("stderrs must be finite and >= 0; offending rows: " + _rows(bad, steps, stderrs))
    return steps, values, stderrs


def _log_sigma(values, stderrs):
    """Delta-method std of log(value) [n], floored; ones (scale to be estimated) if no stderrs."""
    if stderrs is None:
        return np.ones_like(values)
    return np.maximum(stderrs / values, REL_STDERR_FLOOR)


def _wls(x, y, sig, known_sigma):
    """Weighted least squares of y = log_a - b x [n]. Returns (beta[2], cov[2,2], scale)."""
    design = np.stack([np.ones_like(x), -x], axis=1)
    w = 1.0 / sig**2
    normal = design.T @ (design * w[:, None])
    beta = np.linalg.solve(normal, design.T @ (w * y))
    chi2 = float(np.sum(w * (y - design @ beta) ** 2))
    scale = float(np.sqrt(chi2 / max(len(x) - 2, 1)))
    if known_sigma:  # reported stderrs are a lower bound on the noise: inflate, never shrink
        scale = max(scale, 1.0)
    return beta, scale**2 * np.linalg.inv(normal), scale


def fit_power_law(steps, values, stderrs=None) -> PowerLawFit:
    """Fits `values ~ a * steps**-b` by Huber-robust weighted least squares in log-log space.

    Weights are 1 / (stderr / value)**2 (delta method), with stderr / value floored at
    REL_STDERR_FLOOR. Args: steps [n], values [n], stderrs [n] or None (equal weights).
    """
    steps, values, stderrs = _check_curve(steps, values, stderrs)
    if len(steps) < MIN_FIT_POINTS:
        raise ValueError(f"need at least {MIN_FIT_POINTS} points to fit a power law, got {len(steps)}")
    beta, cov, scale = _wls(np.log(steps), np.log(values), _log_sigma(values, stderrs), stderrs is not None)
    return PowerLawFit(float(beta[0]), float(beta[1]), scale, len(steps), tuple(map(tuple, cov.tolist())))


def _statistic_at(x, y, sig, known_sigma, n, fit_fraction, window) -> float:
    """Standardized deviation of evaluations [n-window, n) from the law fitted on the first
    `fit_fraction * n` evaluations; positive = proxy higher than the law (slower decay)."""
    n_fit = int(fit_fraction * n)
    if n_fit < MIN_FIT_POINTS + 1 or n_fit + window > n:
        return float("nan")
    beta, cov, scale = _wls(x[:n_fit], y[:n_fit], sig[:n_fit], known_sigma)
    test = np.stack([np.ones(window), -x[n - window : n]], axis=1)
    # Covariance of the window's residuals: own noise + the extrapolation error they share.
    resid_cov = np.diag(scale**2 * sig[n - window : n] ** 2) + test @ cov @ test.T
    sd = np.sqrt(np.diag(resid_cov))
    z = (y[n - window : n] - test @ beta) / sd
    if not known_sigma:  # estimated scale: Student t with n_fit - 2 dof, mapped onto z-scores
        z = -special.ndtri(special.stdtr(n_fit - 2, -z))
    # Clipping bounds what one evaluation can add, so a single outlier cannot fire the detector.
    clipped = np.clip(z, -RESIDUAL_CLIP, RESIDUAL_CLIP)
    return float(np.sum(clipped) / np.sqrt(np.sum(resid_cov / np.outer(sd, sd))))


def deviation_statistic(
    steps, values, stderrs=None, *, min_points=DEFAULT_MIN_POINTS,
    fit_fraction=DEFAULT_FIT_FRACTION, window=DEFAULT_WINDOW,
) -> np.ndarray:
    """Per-evaluation deviation statistic [n] (about N(0, 1) on a pure power law; nan at
    evaluations before `min_points`), each using only the evaluations seen so far."""
    steps, values, stderrs = _check_curve(steps, values, stderrs)
    x, y, sig = np.log(steps), np.log(values), _log_sigma(values, stderrs)
    out = np.full(len(steps), np.nan)
    for k in range(max(min_points, 1), len(steps) + 1):
        out[k - 1] = _statistic_at(x, y, sig, stderrs is not None, k, fit_fraction, window)
    return out


def _first_fire(statistic, threshold, patience) -> int | None:
    """Index of the first of `patience` consecutive evaluations above threshold, or None."""
    run = 0
    for i, s in enumerate(statistic):
        run = run + 1 if s > threshold else 0  # nan compares False
        if run >= patience:
            return i - patience + 1
    return None


def detect_deviation(
    steps, values, stderrs=None, threshold=DEFAULT_THRESHOLD, *, patience=DEFAULT_PATIENCE,
    min_points=DEFAULT_MIN_POINTS, fit_fraction=DEFAULT_FIT_FRACTION, window=DEFAULT_WINDOW,
) -> Detection:
    """Fires when the deviation statistic exceeds `threshold` at `patience` consecutive evals."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    statistic = deviation_statistic(
        steps, values, stderrs, min_points=min_points, fit_fraction=fit_fraction, window=window
    )
    first = _first_fire(statistic, threshold, patience)
    if first is None:
        return Detection(False, None, statistic)
    return Detection(True, int(np.asarray(steps)[first + patience - 1]), statistic, first)


def _best_index(values, first_index, window) -> int:
    """The oracle-free checkpoint: the last evaluation before the window that first deviated,
    or, when nothing fired, the lowest proxy."""
    if first_index is None:
        return int(np.argmin(values))
    return max(first_index - window, 0)


def best_step_oracle_free(steps, proxy, proxy_stderr=None, **detector_kwargs) -> int:
    """Step of the checkpoint to keep without an oracle (see `_best_index`)."""
    detection = detect_deviation(steps, proxy, proxy_stderr, **detector_kwargs)
    window = detector_kwargs.get("window", DEFAULT_WINDOW)
    return int(np.asarray(steps)[_best_index(np.asarray(proxy), detection.first_index, window)])


def _noise_sd(values) -> float:
    """Robust noise std of a curve [n] from second differences (which cancel a smooth trend)."""
    d2 = np.diff(values, 2)
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / np.sqrt(6.0)) if d2.size else 0.0


def proxy_rise(values, stderrs=None, window=DEFAULT_WINDOW) -> float:
    """z-score of the last `window`-mean of log proxy above its lowest `window`-mean."""
    logv = np.log(np.asarray(values, dtype=np.float64))
    sig = _log_sigma(values, stderrs) if stderrs is not None else np.full_like(logv, _noise_sd(logv))
    if len(logv) < window:
        return float("nan")
    kernel = np.ones(window) / window
    means = np.convolve(logv, kernel, mode="valid")
    se = np.sqrt(np.convolve(sig**2, kernel, mode="valid") / window)
    i_min = int(np.argmin(means))
    return float((means[-1] - means[i_min]) / max(np.hypot(se[-1], se[i_min]), 1e-12))


def golden_minimum(steps, golden, golden_stderr=None) -> tuple[int, float]:
    """(step, value) of the lowest golden metric. `golden_stderr` is only validated."""
    steps, golden, _ = _check_curve(steps, golden, golden_stderr, name="golden")
    i = int(np.argmin(golden))
    return int(steps[i]), float(golden[i])


def detect_u_shape(steps, proxy, golden, golden_stderr=None) -> UShape:
    """U shape: golden rises after its minimum by > 2 * sqrt(se_min**2 + se_end**2) while the
    proxy at the end is below the proxy at the golden minimum. Without stderrs, the golden
    noise is estimated from its second differences."""
    steps, proxy, _ = _check_curve(steps, proxy, name="proxy")
    _, golden, golden_stderr = _check_curve(steps, golden, golden_stderr, name="golden")
    se = golden_stderr if golden_stderr is not None else np.full_like(golden, _noise_sd(golden))
    i = int(np.argmin(golden))
    rise, rise_se = float(golden[-1] - golden[i]), float(np.hypot(se[i], se[-1]))
    is_u = bool(rise > 2.0 * rise_se and proxy[-1] < proxy[i])
    return UShape(is_u, int(steps[i]), rise, rise_se)


def verdict(
    steps, proxy, proxy_stderr=None, golden=None, golden_stderr=None, *,
    threshold=DEFAULT_THRESHOLD, patience=DEFAULT_PATIENCE, min_points=DEFAULT_MIN_POINTS,
    fit_fraction=DEFAULT_FIT_FRACTION, window=DEFAULT_WINDOW,
) -> Verdict:
    """Labels a run from its proxy curve; precedence: not_converged (too few points) >
    overfitting > teacher_hacking > not_converged (proxy not decreasing) > healthy. The golden
    curve, when given, only adds details (U shape, lag = flag step - golden minimum step)."""
    steps, proxy, proxy_stderr = _check_curve(steps, proxy, proxy_stderr, name="proxy")
    details = {"n_points": len(steps), "threshold": threshold, "flag_step": None}
    if golden is not None:
        u = detect_u_shape(steps, proxy, golden, golden_stderr)
        details.update(u_shape=u.is_u, golden_min_step=u.min_step, golden_rise=u.rise,
                       golden_rise_stderr=u.rise_stderr)
    if len(steps) < max(min_points, MIN_FIT_POINTS):
        details["reason"] = f"{len(steps)} evaluations, need at least {min_points}"
        return Verdict("not_converged", details)
    detection = detect_deviation(steps, proxy, proxy_stderr, threshold, patience=patience,
                                 min_points=min_points, fit_fraction=fit_fraction, window=window)
    first = detection.first_index
    # The law drawn and reported is the one the detector extrapolated when it first fired.
    n_law = len(steps) if first is None else int(fit_fraction * (first + 1))
    law = fit_power_law(steps[:n_law], proxy[:n_law],
                        None if proxy_stderr is None else proxy_stderr[:n_law])
    details.update(
        fit=dict(log_a=law.log_a, b=law.b, b_stderr=law.b_stderr,
                 residual_scale=law.residual_scale, n=law.n),
        flag_step=detection.step,
        max_statistic=float(np.nanmax(detection.statistic, initial=-np.inf)),
        best_step=int(steps[_best_index(proxy, first, window)]),
        proxy_rise_z=proxy_rise(proxy, proxy_stderr, window),
    )
    if golden is not None and detection.fired:
        details["lag"] = detection.step - details["golden_min_step"]
    if details["proxy_rise_z"] > OVERFIT_Z:
        label = "overfitting"
    elif detection.fired:
        label = "teacher_hacking"
    elif law.b - 2.0 * law.b_stderr <= 0:
        label, details["reason"] = "not_converged", "proxy is not decreasing"
    else:
        label = "healthy"
    return Verdict(label, details)


class HackingGuard:
    """Online form of `detect_deviation` for the training loop: `update` once per evaluation.

    mode 'log' only reports, 'warn' also logs a warning when it fires, 'stop' sets
    `should_stop` from then on. The state is the raw curve (a dict of lists, JSON-ready).
    """

    def __init__(self, mode="log", threshold=DEFAULT_THRESHOLD, min_points=DEFAULT_MIN_POINTS,
                 patience=DEFAULT_PATIENCE, *, fit_fraction=DEFAULT_FIT_FRACTION, window=DEFAULT_WINDOW):
        if mode not in MODES:
            raise ValueError(f"HackingGuard mode={mode!r}; expected one of {MODES}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.mode, self.threshold, self.patience = mode, threshold, patience
        self.min_points, self.fit_fraction, self.window = min_points, fit_fraction, window
        self.load_state_dict({"steps": [], "proxy": [], "proxy_stderr": []})

    def _stat(self, n):
        if n < self.min_points:
            return float("nan")
        x, y = np.log(self.steps[:n]), np.log(self.proxy[:n])
        stderrs = np.asarray(self.proxy_stderr[:n]) if self.proxy_stderr else None
        sig = _log_sigma(np.asarray(self.proxy[:n]), stderrs)
        return _statistic_at(x, y, sig, stderrs is not None, n, self.fit_fraction, self.window)

    def _result(self) -> GuardResult:
        first = _first_fire(self.statistic, self.threshold, self.patience)
        best = self.steps[_best_index(np.asarray(self.proxy), first, self.window)]
        fired = first is not None
        return GuardResult(self.statistic[-1], fired, fired and self.mode == "stop", int(best))

    def update(self, step, proxy, proxy_stderr=None) -> GuardResult:
        if self.steps and (proxy_stderr is None) != (not self.proxy_stderr):
            raise ValueError("HackingGuard.update: give proxy_stderr at every update or at none")
        steps = self.steps + [step]
        stderrs = self.proxy_stderr + [proxy_stderr] if proxy_stderr is not None else None
        _check_curve(steps, self.proxy + [proxy], stderrs, name="proxy")
        was_fired = _first_fire(self.statistic, self.threshold, self.patience) is not None
        self.steps, self.proxy = steps, self.proxy + [float(proxy)]
        self.proxy_stderr = [] if stderrs is None else [float(s) for s in stderrs]
        self.statistic.append(self._stat(len(self.steps)))
        result = self._result()
        if result.fired and not was_fired and self.mode == "warn":
            logging.warning("HackingGuard: proxy deviates from its power law at step %d "
                            "(statistic %.2f > %.2f); best step %d", step, result.statistic,
                            self.threshold, result.best_step)
        return result

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "proxy": list(self.proxy),
                "proxy_stderr": list(self.proxy_stderr)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"steps", "proxy", "proxy_stderr"} - set(state)
        if missing:
            raise ValueError(f"HackingGuard state lacks keys {sorted(missing)}; has {sorted(state)}")
        stderrs = state["proxy_stderr"] or None
        if state["steps"]:
            _check_curve(state["steps"], state["proxy"], stderrs, name="proxy")
        self.steps = [int(s) for s in state["steps"]]
        self.proxy = [float(v) for v in state["proxy"]]
        self.proxy_stderr = [float(s) for s in state["proxy_stderr"]]
        # The statistic is derived state: recomputed, so a changed config applies to the past.
        self.statistic = [self._stat(n) for n in range(1, len(self.steps) + 1)]


# ---------------------------------------------------------------------------------------------
# Synthetic curves: calibration of the threshold and the rates table of docs/diagnostics.md.

CURVE_KINDS = ("power_law", "flatten", "rise")


def simulate_curve(rng, kind="power_law", *, n_points=40, noise=0.03, b=0.5, break_fraction=0.4,
                   slow_factor=0.2, eval_every=100):
    """One synthetic proxy curve: (steps [n], values [n], stderrs [n]).

    Log-normal noise of std `noise` on log value (stderr = noise * value). 'power_law':
    `10 * step**-b`; 'flatten': the exponent drops to `slow_factor * b` after
    `break_fraction` of the run (teacher hacking); 'rise': the proxy grows as step**(b/2)
    after the break (overfitting).
    """
    if kind not in CURVE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {CURVE_KINDS}")
    steps = eval_every * np.arange(1, n_points + 1, dtype=np.float64)
    x, x_break = np.log(steps), np.log(break_fraction * steps[-1])
    after = np.maximum(x - x_break, 0.0)
    slope_after = {"power_law": b, "flatten": slow_factor * b, "rise": -0.5 * b}[kind]
    clean = np.log(10.0) - b * np.minimum(x, x_break) - slope_after * after
    values = np.exp(clean + noise * rng.standard_normal(n_points))
    return steps, values, noise * values


def _null_maxima(rng, n_curves, n_points, noise, patience, use_stderr):
    """Per curve, the largest level the statistic stays above for `patience` evaluations."""
    out = np.empty(n_curves)
    for i in range(n_curves):
        steps, values, stderrs = simulate_curve(rng, "power_law", n_points=n_points, noise=noise)
        s = deviation_statistic(steps, values, stderrs if use_stderr else None)
        s = np.nan_to_num(s, nan=-np.inf)
        runs = np.lib.stride_tricks.sliding_window_view(s, patience).min(axis=1)
        out[i] = runs.max()
    return out


def calibrate_threshold(fpr=0.05, *, n_curves=400, n_points=40, noise=0.03,
                        patience=DEFAULT_PATIENCE, use_stderr=True, seed=0) -> float:
    """Threshold whose false-alarm rate over a whole pure-power-law curve is `fpr`."""
    rng = np.random.default_rng(seed)
    maxima = _null_maxima(rng, n_curves, n_points, noise, patience, use_stderr)
    return float(np.quantile(maxima, 1.0 - fpr))


def simulate_rates(noise_levels=(0.01, 0.03, 0.1), *, n_curves=200, n_points=40, seed=0,
                   threshold=DEFAULT_THRESHOLD, use_stderr=True) -> list[dict]:
    """Rates of the verdicts on synthetic curves, one row per noise level: false-positive rate
    (power law flagged as anything but healthy), detection rate (flatten labelled
    teacher_hacking), median detection delay in evaluations after the break, and the rate of
    'rise' curves labelled overfitting."""
    rows = []
    for noise in noise_levels:
        rng = np.random.default_rng(seed)
        counts = {kind: [] for kind in CURVE_KINDS}
        delays = []
        for kind in CURVE_KINDS:
            for _ in range(n_curves):
                steps, values, stderrs = simulate_curve(rng, kind, n_points=n_points, noise=noise)
                v = verdict(steps, values, stderrs if use_stderr else None, threshold=threshold)
                counts[kind].append(v.label)
                if kind == "flatten" and v.details["flag_step"] is not None:
                    delays.append((v.details["flag_step"] - 0.4 * steps[-1]) / (steps[1] - steps[0]))
        rows.append({
            "noise": noise,
            "false_positive_rate": float(np.mean([c != "healthy" for c in counts["power_law"]])),
            "detection_rate": float(np.mean([c == "teacher_hacking" for c in counts["flatten"]])),
            "median_delay_evals": float(np.median(delays)) if delays else float("nan"),
            "overfitting_rate": float(np.mean([c == "overfitting" for c in counts["rise"]])),
        })
    return rows


def format_rates_table(rows, n_curves, n_points) -> str:
    """Markdown table of `simulate_rates` rows."""
    lines = [
        f"| noise (std of log proxy) | false positives (power law, {n_curves} curves) "
        f"| detection (flatten) | median delay (evals) | overfitting on rise |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['noise']:.3g} | {r['false_positive_rate']:.1%} | {r['detection_rate']:.1%} "
                     f"| {r['median_delay_evals']:.1f} | {r['overfitting_rate']:.1%} |")
    return "\n".join(lines) + f"\n\n({n_points} evaluations per curve, break at 40% of the run.)"

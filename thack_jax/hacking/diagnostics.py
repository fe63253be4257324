"""Teacher-hacking diagnostics: power-law fit of the proxy curve, deviation detector, verdicts.

numpy / scipy only (no jax), so `launch/diagnose.py` starts fast. A curve is three 1-D arrays
over evaluations: `steps [n]` (strictly increasing, > 0), `values [n]` (> 0) and `stderrs [n]`
(>= 0, the standard error of each value) or None. The method, its defaults and their
calibration are described in docs/diagnostics.md; the synthetic curves that calibrate it are
in `diagnostics_sim.py`, the plots in `plots.py`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special

from thack_jax.core import checks

OVERFIT_Z = 3.0  # significance of a proxy rise above its running minimum
REL_STDERR_FLOOR = 1e-3  # floor on stderr / value, so no point dominates the weighted fit
# Cap on one standardized residual in the tested window. Above the threshold, so a window
# whose residuals are all far above the law can fire even when they are fully correlated
# (extrapolation error dominates: the statistic is then about their mean); below
# threshold * sqrt(window), so one outlying evaluation cannot (docs/diagnostics.md, section 2).
RESIDUAL_CLIP = 3.5
MIN_FIT_POINTS = 3  # 2 parameters + 1 degree of freedom for the residual scale


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Settings of the oracle-free deviation detector.

    threshold: calibrated with `diagnostics_sim.calibrate_threshold` (docs/diagnostics.md):
      on pure power law + noise the whole-curve false-alarm rate is <= 5% up to about 100
      evaluations (about 1% at 40); longer curves test more often and need a higher threshold.
    patience: consecutive evaluations above threshold needed to fire.
    min_points: evaluations seen before the statistic is computed.
    fit_fraction: the law is fitted on this first fraction of the evaluations seen.
    window: most recent evaluations tested against the extrapolated law.
    """

    threshold: float = 2.8
    patience: int = 2
    min_points: int = 8
    fit_fraction: float = 0.5
    window: int = 3

    def __post_init__(self):
        checks.integer(self, "patience", 1)
        checks.integer(self, "window", 1)
        if not 0.0 < self.fit_fraction < 1.0:
            raise ValueError(f"fit_fraction must be in (0, 1): {self}")
        n_fit = int(self.fit_fraction * self.min_points)
        if n_fit < MIN_FIT_POINTS + 1 or n_fit + self.window > self.min_points:
            raise ValueError(
                f"min_points={self.min_points} must leave >= {MIN_FIT_POINTS + 1} points to fit "
                f"and {self.window} (window) after them at fit_fraction={self.fit_fraction}"
            )


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """`value ~ exp(log_a) * step**-b`; `residual_scale` multiplies the stderrs (or is the
    residual std of log values when no stderrs were given); `cov` is the 2x2 covariance of
    (log_a, b)."""

    log_a: float
    b: float
    residual_scale: float
    n: int
    cov: tuple  # ((var log_a, cov), (cov, var b))

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


def _rows(idx, steps, values) -> str:
    shown = ", ".join(f"(index {i}, step {steps[i]:g}, value {values[i]:g})" for i in idx[:10])
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
        raise ValueError(
            "steps must be strictly increasing; offending rows: " + _rows(bad, steps, values)
        )
    if stderrs is not None:
        stderrs = np.asarray(stderrs, dtype=np.float64)
        if stderrs.shape != steps.shape:
            raise ValueError(f"stderrs {stderrs.shape} must match steps {steps.shape}")
        bad = np.flatnonzero(~(np.isfinite(stderrs) & (stderrs >= 0)))
        if bad.size:
            raise ValueError(
                "stderrs must be finite and >= 0; offending rows: " + _rows(bad, steps, stderrs)
            )
    return steps, values, stderrs


def _log_sigma(values, stderrs):
    """Delta-method std of log(value) [n], floored; ones (scale to be estimated) if no stderrs."""
    if stderrs is None:
        return np.ones_like(values)
    return np.maximum(stderrs / values, REL_STDERR_FLOOR)


def _prefix_fits(x, y, sig, n_fit, known_sigma):
    """Weighted least-squares fits of y = log_a - b x on the first n_fit[k] points, for every k
    at once from prefix sums. Args: x, y, sig [n]; n_fit [K] ints >= 3.
    Returns log_a [K], b [K], scale [K], inv [K, 3]: (s2, s1, s0) / det, the entries of the
    inverse normal matrix [[s2, s1], [s1, s0]] / det (multiply by scale**2 for the covariance).
    """
    w = 1.0 / sig**2

    def prefix(a):
        return np.concatenate([[0.0], np.cumsum(a)])[n_fit]

    s0, s1, s2 = prefix(w), prefix(w * x), prefix(w * x * x)
    sy, sxy, syy = prefix(w * y), prefix(w * x * y), prefix(w * y * y)
    det = s0 * s2 - s1**2
    log_a = (s2 * sy - s1 * sxy) / det
    b = (s1 * sy - s0 * sxy) / det
    chi2 = np.maximum(syy - log_a * sy + b * sxy, 0.0)
    scale = np.sqrt(chi2 / np.maximum(n_fit - 2, 1))
    if known_sigma:  # reported stderrs are a lower bound on the noise: inflate, never shrink
        scale = np.maximum(scale, 1.0)
    else:  # an exact prefix (no scatter) would make every later deviation infinitely significant
        scale = np.maximum(scale, REL_STDERR_FLOOR)
    return log_a, b, scale, np.stack([s2, s1, s0], axis=-1) / det[:, None]


def fit_power_law(steps, values, stderrs=None, noise_cov=None) -> PowerLawFit:
    """Fits `values ~ a * steps**-b` by weighted least squares in log-log space.

    Weights are 1 / (stderr / value)**2 (delta method), with stderr / value floored at
    REL_STDERR_FLOOR. Args: steps [n], values [n], stderrs [n] or None (equal weights, the
    scale then estimated from the residuals); noise_cov [n, n] (see `deviation_statistic`):
    generalized least squares instead, `stderrs` ignored.
    """
    steps, values, stderrs = _check_curve(steps, values, stderrs)
    n = len(steps)
    if n < MIN_FIT_POINTS:
        raise ValueError(f"need at least {MIN_FIT_POINTS} points to fit a power law, got {n}")
    if noise_cov is not None:
        cov_inv = np.linalg.inv(_check_cov(noise_cov, n))
        design = np.stack([np.ones(n), -np.log(steps)], axis=1)
        cov_beta = np.linalg.inv(design.T @ cov_inv @ design)
        beta = cov_beta @ design.T @ cov_inv @ np.log(values)
        resid = np.log(values) - design @ beta
        scale = max(1.0, float(np.sqrt(resid @ cov_inv @ resid / max(n - 2, 1))))
        cov_beta = scale**2 * cov_beta
        return PowerLawFit(float(beta[0]), float(beta[1]), scale, n, tuple(map(tuple, cov_beta)))
    sig = _log_sigma(values, stderrs)
    log_a, b, scale, inv = _prefix_fits(
        np.log(steps), np.log(values), sig, np.array([n]), stderrs is not None
    )
    s2, s1, s0 = scale[0] ** 2 * inv[0]
    return PowerLawFit(float(log_a[0]), float(b[0]), float(scale[0]), n, ((s2, s1), (s1, s0)))


def deviation_statistic(
    steps, values, stderrs=None, config=DetectorConfig(), noise_cov=None
) -> np.ndarray:
    """Per-evaluation deviation statistic [n]: at evaluation k, the standardized deviation of
    the last `window` evaluations from the law fitted on the first `fit_fraction * (k + 1)`,
    positive = proxy higher than the law (slower decay). About N(0, 1) on a pure power law;
    nan before `min_points` evaluations. Each entry uses only the evaluations seen so far.

    noise_cov [n, n]: the covariance of the evaluation errors of log(values) across
    evaluations (`noise.log_mean_cov` of per-prompt values), for evaluations that share their
    prompts; it replaces `stderrs` (section 2 of docs/diagnostics.md)."""
    steps, values, stderrs = _check_curve(steps, values, stderrs)
    if noise_cov is not None:
        return _gls_statistic(
            np.log(steps), np.log(values), _check_cov(noise_cov, len(steps)), config
        )
    x, y, sig = np.log(steps), np.log(values), _log_sigma(values, stderrs)
    seen = np.arange(config.min_points, len(steps) + 1)
    out = np.full(len(steps), np.nan)
    if seen.size == 0:
        return out
    n_fit = (config.fit_fraction * seen).astype(int)
    log_a, b, scale, inv = _prefix_fits(x, y, sig, n_fit, stderrs is not None)
    idx = seen[:, None] - config.window + np.arange(config.window)  # [K, window]
    xt = x[idx]
    # Covariance of the window's residuals [K, window, window]: own noise + the extrapolation
    # error they share, t_i inv t_j with t_i = (1, -x_i).
    shared = inv[:, 0, None, None] - inv[:, 1, None, None] * (xt[:, :, None] + xt[:, None, :])
    shared = shared + inv[:, 2, None, None] * xt[:, :, None] * xt[:, None, :]
    cov = scale[:, None, None] ** 2 * (shared + np.eye(config.window) * sig[idx][:, None] ** 2)
    sd = np.sqrt(np.einsum("kii->ki", cov))
    z = (y[idx] - (log_a[:, None] - b[:, None] * xt)) / sd
    if stderrs is None:  # estimated scale: Student t with n_fit - 2 dof, mapped onto z-scores
        z = -special.ndtri(special.stdtr((n_fit - 2)[:, None], -z))
    # Clipping bounds what one evaluation can add, so a single outlier cannot fire the detector.
    clipped = np.clip(z, -RESIDUAL_CLIP, RESIDUAL_CLIP)
    corr_sum = np.sum(cov / (sd[:, :, None] * sd[:, None, :]), axis=(1, 2))
    out[seen - 1] = np.sum(clipped, axis=1) / np.sqrt(corr_sum)
    return out


def _check_cov(noise_cov, n: int) -> np.ndarray:
    cov = np.asarray(noise_cov, dtype=np.float64)
    if cov.shape != (n, n):
        raise ValueError(f"noise_cov has shape {cov.shape}; want [{n}, {n}] (one row per step)")
    if not np.all(np.isfinite(cov)) or not np.allclose(cov, cov.T, atol=1e-12):
        raise ValueError("noise_cov must be a finite symmetric matrix")
    bad = np.flatnonzero(np.diag(cov) < 0)
    if bad.size:
        raise ValueError(f"noise_cov has negative variances at rows {bad.tolist()[:10]}")
    # The floor: 0.1% of independent noise, as for stderrs, and an invertible matrix.
    return cov + REL_STDERR_FLOOR**2 * np.eye(n)


def _gls_statistic(x, y, cov, config) -> np.ndarray:
    """`deviation_statistic` under correlated noise y = log_a - b x + e, e ~ N(0, s^2 cov).

    At each evaluation: a generalized least-squares fit on the first evaluations, and the
    window's residuals from the best linear unbiased predictor, which also predicts the
    window's noise from the fit points' residuals (with shared prompts, a prompt set that
    bends the curve early bends it late too). The residuals are linear in y, r = M y, so
    their covariance is exactly s^2 M cov M'; s = max(1, GLS residual scale of the fit)."""
    n = len(x)
    out = np.full(n, np.nan)
    design = np.stack([np.ones(n), -x], axis=1)  # y = design @ (log_a, b)
    for k in range(config.min_points - 1, n):
        m = int(config.fit_fraction * (k + 1))
        f, w = np.arange(m), np.arange(k + 1 - config.window, k + 1)
        s_ff_inv = np.linalg.inv(cov[np.ix_(f, f)])
        xf_si = design[f].T @ s_ff_inv  # [2, m]
        cov_beta = np.linalg.inv(xf_si @ design[f])
        a = cov_beta @ xf_si  # beta = a @ y[f]
        resid = y[f] - design[f] @ (a @ y[f])
        scale = max(1.0, float(np.sqrt(resid @ s_ff_inv @ resid / (m - 2))))
        g = cov[np.ix_(w, f)] @ s_ff_inv  # [window, m]: the noise predicted from the fit points
        mf = -g - (design[w] - g @ design[f]) @ a  # r = y[w] + mf @ y[f]
        op = np.concatenate([mf, np.eye(config.window)], axis=1)
        idx = np.concatenate([f, w])
        c = scale**2 * op @ cov[np.ix_(idx, idx)] @ op.T
        sd = np.sqrt(np.diag(c))
        z = np.clip((y[w] + mf @ y[f]) / sd, -RESIDUAL_CLIP, RESIDUAL_CLIP)
        out[k] = np.sum(z) / np.sqrt(np.sum(c / np.outer(sd, sd)))
    return out


def detect_deviation(
    steps, values, stderrs=None, config=DetectorConfig(), noise_cov=None
) -> Detection:
    """Fires when the deviation statistic exceeds `config.threshold` at `config.patience`
    consecutive evaluations."""
    statistic = deviation_statistic(steps, values, stderrs, config, noise_cov)
    run = 0
    for i, s in enumerate(statistic):
        run = run + 1 if s > config.threshold else 0  # nan compares False
        if run == config.patience:
            return Detection(True, int(np.asarray(steps)[i]), statistic, i - run + 1)
    return Detection(False, None, statistic)


def best_index(values, detection: Detection, window: int) -> int:
    """The oracle-free checkpoint: the last evaluation before the window that first deviated,
    or, when nothing fired, the lowest proxy."""
    if not detection.fired:
        return int(np.argmin(values))
    return max(detection.first_index - window, 0)


def best_step_oracle_free(
    steps, proxy, proxy_stderr=None, config=DetectorConfig(), noise_cov=None
) -> int:
    """Step of the checkpoint to keep without an oracle (see `best_index`)."""
    detection = detect_deviation(steps, proxy, proxy_stderr, config, noise_cov)
    return int(np.asarray(steps)[best_index(np.asarray(proxy), detection, config.window)])


def _noise_sd(values) -> float:
    """Robust noise std of a curve [n] from second differences (which cancel a smooth trend)."""
    d2 = np.diff(values, 2)
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / np.sqrt(6.0)) if d2.size else 0.0


def _proxy_rise(values, stderrs=None, window=3) -> float:
    """z-score of the last `window`-mean of log proxy [n] above its lowest `window`-mean
    (overfitting: the proxy itself rises). Without stderrs, the noise comes from the curve."""
    logv = np.log(np.asarray(values, dtype=np.float64))
    sig = (
        _log_sigma(values, stderrs) if stderrs is not None else np.full_like(logv, _noise_sd(logv))
    )
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
    steps,
    proxy,
    proxy_stderr=None,
    golden=None,
    golden_stderr=None,
    config=DetectorConfig(),
    noise_cov=None,
) -> Verdict:
    """Labels a run from its proxy curve; precedence: not_converged (too few points) >
    overfitting > teacher_hacking > not_converged (proxy not decreasing) > healthy. The golden
    curve, when given, only adds details (U shape, lag = flag step - golden minimum step).
    noise_cov [n, n]: see `deviation_statistic`; the reported law and the overfitting rule
    then use its diagonal as stderrs."""
    steps, proxy, proxy_stderr = _check_curve(steps, proxy, proxy_stderr, name="proxy")
    if noise_cov is not None:
        proxy_stderr = np.sqrt(np.diag(_check_cov(noise_cov, len(steps)))) * proxy
    details = {"n_points": len(steps), "threshold": config.threshold, "flag_step": None}
    if golden is not None:
        u = detect_u_shape(steps, proxy, golden, golden_stderr)
        details.update(u_shape=u.is_u, golden_min_step=u.min_step, golden_rise=u.rise)
        details["golden_rise_stderr"] = u.rise_stderr
    if len(steps) < config.min_points:
        details["reason"] = f"{len(steps)} evaluations, need at least {config.min_points}"
        return Verdict("not_converged", details)
    detection = detect_deviation(steps, proxy, proxy_stderr, config, noise_cov)
    # The law reported (and drawn) is the one the detector extrapolated when it first fired.
    n_law = int(config.fit_fraction * (detection.first_index + 1)) if detection.fired else None
    # With a noise covariance this is the WLS fit on its diagonal, not the detector's GLS fit:
    # strongly correlated noise lets a GLS line sit off the data by a shared offset (which the
    # detector's predictor adds back), a misleading picture of the law.
    law = fit_power_law(
        steps[:n_law], proxy[:n_law], None if proxy_stderr is None else proxy_stderr[:n_law]
    )
    fit = {"log_a": law.log_a, "b": law.b, "b_stderr": law.b_stderr, "n": law.n}
    details.update(
        fit=dict(fit, residual_scale=law.residual_scale),
        flag_step=detection.step,
        max_statistic=float(np.nanmax(detection.statistic, initial=-np.inf)),
        best_step=int(steps[best_index(proxy, detection, config.window)]),
        proxy_rise_z=_proxy_rise(proxy, proxy_stderr, config.window),
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

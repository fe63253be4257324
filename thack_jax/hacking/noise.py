"""Evaluation noise of a run, measured by a bootstrap over prompts; its false-alarm rate.

Every evaluation of a run scores the same held-out prompts with the same random numbers
(common random numbers), so the evaluation error of one checkpoint is correlated with the
next one's. The detector's false-alarm rates of docs/diagnostics.md assume independent
noise. This module measures the real noise: the experiment saves, at each evaluation, the
per-prompt values behind every metric (`save_per_prompt`); their covariance across
evaluations gives the covariance of the evaluation errors (`log_mean_cov`, the delta
method, which the detector uses; `bootstrap_log_cov` estimates the same by resampling the
prompts, the same resample at every evaluation, as a new draw of the evaluation set would
be), and simulated pure power laws with that noise give the false-alarm rate the detector
has on this run (`false_alarm_rate`).

numpy only (no jax), like diagnostics.py.
"""

from __future__ import annotations

import dataclasses
import io
import re
import zipfile

import numpy as np

from thack_jax.core import storage
from thack_jax.hacking.diagnostics import DetectorConfig, verdict

PER_PROMPT_DIR = "per_prompt"  # under a run's train/ directory
_FILE = re.compile(r"step_(\d+)\.npz")


@dataclasses.dataclass(frozen=True)
class NoiseSummary:
    """sd [K]: std of log(metric) of each evaluation under a redraw of the prompts;
    lag1_corr: mean correlation of consecutive evaluations' errors; false_alarm_rate /
    false_alarm_rate_scatter: of the detector on pure power laws with this noise, given its
    covariance / estimating it from the scatter (None when not simulated)."""

    steps: np.ndarray
    sd: np.ndarray
    lag1_corr: float
    false_alarm_rate: float | None
    false_alarm_rate_scatter: float | None


def save_per_prompt(directory: str, step: int, per_prompt: dict[str, np.ndarray]) -> str:
    """Writes `directory/step_<step>.npz` ({metric key: per-prompt values [P]}) atomically."""
    storage.makedirs(directory)
    path = storage.join(directory, f"step_{step:08d}.npz")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.float64) for k, v in per_prompt.items()})
    storage.write_atomic(path, buffer.getvalue())
    return path


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """{key: values as float64} of an .npz file (pickles refused); ValueError naming the file
    when it is damaged."""
    data = storage.read_bytes(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: np.asarray(npz[key], np.float64) for key in npz.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e}); the file is damaged") from e


def read_per_prompt(directory: str, step: int) -> dict[str, np.ndarray]:
    """The per-prompt values saved for `step` ({metric key: [P]}); raises ValueError naming
    the missing file."""
    path = storage.join(directory, f"step_{step:08d}.npz")
    if not storage.exists(path):
        raise ValueError(f"no per-prompt values for step {step}: {path} is missing")
    return _read_npz(path)


def load_per_prompt(directory: str, key: str, min_step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(steps [K], values [K, P]) of `key` from the files of `save_per_prompt` at step >=
    min_step. Raises ValueError naming the directory, the key or the file that is wrong."""
    files = [(name, _FILE.fullmatch(name)) for name in storage.listdir(directory)]
    files = [(name, int(m.group(1))) for name, m in files if m is not None]
    if not files:
        raise ValueError(f"no per-prompt evaluations (step_*.npz) in {directory}")
    steps, rows = [], []
    for name, step in files:
        if step < min_step:
            continue
        path = storage.join(directory, name)
        data = _read_npz(path)
        if key not in data:
            raise ValueError(f"{path} lacks {key!r}; it has {sorted(data)}")
        rows.append(data[key])
        steps.append(step)
    if len(rows) < 2:
        raise ValueError(f"{directory}: {len(rows)} evaluations at step >= {min_step}; need 2")
    shapes = {r.shape for r in rows}
    if len(shapes) != 1 or rows[0].ndim != 1:
        raise ValueError(f"{directory}: per-prompt arrays of {key!r} differ in shape: {shapes}")
    return np.array(steps), np.stack(rows)


def _check_values(values) -> tuple[np.ndarray, np.ndarray]:
    """(values [K, P] as float64, their means over prompts [K]) or ValueError."""
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"values has shape {values.shape}; want [evaluations, prompts >= 2]")
    means = values.mean(axis=1)
    if np.any(means <= 0):
        bad = np.flatnonzero(means <= 0).tolist()
        raise ValueError(f"evaluations {bad} have a non-positive mean; log-log needs > 0")
    return values, means


def covariance_at(directory: str, key: str, steps) -> np.ndarray:
    """`log_mean_cov` [n, n] of `key` at exactly `steps` [n] from a per-prompt directory;
    raises ValueError naming the steps that have no saved values."""
    steps = [int(s) for s in steps]
    saved, values = load_per_prompt(directory, key, min(steps) if steps else 1)
    row = {s: i for i, s in enumerate(saved.tolist())}
    missing = [s for s in steps if s not in row]
    if missing:
        raise ValueError(f"{directory}: per-prompt values of {key} missing for steps {missing}")
    return log_mean_cov(values[[row[s] for s in steps]])


def bootstrap_log_cov(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Covariance [K, K] of log(mean over prompts) across evaluations under a redraw of the
    prompts. values [K, P] > 0 in the mean: per-prompt values of K evaluations of P prompts."""
    values, means = _check_values(values)
    rng = np.random.default_rng(seed)
    p = values.shape[1]
    # One multinomial weight vector per replicate: the same prompts at every evaluation.
    weights = rng.multinomial(p, np.full(p, 1.0 / p), size=n_boot) / p  # [B, P]
    boot = weights @ values.T  # [B, K]
    if np.any(boot <= 0):
        raise ValueError("a bootstrap replicate has a non-positive mean; cannot take logs")
    return np.cov(np.log(boot) - np.log(means), rowvar=False)


def log_mean_cov(values: np.ndarray) -> np.ndarray:
    """Covariance [K, K] of log(mean over prompts) across K evaluations of the same P prompts,
    by the delta method: cov_prompts(v_j, v_k) / (P m_j m_k), m = the means. values [K, P].
    What `bootstrap_log_cov` estimates by resampling, in closed form (deterministic)."""
    values, means = _check_values(values)
    return np.cov(values) / values.shape[1] / np.outer(means, means)


def lag1_correlation(cov: np.ndarray) -> float:
    """Mean correlation of consecutive evaluations' errors from a covariance [K, K]."""
    sd = np.sqrt(np.diag(cov))
    return float(np.mean(np.diag(cov, 1) / (sd[:-1] * sd[1:])))


def false_alarm_rate(
    steps,
    cov: np.ndarray,
    *,
    n_curves: int = 1000,
    b: float = 0.5,
    config: DetectorConfig | None = None,
    seed: int = 0,
    detector_knows_cov: bool = True,
) -> float:
    """Fraction of pure power laws `10 * steps**-b` with noise N(0, cov) on the log values
    that the detector labels anything but healthy: given `cov` as its noise covariance (the
    experiment's guard), or, with detector_knows_cov=False, estimating the noise from the
    scatter. steps [K], cov [K, K]."""
    steps = np.asarray(steps, np.float64)
    config = config or DetectorConfig()
    rng = np.random.default_rng(seed)
    noise = rng.multivariate_normal(np.zeros(len(steps)), cov, size=n_curves, method="eigh")
    clean = np.log(10.0) - b * np.log(steps)
    known = cov if detector_knows_cov else None
    labels = [
        verdict(steps, np.exp(clean + e), config=config, noise_cov=known).label for e in noise
    ]
    return float(np.mean(np.array(labels) != "healthy"))


def summarize(
    directory: str,
    key: str = "proxy/forward_kl",
    min_step: int = 1,
    *,
    n_boot: int = 2000,
    n_curves: int = 1000,
    seed: int = 0,
    config: DetectorConfig | None = None,
) -> NoiseSummary:
    """The evaluation noise of `key` in a run's per-prompt directory (a bootstrap over
    prompts, independent of the delta-method covariance the detector uses) and the
    detector's false-alarm rates under it (n_curves=0: not simulated)."""
    steps, values = load_per_prompt(directory, key, min_step)
    cov = bootstrap_log_cov(values, n_boot, seed)
    rates = [None, None]
    if n_curves > 0:
        rates = [
            false_alarm_rate(
                steps, cov, n_curves=n_curves, config=config, seed=seed, detector_knows_cov=k
            )
            for k in (True, False)
        ]
    return NoiseSummary(steps, np.sqrt(np.diag(cov)), lag1_correlation(cov), *rates)

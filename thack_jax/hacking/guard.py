"""The hacking guard of the training loop and the record of what it saw.

`HackingGuard` is the online form of `diagnostics.detect_deviation`, called once per
evaluation; `guard_settings` / `load_guard_settings` write and read
`runs/<name>/guard_settings.json`, what a run's guard is fed, so that the report and
`launch/diagnose.py` judge a finished run the way its guard did (docs/diagnostics.md,
sections 2 and 7). numpy only (no jax).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from thack_jax.core import storage
from thack_jax.hacking.diagnostics import DetectorConfig, best_index, detect_deviation
from thack_jax.hacking.noise import log_mean_cov

MODES = ("log", "warn", "stop")

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuardResult:
    statistic: float
    fired: bool
    should_stop: bool
    best_step: int


GUARD_FILE = "guard_settings.json"  # in a run's directory: what its guard saw


def guard_settings(
    min_step: int, proxy_key: str, config: DetectorConfig, per_prompt: bool = True
) -> dict:
    """JSON record of what a run's guard is fed: the proxy key, evaluations at step >=
    `min_step`, no stderrs, the per-prompt noise covariance or not (docs/diagnostics.md,
    sections 2 and 7), and the detector settings."""
    return {
        "proxy_key": proxy_key,
        "min_step": int(min_step),
        "use_stderr": False,
        "noise": "per_prompt_covariance" if per_prompt else "scatter",
        "detector": dataclasses.asdict(config),
    }


def load_guard_settings(path: str) -> dict | None:
    """The `guard_settings` record at `path`, or None when there is no such file; a file
    that is not such a record raises ValueError naming the file and the problem."""
    if not storage.exists(path):
        return None
    try:
        record = storage.read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read guard settings: {e}") from None
    min_step = record.get("min_step") if isinstance(record, dict) else None
    if not isinstance(min_step, int) or isinstance(min_step, bool) or min_step < 1:
        raise ValueError(f"{path}: 'min_step' is {min_step!r}, expected an integer >= 1")
    return record


def fit_start_step(warmup_steps: int) -> int:
    """First step whose evaluation the detector uses: the law describes training at the
    post-warmup learning rate (during warmup the proxy falls ever faster), and step 0 has no
    place in log-log axes."""
    return max(1, int(warmup_steps))


# Margin on the statistic (z units) within which an exceedance counts as undecided. The
# statistic of an evaluation depends only on the evaluations up to it, but the guard
# recomputes it over the whole curve at every update (a longer covariance matrix, other
# BLAS blockings), so an old value can move by rounding (~1e-12); a value this close to the
# threshold is kept on both sides of it.
CANDIDATE_MARGIN = 1e-6


def candidate_indices(
    statistic, values, config: DetectorConfig, margin: float = CANDIDATE_MARGIN
) -> set[int]:
    """Indices of the evaluations that `best_index` may return at this or any later update.

    statistic [n], values [n]: the deviation statistic and the proxy of the n evaluations
    seen. Assumes that statistic[k] depends only on evaluations 0..k, up to `margin` (true
    of `deviation_statistic`: prefix fits, a trailing window, stderrs and per-prompt
    covariances entry by entry). The detector fires at the first run of `patience`
    exceedances starting at some s and keeps max(s - window, 0); without a firing it keeps
    the lowest proxy. So the possible s are those whose known statistics all could exceed
    (> threshold - margin; later ones are unknown), up to the first run that surely does
    (> threshold + margin): such a run has fired, whatever comes later. Until one has, a
    run may start at the trailing exceedances or at any later evaluation (s >= n, keeping
    one of the last `window`), or nothing ever fires and the lowest proxy stays the best
    unless a later evaluation goes lower. At most window + patience indices without
    undecided statistics, one once fired.
    """
    stat = np.asarray(statistic, np.float64)
    n, p, w = len(stat), config.patience, config.window
    if n == 0:
        return set()
    maybe = stat > config.threshold - margin  # nan compares False: never an exceedance
    surely = stat > config.threshold + margin
    sure_start = next((s for s in range(n - p + 1) if surely[s : s + p].all()), None)
    last_start = n - 1 if sure_start is None else sure_start
    keep = {max(s - w, 0) for s in range(last_start + 1) if maybe[s : s + p].all()}
    if sure_start is None:
        keep.add(int(np.argmin(np.asarray(values, np.float64))))
        keep.update(range(max(n - w, 0), n))  # a first run starting at s >= n keeps s - w
    return keep


class HackingGuard:
    """Online form of `detect_deviation` for the training loop: `update` once per evaluation.

    mode 'log' only reports, 'warn' also logs a warning when it fires, 'stop' sets
    `should_stop` from then on. With `per_prompt` values at every update (evaluations that
    share their prompts), the detector uses their error covariance (`noise.log_mean_cov`);
    without, the noise is estimated from the scatter (or from `proxy_stderr`). The state is
    the raw curve (a dict of lists, JSON-ready); the detection is recomputed from it at each
    update (cheap next to an evaluation).
    """

    def __init__(
        self,
        mode="log",
        threshold=DetectorConfig.threshold,
        min_points=DetectorConfig.min_points,
        patience=DetectorConfig.patience,
    ):
        if mode not in MODES:
            raise ValueError(f"HackingGuard mode={mode!r}; expected one of {MODES}")
        self.mode = mode
        self.config = DetectorConfig(threshold, patience, min_points)
        self.load_state_dict({"steps": [], "proxy": [], "proxy_stderr": [], "per_prompt": []})

    def update(self, step, proxy, proxy_stderr=None, per_prompt=None) -> GuardResult:
        """per_prompt [P]: the per-prompt values whose mean is `proxy` (same prompts at every
        update)."""
        for name, value, seen in (
            ("proxy_stderr", proxy_stderr, self.proxy_stderr),
            ("per_prompt", per_prompt, self.per_prompt),
        ):
            if self.steps and (value is None) != (not seen):
                raise ValueError(f"HackingGuard.update: give {name} at every update or at none")
        was_fired = self.detection is not None and self.detection.fired
        self.load_state_dict(
            {
                "steps": self.steps + [step],
                "proxy": self.proxy + [proxy],
                "proxy_stderr": self.proxy_stderr
                + ([] if proxy_stderr is None else [proxy_stderr]),
                "per_prompt": self.per_prompt
                + ([] if per_prompt is None else [np.asarray(per_prompt, np.float64).tolist()]),
            }
        )
        fired = self.detection.fired
        best = self.steps[best_index(np.asarray(self.proxy), self.detection, self.config.window)]
        result = GuardResult(
            float(self.detection.statistic[-1]), fired, fired and self.mode == "stop", int(best)
        )
        if fired and not was_fired and self.mode == "warn":
            _LOG.warning(
                "HackingGuard: the proxy deviates from its power law (flagged at step %d); "
                "best step %d",
                self.detection.step,
                result.best_step,
            )
        return result

    def candidate_steps(self) -> set[int]:
        """Steps of the evaluations seen that may still be `best_step` now or at a later
        update (`candidate_indices`): the snapshots of the student worth keeping. Empty
        before the first update."""
        if self.detection is None:
            return set()
        indices = candidate_indices(self.detection.statistic, self.proxy, self.config)
        return {self.steps[i] for i in indices}

    def state_dict(self) -> dict:
        return {
            "steps": list(self.steps),
            "proxy": list(self.proxy),
            "proxy_stderr": list(self.proxy_stderr),
            "per_prompt": [list(row) for row in self.per_prompt],
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"steps", "proxy", "proxy_stderr"} - set(state)
        if missing:
            raise ValueError(f"HackingGuard state lacks {sorted(missing)}; has {sorted(state)}")
        per_prompt = state.get("per_prompt") or []
        detection = None
        if state["steps"]:  # also validates the curve, before anything is replaced
            stderrs = state["proxy_stderr"] or None
            cov = None
            if per_prompt:
                if len(per_prompt) != len(state["steps"]):
                    raise ValueError(
                        f"HackingGuard state has per_prompt for {len(per_prompt)} of "
                        f"{len(state['steps'])} steps"
                    )
                cov = log_mean_cov(np.asarray(per_prompt, np.float64))
            detection = detect_deviation(
                state["steps"], state["proxy"], stderrs, self.config, noise_cov=cov
            )
        self.detection = detection
        self.steps = [int(s) for s in state["steps"]]
        self.proxy = [float(v) for v in state["proxy"]]
        self.proxy_stderr = [float(s) for s in state["proxy_stderr"]]
        self.per_prompt = [list(row) for row in per_prompt]

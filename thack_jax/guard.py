"""The hacking guard of the training loop and the record of what it saw.

`HackingGuard` is the online form of `diagnostics.detect_deviation`, called once per
evaluation; `guard_settings` / `load_guard_settings` write and read
`runs/<name>/guard_settings.json`, what a run's guard is fed, so that the report and
`launch/diagnose.py` judge a finished run the way its guard did (docs/diagnostics.md,
sections 2 and 7). numpy only (no jax).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from thack_jax.diagnostics import DetectorConfig, best_index, detect_deviation

MODES = ("log", "warn", "stop")

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuardResult:
    statistic: float
    fired: bool
    should_stop: bool
    best_step: int


GUARD_FILE = "guard_settings.json"  # in a run's directory: what its guard saw


def guard_settings(min_step: int, proxy_key: str, config: DetectorConfig) -> dict:
    """JSON record of what a run's guard is fed: the proxy key, evaluations at step >=
    `min_step`, no stderrs (docs/diagnostics.md, section 7), and the detector settings."""
    return {
        "proxy_key": proxy_key,
        "min_step": int(min_step),
        "use_stderr": False,
        "detector": dataclasses.asdict(config),
    }


def load_guard_settings(path: str) -> dict | None:
    """The `guard_settings` record at `path`, or None when there is no such file; a file
    that is not such a record raises ValueError naming the file and the problem."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
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


class HackingGuard:
    """Online form of `detect_deviation` for the training loop: `update` once per evaluation.

    mode 'log' only reports, 'warn' also logs a warning when it fires, 'stop' sets
    `should_stop` from then on. The state is the raw curve (a dict of lists, JSON-ready); the
    detection is recomputed from it at each update (cheap next to an evaluation).
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
        self.load_state_dict({"steps": [], "proxy": [], "proxy_stderr": []})

    def update(self, step, proxy, proxy_stderr=None) -> GuardResult:
        if self.steps and (proxy_stderr is None) != (not self.proxy_stderr):
            raise ValueError("HackingGuard.update: give proxy_stderr at every update or at none")
        was_fired = self.detection is not None and self.detection.fired
        self.load_state_dict(
            {
                "steps": self.steps + [step],
                "proxy": self.proxy + [proxy],
                "proxy_stderr": self.proxy_stderr
                + ([] if proxy_stderr is None else [proxy_stderr]),
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

    def state_dict(self) -> dict:
        return {
            "steps": list(self.steps),
            "proxy": list(self.proxy),
            "proxy_stderr": list(self.proxy_stderr),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"steps", "proxy", "proxy_stderr"} - set(state)
        if missing:
            raise ValueError(f"HackingGuard state lacks {sorted(missing)}; has {sorted(state)}")
        detection = None
        if state["steps"]:  # also validates the curve, before anything is replaced
            stderrs = state["proxy_stderr"] or None
            detection = detect_deviation(state["steps"], state["proxy"], stderrs, self.config)
        self.detection = detection
        self.steps = [int(s) for s in state["steps"]]
        self.proxy = [float(v) for v in state["proxy"]]
        self.proxy_stderr = [float(s) for s in state["proxy_stderr"]]

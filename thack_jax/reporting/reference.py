"""The experiment's mode and the reference metrics of its evaluations (numpy only).

Field mode (`experiment.json` "mode": "field") distils a teacher without an oracle, so its
evaluations have no `golden/...` metrics; a workdir without "mode" predates field mode and
is an oracle-mode one. Evaluations of either mode may log reference metrics (nats per
response, each with `_stderr`):
- REFERENCE: the student's negative log-likelihood of the task's reference responses (in
  oracle mode the references are oracle samples). Against the data distribution it is
  KL(data || student) + H(data): it moves as the student's forward KL from the data does,
  which needs no oracle.
- TEACHER, ORACLE (oracle mode only): the same measured on the teacher (on the oracle: its
  entropy estimate); constant levels, logged at every evaluation.
"""

from __future__ import annotations

import numpy as np

from thack_jax.hacking import diagnostics

MODES = ("oracle", "field")
REFERENCE = "reference/cross_entropy"
TEACHER = "reference/teacher_cross_entropy"
ORACLE = "reference/oracle_cross_entropy"
# What the report reads of them (run summaries keep these; the per-token values are not read).
KEYS = tuple(f"{k}{tail}" for k in (REFERENCE, TEACHER, ORACLE) for tail in ("", "_stderr"))
# A student "better than its teacher" beats the teacher's level by more than this many
# stderrs, combined as if independent (both are scored on the same references, so their
# errors are positively correlated and this combination is conservative).
BETTER_Z = 2.0


def mode(experiment: dict, where: str) -> str:
    """'oracle' or 'field' from an experiment.json dict ({} or no "mode": 'oracle').
    Raises ValueError naming `where` (the file) for any other value."""
    value = (experiment or {}).get("mode", "oracle")
    if value not in MODES:
        raise ValueError(f"{where}: experiment mode is {value!r}, expected one of {MODES}")
    return value


def report_mode(analyses: list[dict]) -> str:
    """'oracle' when every run of a report has an oracle (`report.analyse` dicts; one
    without "mode" is an oracle-mode one), else 'field': the golden metric then decides
    nothing, since some runs lack it."""
    oracle = all(a.get("mode", "oracle") == "oracle" for a in analyses)
    return "oracle" if oracle else "field"


def z_score(value: float, se: float) -> float:
    """value / se; +-inf (0 for a zero value) when se is 0."""
    if se > 0:
        return float(value / se)
    return 0.0 if value == 0 else float(np.sign(value) * np.inf)


def _stderr(metrics: dict, key: str, where: str) -> np.ndarray:
    name = f"{key}_stderr"
    if name not in metrics:
        raise ValueError(f"{where}: has {key!r} but not {name!r}")
    return metrics[name]


def _level(metrics: dict, key: str, keep: np.ndarray, where: str) -> tuple | None:
    """(value, stderr) of the constant level `key` at its last finite evaluation in `keep`
    ([n] bool); None when the metrics lack it."""
    if key not in metrics:
        return None
    values, se = metrics[key], _stderr(metrics, key, where)
    ok = np.flatnonzero(keep & np.isfinite(values) & np.isfinite(se))
    if not ok.size:
        return None
    return float(values[ok[-1]]), float(se[ok[-1]])


def analyse_reference(steps, metrics: dict, proxy_key: str, where: str, flag=None) -> dict | None:
    """The reference cross-entropy of one run, analysed as report.analyse does the golden
    metric: its minimum, final value, rise after the minimum (nats and stderr units), the U
    shape against the proxy `proxy_key`, the teacher's (and oracle's) level. None when the
    metrics have no REFERENCE values after step 0.

    steps [n] (every evaluation, step 0 included); metrics: key -> [n] (nan where an
    evaluation lacks the key); where: the metrics file, for errors; flag: (flag_step,
    best_step) of the run's oracle-free verdict, or None (then lag and keep excess are None).
    Evaluations without a reference value are left out."""
    if REFERENCE not in metrics:
        return None
    value, se = metrics[REFERENCE], _stderr(metrics, REFERENCE, where)
    use = (steps >= 1) & np.isfinite(value) & np.isfinite(se)
    if not use.any():
        return None
    s, v, v_se = steps[use], value[use], se[use]
    proxy, proxy_se = metrics[proxy_key][use], metrics[f"{proxy_key}_stderr"][use]
    i0 = np.flatnonzero((steps == 0) & np.isfinite(value))
    i = int(np.argmin(v))
    rise, rise_se = float(v[-1] - v[i]), float(np.hypot(v_se[i], v_se[-1]))
    change = float(proxy[-1] - proxy[i])
    try:  # a non-positive proxy estimate makes the U-shape rule inapplicable
        u_shape = diagnostics.detect_u_shape(s, proxy, v, v_se).is_u
    except ValueError:
        u_shape = None
    out = {
        "n_evals": int(s.size),
        "start": float(value[i0[0]] if i0.size else v[0]),
        "min_step": int(s[i]),
        "min": float(v[i]),
        "min_stderr": float(v_se[i]),
        "final": float(v[-1]),
        "final_stderr": float(v_se[-1]),
        "rise": rise,
        "rise_stderr": rise_se,
        "rise_z": z_score(rise, rise_se),
        "proxy_at_min": float(proxy[i]),
        "proxy_change_z": z_score(change, float(np.hypot(proxy_se[i], proxy_se[-1]))),
        "u_shape": u_shape,
        "lag": None,
        "best_excess": None,
    }
    flag_step, best_step = flag if flag is not None else (None, None)
    if flag_step is not None:
        out["lag"] = int(flag_step) - out["min_step"]
    at_best = np.flatnonzero(s == best_step) if best_step is not None else np.array([], int)
    if at_best.size:  # what the oracle-free rule keeps, judged on the references
        out["best_excess"] = float(v[at_best[0]] - v[i])
    keep = steps >= 1
    for role, key in (("teacher", TEACHER), ("oracle", ORACLE)):
        level = _level(metrics, key, keep, where)
        out[role], out[f"{role}_stderr"] = level if level is not None else (None, None)
    out["vs_teacher"] = out["vs_teacher_z"] = None
    out["better_than_teacher"] = False
    if out["teacher"] is not None:
        diff = out["final"] - out["teacher"]
        out["vs_teacher"] = diff
        out["vs_teacher_z"] = z_score(
            diff, float(np.hypot(out["final_stderr"], out["teacher_stderr"]))
        )
        out["better_than_teacher"] = out["vs_teacher_z"] < -BETTER_Z
    return out

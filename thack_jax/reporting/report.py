"""The experiment report: `report.md` and `plots/*.png` from the distillation runs' metrics.

numpy + matplotlib only; jax is consulted (for the process index) only when the caller has
already imported it. For each workdir (layout in experiment.py) it reads `experiment.json`,
and for each `runs/<name>/`: `run.json`, `train/metrics.jsonl` and, once the run finished,
`COMPLETE.json` (`wall_seconds`); and the workdir's `reference_levels.json` when it has one
(levels.py: the teacher's and the initial student's golden, the oracle's entropy).

Conventions (repeated in the report's Notes):
- An evaluation is a metrics line with a `proxy/...` or `golden/...` key; a step logged twice
  (a resumed run) keeps the later line.
- The analysis uses the evaluations at step >= 1 (a log-log axis has no step 0); the step-0
  evaluation (before distillation) is the start of the proxy-golden curves and of the "falls"
  checks. The oracle-free verdict sees what the run's guard saw (and `launch/diagnose.py`
  sees by default): the evaluations from the end of the distillation warmup on
  (`runs/<name>/guard_settings.json`), without stderrs, with the evaluation-noise covariance
  of the per-prompt values in `train/per_prompt/` when the run has them (docs/diagnostics.md).
- Runs that differ only in `seed` form a group, also across workdirs that differ only in
  `world` (whole-world seeds, experiment/worlds.py: experiment.json dicts are compared as
  `text_format.pooled_experiment` gives them, world 0's). A group of >= 2 seeds is drawn
  as the mean over seeds with a min-max band (with 2-3 seeds a std is poorly estimated,
  and min-max shows every seed), on the steps every seed evaluated; a single run as its
  curve +- its stderr.
- Golden rise = final golden - minimum golden, in units of sqrt(se_min^2 + se_final^2),
  significant above 2 (the U-shape rule of `diagnostics.detect_u_shape`).
- Field mode (`experiment.json` "mode": "field"; absent: "oracle"): no oracle, no golden
  metrics. The proxy, the verdict and the plots of the proxy are as in oracle mode; the
  golden-based statistics are replaced by the same ones of the reference cross-entropy
  when the metrics have it (reference.py), and are not measurable otherwise. A report
  with any field-mode run is a field-mode report (findings.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from thack_jax.core import storage
from thack_jax.data.regime_names import Regime
from thack_jax.hacking import diagnostics, guard, noise
from thack_jax.reporting import levels, reference, report_plots, report_text
from thack_jax.reporting.report_plots import DIVERGENCES
from thack_jax.reporting.text_format import pooled_experiment
from thack_jax.training.metrics_io import METRICS_FILE, read_metrics

GROUP_FIELDS = ("regime", "num_prompts", "completions_per_prompt", "online_fraction", "online_role")
# Display order of the regimes in tables and plots: offline first, then by how much of
# the data is online. Every Regime appears once (tests/data/test_regime_names.py).
REGIMES = tuple(
    r.value for r in (Regime.OFFLINE, Regime.MIXED, Regime.ONLINE_TEACHER, Regime.ONLINE_STUDENT)
)


class ReportError(ValueError):
    """Missing or unusable inputs of the report."""


@dataclasses.dataclass
class Run:
    """One distillation run. steps [n] (evaluations, increasing); metrics: key -> [n] float,
    nan where an evaluation line lacks the key; wall_seconds is None while incomplete (no
    COMPLETE.json), nan when COMPLETE.json lacks it."""

    name: str
    workdir: str
    config: dict
    steps: np.ndarray
    metrics: dict
    wall_seconds: float | None
    metrics_path: str
    experiment: dict
    # Set for a run read from its summary (reporting/summary.py), where analyse finds what it
    # otherwise reads beside metrics_path: guard_settings.json's record (None: the run has
    # none) and, per proxy key, noise covariance (steps [n], cov [n, n]) or the ValueError
    # text its per-prompt values gave (noise_covs None: the run saved no per-prompt values).
    from_summary: bool = False
    guard_settings: dict | None = None
    noise_covs: dict | None = None
    # The experiment's reference levels (levels.py: reference_levels.json of the workdir, or
    # the summary's copy); None when it has none.
    levels: dict | None = None


def _read_json(path: str) -> dict:
    try:
        return storage.read_json(path)
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e


def _run_dir(metrics_path: str) -> str:
    """<run> of <run>/train/metrics.jsonl."""
    return storage.dirname(storage.dirname(metrics_path))


def _workdir_name(workdir: str) -> str:
    """The last component of a workdir (local: of its normalized path), for labels."""
    return storage.basename(workdir if storage.is_remote(workdir) else os.path.normpath(workdir))


def _number(path, row, key) -> float:
    value = row.get(key, float("nan"))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ReportError(f"{path}: step {row['step']}: {key!r} is {value!r}, not a number")
    return float(value)


def _load_run(metrics_path: str, workdir: str, experiment: dict) -> Run:
    run_dir = _run_dir(metrics_path)
    config = _read_json(storage.join(run_dir, "run.json"))
    missing = [k for k in GROUP_FIELDS + ("seed",) if k not in config]
    if missing:
        raise ReportError(f"{storage.join(run_dir, 'run.json')} lacks {missing}")
    rows = read_metrics(metrics_path)
    rows = [r for r in rows if any(k.startswith(("proxy/", "golden/")) for k in r)]
    if not rows:
        raise ReportError(
            f"{metrics_path}: no evaluation lines (no 'proxy/...' or 'golden/...' keys); "
            "the run has not been evaluated yet"
        )
    by_step = {r["step"]: r for r in rows}  # a resumed run: the later line wins
    steps = sorted(by_step)
    keys = sorted({k for r in rows for k in r} - {"step"})
    metrics = {k: np.array([_number(metrics_path, by_step[s], k) for s in steps]) for k in keys}
    complete = storage.join(run_dir, "COMPLETE.json")
    wall = _read_json(complete).get("wall_seconds", np.nan) if storage.exists(complete) else None
    name = config.get("name", storage.basename(run_dir))
    return Run(name, workdir, config, np.array(steps), metrics, wall, metrics_path, experiment)


def load_runs(workdirs) -> list[Run]:
    """Every run with a metrics file under `<workdir>/runs/*/train/`, in name order."""
    runs, searched = [], []
    for workdir in workdirs:
        if not storage.isdir(workdir):
            raise ReportError(f"workdir not found: {workdir}")
        exp_path = storage.join(workdir, "experiment.json")
        experiment = _read_json(exp_path) if storage.exists(exp_path) else {}
        searched.append(storage.join(workdir, "runs", "*", "train", METRICS_FILE))
        runs_dir = storage.join(workdir, "runs")
        paths = [
            storage.join(runs_dir, n, "train", METRICS_FILE) for n in storage.listdir(runs_dir)
        ]
        # As glob("runs/*/train/metrics.jsonl") did: hidden folders are not runs.
        paths = [p for p in paths if not storage.basename(_run_dir(p)).startswith(".")]
        try:
            workdir_levels = levels.read(workdir)
        except ValueError as e:
            raise ReportError(str(e)) from None
        loaded = [_load_run(p, workdir, experiment) for p in paths if storage.exists(p)]
        runs += [dataclasses.replace(run, levels=workdir_levels) for run in loaded]
    if not runs:
        raise ReportError("no runs found; searched: " + ", ".join(searched))
    return runs


def read_guard_settings(run: Run) -> dict | None:
    """The run's guard_settings.json record (from its summary, if read from one); None when
    the run has none."""
    if run.from_summary:
        return run.guard_settings
    path = storage.join(_run_dir(run.metrics_path), guard.GUARD_FILE)
    try:
        return guard.load_guard_settings(path)
    except ValueError as e:
        raise ReportError(str(e)) from None


def guard_min_step(run: Run) -> int:
    """First step the run's guard was fed (its guard_settings.json; 1 when absent)."""
    settings = read_guard_settings(run)
    return 1 if settings is None else settings["min_step"]


def noise_cov(run: Run, key: str, steps: np.ndarray) -> np.ndarray | None:
    """The evaluation-noise covariance [n, n] of `key` at `steps` from the run's per-prompt
    values (train/per_prompt/, or the covariance its summary kept), as its guard used; None
    for a run without them. Raises ValueError as `noise.covariance_at` does."""
    if run.from_summary:
        if run.noise_covs is None:
            return None
        if key not in run.noise_covs:
            raise ValueError(f"{run.metrics_path}: no noise covariance of {key!r}")
        saved = run.noise_covs[key]
        if isinstance(saved, str):  # reading the per-prompt values failed when summarized
            raise ValueError(saved)
        saved_steps, cov = saved
        row = {int(s): i for i, s in enumerate(saved_steps)}
        missing = [int(s) for s in steps if int(s) not in row]
        if missing:
            raise ValueError(f"{run.metrics_path}: noise covariance of {key} lacks {missing}")
        index = [row[int(s)] for s in steps]
        return cov[np.ix_(index, index)]
    directory = storage.join(storage.dirname(run.metrics_path), noise.PER_PROMPT_DIR)
    if not storage.isdir(directory):
        return None
    return noise.covariance_at(directory, key, steps)


def run_mode(run: Run) -> str:
    """'oracle' or 'field' (experiment.json's "mode"; absent: 'oracle')."""
    try:
        return reference.mode(run.experiment, storage.join(run.workdir, "experiment.json"))
    except ValueError as e:
        raise ReportError(str(e)) from None


def analyse(run: Run, metric: str = "forward_kl") -> dict:
    """Golden minimum, final values, golden rise (nats and stderr units), proxy change after
    the golden minimum, U shape and the oracle-free verdict of `run` on `<prefix>/<metric>`;
    under "reference", `reference.analyse_reference` (None without reference metrics).
    A field-mode run (no oracle) has no golden values: only the proxy ones, the verdict and
    "reference". Uses the evaluations at step >= 1 (see the module docstring)."""
    oracle = run_mode(run) == "oracle"
    prefixes = ("proxy", "golden") if oracle else ("proxy",)
    keys = [f"{p}/{metric}{s}" for p in prefixes for s in ("", "_stderr")]
    absent = [k for k in keys if k not in run.metrics]
    if absent:
        available = sorted(k for k in run.metrics if k.startswith(("proxy/", "golden/")))
        raise ReportError(f"{run.metrics_path}: lacks {absent}; it has {available}")
    keep = run.steps >= 1
    steps = run.steps[keep]
    proxy, proxy_se = run.metrics[keys[0]][keep], run.metrics[keys[1]][keep]
    for key in keys:
        bad = np.flatnonzero(np.isnan(run.metrics[key][keep]))
        if bad.size:
            raise ReportError(f"{run.metrics_path}: evaluation at step {steps[bad[0]]} lacks {key}")
    if steps.size == 0:
        raise ReportError(f"{run.metrics_path}: no evaluation after step 0")
    # Where the curves start: the step-0 evaluation (before distillation) when there is one.
    i0 = np.flatnonzero(run.steps == 0)
    start = run.metrics[keys[0]][i0[0]] if i0.size else proxy[0]
    out = {
        "metric": metric,
        "mode": "oracle" if oracle else "field",
        "n_evals": int(steps.size),
        "last_step": int(steps[-1]),
        "start_proxy": float(start),
        "final_proxy": float(proxy[-1]),
        "final_proxy_stderr": float(proxy_se[-1]),
    }
    if oracle:
        golden, golden_se = run.metrics[keys[2]][keep], run.metrics[keys[3]][keep]
        out.update(_golden(run, keys))
    else:
        golden = golden_se = None
    # The detector sees what the run's guard saw: evaluations after warmup, no stderrs.
    law = steps >= guard_min_step(run)
    try:  # the detector works in log-log axes: a non-positive estimate makes it inapplicable
        cov = noise_cov(run, f"proxy/{metric}", steps[law])
        u = diagnostics.detect_u_shape(steps, proxy, golden, golden_se) if oracle else None
        v = diagnostics.verdict(
            steps[law],
            proxy[law],
            None,
            golden[law] if oracle else None,
            golden_se[law] if oracle else None,
            noise_cov=cov,
        )
    except ValueError as e:
        invalid = dict(u_shape=None, verdict="invalid", flag_step=None, lag=None, reason=str(e))
        return dict(out, **invalid, reference=_reference(run, metric, None))
    d = v.details
    flag, best = d["flag_step"], d.get("best_step")
    out.update(
        u_shape=None if u is None else u.is_u,
        verdict=v.label,
        flag_step=flag,
        lag=None if flag is None or not oracle else flag - out["golden_min_step"],
        best_step=best,
        fit=d.get("fit"),
        reason=d.get("reason"),
    )
    if oracle:  # what the oracle-free rule would keep, judged by the oracle
        at = np.flatnonzero(steps == best)
        out["best_golden_excess"] = (
            None if best is None else float(golden[at[0]] - out["golden_min"])
        )
    out["reference"] = _reference(run, metric, (flag, best))
    return out


def _golden(run: Run, keys: list[str]) -> dict:
    """The golden part of `analyse`; keys: the proxy, its stderr, the golden, its stderr."""
    keep, i0 = run.steps >= 1, np.flatnonzero(run.steps == 0)
    steps = run.steps[keep]
    proxy, proxy_se, golden, golden_se = (run.metrics[k][keep] for k in keys)
    start_golden = run.metrics[keys[2]][i0[0]] if i0.size else golden[0]
    i = int(np.argmin(golden))
    rise, rise_se = float(golden[-1] - golden[i]), float(np.hypot(golden_se[i], golden_se[-1]))
    change = float(proxy[-1] - proxy[i])
    return {
        "start_golden": float(start_golden),
        "golden_min_step": int(steps[i]),
        "golden_min": float(golden[i]),
        "golden_min_stderr": float(golden_se[i]),
        "final_golden": float(golden[-1]),
        "final_golden_stderr": float(golden_se[-1]),
        "proxy_at_golden_min": float(proxy[i]),
        "golden_rise": rise,
        "golden_rise_stderr": rise_se,
        "golden_rise_z": reference.z_score(rise, rise_se),
        "proxy_change_after_golden_min": change,
        "proxy_change_z": reference.z_score(change, float(np.hypot(proxy_se[i], proxy_se[-1]))),
        "proxy_falls_after_golden_min": change < 0,
    }


def _reference(run: Run, metric: str, flag) -> dict | None:
    try:
        return reference.analyse_reference(
            run.steps, run.metrics, f"proxy/{metric}", run.metrics_path, flag
        )
    except ValueError as e:
        raise ReportError(str(e)) from None


@dataclasses.dataclass
class Group:
    label: str
    experiment: int  # index of the run's experiment.json among the distinct ones
    config: dict  # run.json of the first run, seed aside
    members: list  # indices into the runs list
    worlds: tuple = (0,)  # the members' worlds (experiment.json "world"; absent: 0)


def _base_label(cfg: dict) -> str:
    data = f"N={cfg['num_prompts']}x{cfg['completions_per_prompt']}"
    if cfg["regime"] == "offline":
        return f"offline {data}"
    if cfg["regime"] == "mixed":
        return f"mixed {100 * cfg['online_fraction']:g}% {cfg['online_role']} {data}"
    return str(cfg["regime"])


def group_runs(runs: list[Run]) -> tuple[list[Group], list[dict]]:
    """Groups of runs that differ only in seed or world, and the distinct experiment.json
    contents (as `pooled_experiment` gives them: world 0's)."""
    experiments, by_key = [], {}
    for i, run in enumerate(runs):
        experiment = pooled_experiment(run.experiment)
        if experiment not in experiments:
            experiments.append(experiment)
        exp = experiments.index(experiment)
        key = (exp, *(json.dumps(run.config[f]) for f in GROUP_FIELDS))
        if key not in by_key:
            by_key[key] = Group(_base_label(run.config), exp, run.config, [])
        by_key[key].members.append(i)
    for grp in by_key.values():
        grp.worlds = tuple(sorted({runs[i].experiment.get("world", 0) for i in grp.members}))
    order = {r: k for k, r in enumerate(REGIMES)}
    groups = sorted(by_key.values(), key=lambda g: (g.experiment, order.get(g.config["regime"], 9)))
    seen: dict[str, int] = {}
    for g in groups:  # labels must be unique: other experiments, online runs with other N
        if len(experiments) > 1:
            g.label += f" [exp {g.experiment + 1}]"
        n = seen[g.label] = seen.get(g.label, 0) + 1
        g.label += f" #{n}" if n > 1 else ""
    return groups, experiments


def _is_primary() -> bool:
    if "jax" not in sys.modules:  # no jax, no multi-process run
        return True
    from thack_jax.parallel import distributed

    return distributed.is_primary()


def write_report(workdirs, out_dir: str, metric: str = "forward_kl", runs=None) -> str:
    """Writes `out_dir/report.md` and `out_dir/plots/*.png` (report_plots.py; process 0
    only); returns the report's path. Raises ReportError on missing or unusable inputs.

    runs: the runs, already loaded (e.g. `summary.load_summaries`); None: `load_runs(workdirs)`.
    `workdirs` are the sources the report names."""
    if metric not in DIVERGENCES:
        raise ReportError(f"metric={metric!r}; expected one of {DIVERGENCES}")
    runs = load_runs(workdirs) if runs is None else list(runs)
    analyses = [analyse(run, metric) for run in runs]
    groups, experiments = group_runs(runs)
    order = [i for g in groups for i in g.members]  # the tables list runs group by group
    runs, analyses = [runs[i] for i in order], [analyses[i] for i in order]
    groups, experiments = group_runs(runs)
    names = [r.name for r in runs]
    labels = [  # the same run name in two workdirs: add the workdir's name
        f"{r.name} @{_workdir_name(r.workdir)}" if names.count(r.name) > 1 else r.name for r in runs
    ]
    path = storage.join(out_dir, "report.md")
    if not _is_primary():
        return path
    table = report_text.ReportRuns(runs, labels, analyses, groups, experiments)
    plot_files = report_plots.write_plots(out_dir, table, metric)
    text = report_text.render(workdirs, out_dir, metric, table, plot_files)
    storage.write_atomic(path, text)
    return path

"""Run summaries: one small JSON file per distillation run with exactly what the report reads.

A workdir keeps, per run, every metrics line and the per-prompt values of every evaluation
(`train/per_prompt/step_*.npz`, [P] per key). The report needs far less: `summarize` keeps
run.json, the experiment.json, COMPLETE.json's wall time, the guard's settings and record,
the evaluation lines' proxy and golden divergences and reference metrics with their
stderrs, and, instead of the per-prompt values, the noise covariance [n, n] the verdict
uses (`noise.covariance_at` at the steps the run's guard saw; n ~ 30 numbers squared
against n x P ~ 8000 values).
`load_summaries` reads them back as `report.Run`s, which `report.write_report` turns into
the same report as from the workdir (only the source paths it names differ).

File `<dir>/<run directory name>.json`:
  format: FORMAT; name; run: run.json; experiment: experiment.json ({} when absent);
  wall_seconds: float, NaN (COMPLETE.json lacks it) or null (incomplete run);
  guard_settings / guard: guard_settings.json / guard.json, or null;
  evaluations: {"step": [n], key: [n] (NaN where a line lacks the key)};
  noise_covariance: null (no per-prompt values) or {proxy key: {"steps": [m],
    "cov_upper": rows i of cov[i, i:] (the matrix is symmetric)} or {"error": text}};
  reference_levels: the workdir's reference_levels.json or null (absent in summaries
    written before the levels existed: read as null, the report shows n/a).
numpy only (no jax), like report.py.
"""

from __future__ import annotations

import json

import numpy as np

from thack_jax.core import storage
from thack_jax.hacking import noise
from thack_jax.reporting import reference, report

FORMAT = "thack_jax.run_summary/1"
# The metrics the report reads: analyse (one divergence) and the plots (all of them); and
# the reference metrics, where the run has them (reference.KEYS; an older run has none, and
# its summary is as before them).
KEYS = tuple(
    f"{prefix}/{div}{tail}"
    for div in report.DIVERGENCES
    for prefix in ("proxy", "golden")
    for tail in ("", "_stderr")
)
GUARD_RECORD_FILE = "guard.json"  # beside run.json: what the guard flagged (experiment stages)


def _optional_json(path: str):
    return report._read_json(path) if storage.exists(path) else None


def _noise_covariances(run: report.Run) -> dict | None:
    """Per proxy key: the covariance the verdict of that metric uses, or the error it gives."""
    directory = storage.join(storage.dirname(run.metrics_path), noise.PER_PROMPT_DIR)
    if not storage.isdir(directory):
        return None
    steps = run.steps[run.steps >= report.guard_min_step(run)]
    out = {}
    for div in report.DIVERGENCES:
        key = f"proxy/{div}"
        try:
            cov = report.noise_cov(run, key, steps)
        except ValueError as e:  # e.g. no per-prompt values of this key: the verdict says so
            out[key] = {"error": str(e)}
            continue
        if not np.array_equal(cov, cov.T):
            raise report.ReportError(f"{directory}: covariance of {key} is not symmetric")
        upper = [cov[i, i:].tolist() for i in range(len(cov))]
        out[key] = {"steps": steps.tolist(), "cov_upper": upper}
    return out


def summary_of(run: report.Run) -> dict:
    """The summary record of a run loaded from a workdir (`report.load_runs`)."""
    run_dir = report._run_dir(run.metrics_path)
    evaluations = {"step": run.steps.tolist()}
    kept = [k for k in KEYS + reference.KEYS if k in run.metrics]
    evaluations.update({k: run.metrics[k].tolist() for k in kept})
    return {
        "format": FORMAT,
        "name": run.name,
        "run": run.config,
        "experiment": run.experiment,
        "wall_seconds": run.wall_seconds,
        "guard_settings": report.read_guard_settings(run),
        "guard": _optional_json(storage.join(run_dir, GUARD_RECORD_FILE)),
        "evaluations": evaluations,
        "noise_covariance": _noise_covariances(run),
        "reference_levels": run.levels,
    }


def _dump(record: dict) -> str:
    """JSON with one top-level field per line and each array on one line (diffable, small);
    floats as repr, so they read back bit for bit."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def summarize(workdirs, out_dir: str) -> list[str]:
    """Writes `out_dir/<run>.json` for every run of `workdirs`; returns the paths. Raises
    ReportError on unusable inputs or when two runs share a directory name."""
    runs = report.load_runs(workdirs)
    names = [storage.basename(report._run_dir(r.metrics_path)) for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise report.ReportError(
            f"runs {twice} occur in several workdirs; summarize each into its own directory"
        )
    storage.makedirs(out_dir)
    paths = []
    for run, name in zip(runs, names, strict=True):
        path = storage.join(out_dir, f"{name}.json")
        storage.write_atomic(path, _dump(summary_of(run)))
        paths.append(path)
    return paths


def _array(path: str, evaluations: dict, key: str, n: int) -> np.ndarray:
    values = evaluations[key]
    ok = isinstance(values, list) and len(values) == n
    if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise report.ReportError(f"{path}: evaluations[{key!r}] is not a list of {n} numbers")
    return np.array(values, dtype=np.float64)


def _covariances(path: str, saved: dict | None) -> dict | None:
    if saved is None:
        return None
    out = {}
    for key, entry in saved.items():
        if "error" in entry:
            out[key] = str(entry["error"])
            continue
        steps, upper = np.array(entry["steps"], dtype=np.int64), entry["cov_upper"]
        if [len(row) for row in upper] != list(range(len(steps), 0, -1)):
            raise report.ReportError(f"{path}: cov_upper of {key} does not fit its steps")
        cov = np.zeros((len(steps), len(steps)))
        for i, row in enumerate(upper):
            cov[i, i:] = row
            cov[i:, i] = row
        out[key] = (steps, cov)
    return out


def _levels(path: str, saved) -> dict | None:
    """The summary's reference levels (absent in summaries written before them: None)."""
    if saved is not None and not isinstance(saved, dict):
        raise report.ReportError(f"{path}: reference_levels is not an object or null")
    return saved


def load_summary(path: str, summary_dir: str) -> report.Run:
    """One run from its summary file; raises ReportError naming the file and the field."""
    record = report._read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise report.ReportError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    fields = ("name", "run", "experiment", "wall_seconds", "guard_settings", "evaluations")
    missing = [k for k in fields + ("noise_covariance",) if k not in record]
    if missing:
        raise report.ReportError(f"{path} lacks {missing}")
    config = record["run"]
    absent = [k for k in report.GROUP_FIELDS + ("seed",) if k not in config]
    if absent:
        raise report.ReportError(f"{path}: run lacks {absent}")
    evaluations = record["evaluations"]
    steps = np.array(evaluations.get("step", []), dtype=np.int64)
    if steps.size == 0 or np.any(np.diff(steps) <= 0):
        raise report.ReportError(f"{path}: evaluations['step'] is empty or not increasing")
    metrics = {k: _array(path, evaluations, k, steps.size) for k in evaluations if k != "step"}
    settings = record["guard_settings"]
    min_step = settings.get("min_step") if isinstance(settings, dict) else None
    if settings is not None and (not isinstance(min_step, int) or min_step < 1):
        raise report.ReportError(f"{path}: guard_settings.min_step is {min_step!r}, not >= 1")
    wall = record["wall_seconds"]
    return report.Run(
        name=record["name"],
        workdir=summary_dir,
        config=config,
        steps=steps,
        metrics=metrics,
        wall_seconds=None if wall is None else float(wall),
        metrics_path=path,
        experiment=record["experiment"],
        from_summary=True,
        guard_settings=settings,
        noise_covs=_covariances(path, record["noise_covariance"]),
        levels=_levels(path, record.get("reference_levels")),
    )


def load_summaries(summary_dirs) -> list[report.Run]:
    """Every run summary `<dir>/*.json`, in file-name order per directory (the order
    `report.load_runs` gives the runs of the workdir they were made from). A directory with
    no summaries of its own but subdirectories that hold some (one per workdir, e.g.
    docs/reproduction/worlds/runs/world0, world1, ...) stands for those, in name order."""
    runs = []
    for directory in summary_dirs:
        if not storage.isdir(directory):
            raise report.ReportError(f"summary directory not found: {directory}")
        paths = _summary_paths(directory)
        if paths:
            runs += [load_summary(p, directory) for p in paths]
            continue
        subdirs = [storage.join(directory, n) for n in storage.listdir(directory)]
        subdirs = [d for d in subdirs if storage.isdir(d) and _summary_paths(d)]
        if not subdirs:
            raise report.ReportError(
                f"no run summaries (*.json) in {directory} nor in its subdirectories"
            )
        runs += load_summaries(subdirs)
    return runs


def _summary_paths(directory: str) -> list[str]:
    # As glob("*.json") did: no hidden files (nor temporary files of write_atomic).
    names = [n for n in storage.listdir(directory) if n.endswith(".json")]
    return [storage.join(directory, n) for n in names if not n.startswith(".")]

"""The sensitivity table: golden rise and the oracle-free guard's flags per teacher error
(`teacher_logit_scale`), step budget and regime, over whole worlds (docs/reproduction.md).

    python launch/report.py --summary_dir=A --summary_dir=B ... --sensitivity=OUT.md

Reads run summaries (or workdirs' runs, `report.load_runs`) and groups them by
(teacher_logit_scale, last evaluated step, run configuration without seed): each cell
pools its runs over worlds (`ExperimentConfig.world`) and seeds, every run analysed by
`report.analyse` against its own experiment's reference levels. Where a run's numbers come
from is the experiment.json and the evaluations themselves, never a directory name. numpy
only (no jax), like report.py.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from thack_jax.core import storage
from thack_jax.reporting import levels, report

HEADER = (
    "| teacher logit scale | steps | runs | worlds | teacher golden | initial student golden "
    "| golden rise after its min (min..max) | rise (se), mean | U shape | flagged (no oracle) "
    "| final golden (min..max) | ends below its teacher |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row: the runs of one configuration at one teacher error and one step budget."""

    scale: float
    steps: int
    label: str  # `report._base_label` of the runs' configuration
    world: int | None = None  # None: pooled over worlds


def _key(run: report.Run, analysis: dict) -> Cell:
    scale = run.experiment.get("teacher_logit_scale")
    if scale is None:
        raise report.ReportError(f"{run.metrics_path}: experiment.json has no teacher_logit_scale")
    return Cell(float(scale), analysis["last_step"], report._base_label(run.config))


def cells(
    runs: list[report.Run], metric: str = "forward_kl", by_world: bool = False
) -> dict[Cell, list[dict]]:
    """Cell -> one record per run: its `analyse` dict plus 'world', 'seed', 'teacher' and
    'student_init' (the golden levels, nan when the run has none); by_world: one cell per
    world. Oracle-mode runs only; the same (cell, world, seed) twice (a summary directory
    given twice) is an error."""
    out, seen = collections.defaultdict(list), {}
    for run in runs:
        a = report.analyse(run, metric)
        if a["mode"] != "oracle":
            raise report.ReportError(f"{run.metrics_path}: no golden values (field mode)")
        cell = _key(run, a)
        ident = (cell, run.experiment.get("world", 0), run.config.get("seed"))
        if by_world:
            cell = dataclasses.replace(cell, world=ident[1])
        if ident in seen:
            raise report.ReportError(
                f"{run.metrics_path} and {seen[ident]} are the same run (scale {cell.scale}, "
                f"{cell.steps} steps, {cell.label}, world {ident[1]}, seed {ident[2]})"
            )
        seen[ident] = run.metrics_path
        lv = {m: levels.golden(run.levels, m, metric) for m in levels.MODELS}
        a = dict(a, world=ident[1], seed=ident[2])
        a.update({m: np.nan if v is None else v[0] for m, v in lv.items()})
        out[cell].append(a)
    return dict(out)


def _spread(values) -> str:
    """'mean (min..max)' of several values, the value alone for one."""
    x = np.asarray(values, float)
    if x.size == 1:
        return f"{x[0]:.2f}"
    return f"{x.mean():.2f} ({x.min():.2f}..{x.max():.2f})"


def _count(flags) -> str:
    return f"{sum(bool(f) for f in flags)}/{len(flags)}"


def row(cell: Cell, records: list[dict]) -> str:
    """The table line of one cell (markdown)."""
    worlds = sorted({r["world"] for r in records})
    below = [r["final_golden"] < r["teacher"] for r in records if np.isfinite(r["teacher"])]
    cols = [
        f"{cell.scale:g}",
        f"{cell.steps:,}",
        f"{cell.label}: {len(records)}",
        ", ".join(str(w) for w in worlds),
        _spread([r["teacher"] for r in records]),
        _spread([r["student_init"] for r in records]),
        _spread([r["golden_rise"] for r in records]),
        f"{np.mean([r['golden_rise_z'] for r in records]):.1f}",
        _count([r["u_shape"] for r in records]),
        _count([r["flag_step"] is not None for r in records]),
        _spread([r["final_golden"] for r in records]),
        _count(below) if below else "n/a",
    ]
    return "| " + " | ".join(cols) + " |"


def table(runs: list[report.Run], metric: str = "forward_kl", by_world: bool = False) -> str:
    """The markdown table, rows ordered by scale, steps, then regime (offline first), and
    with by_world, one row per world after the regime."""
    by_cell = cells(runs, metric, by_world)
    order = {r: k for k, r in enumerate(report.REGIMES)}

    def sort_key(cell: Cell):
        regime = cell.label.split()[0]
        return (cell.scale, cell.steps, order.get(regime, 9), cell.label, cell.world or 0)

    lines = [row(c, by_cell[c]) for c in sorted(by_cell, key=sort_key)]
    return "\n".join([*HEADER, *lines])


def write(runs: list[report.Run], path: str, sources: list[str], metric: str) -> str:
    """Writes the table to `path` with the sources it was built from; returns the text."""
    text = "\n".join(
        [
            f"# Sensitivity table (sequence-level {metric}, nats per response)",
            "",
            "Built by `python launch/report.py "
            + " ".join(f"--summary_dir={s}" for s in sources)
            + f" --sensitivity={path}` (thack_jax/reporting/sensitivity.py).",
            "",
            "## Pooled over worlds (mean, with the min..max over the runs)",
            "",
            table(runs, metric),
            "",
            "## One row per world",
            "",
            table(runs, metric, by_world=True),
            "",
        ]
    )
    storage.write_atomic(path, text)
    return text

"""The reference levels in the report: the teacher's and the initial student's golden
divergences and the oracle's entropy (experiment/reference_levels.py writes them to
`<workdir>/reference_levels.json`), as table columns, plot lines and a warning.

numpy only (no jax), like report.py. A run without levels (a field-mode run, a workdir or a
run summary made before the levels existed) shows "n/a" and draws no line.
"""

from __future__ import annotations

from thack_jax.core import storage
from thack_jax.reporting.text_format import pm

FILE = "reference_levels.json"  # = experiment.reference_levels.FILE (no jax import here)
# The models whose golden divergences are levels, and how tables and plots name them.
MODELS = {"teacher": "teacher golden", "student_init": "initial student golden"}
ENTROPY = "oracle_entropy"
# Columns of the runs and groups tables, in order.
HEADERS = ("teacher golden", "initial student golden", "oracle entropy")

WARNING_TEXT = (
    "the student ends closer to the oracle than its own teacher is. Distillation pulls a "
    "student towards its teacher, so ending better than the teacher is not the distillation's "
    "doing: what helps the student is stopping before it has become its teacher (early "
    "stopping, or the implicit regularisation of a short run from the initial student). A "
    "teacher-hacking reading of such a curve (a golden rise) is then about a student that "
    "cannot be compared to its teacher: read it against the teacher's and the initial "
    "student's levels, not only against the curve's own minimum."
)


def read(workdir: str) -> dict | None:
    """The levels record of `workdir`, None when it has none; ValueError when unreadable."""
    path = storage.join(workdir, FILE)
    if not storage.exists(path):
        return None
    try:
        record = storage.read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a JSON object")
    return record


def golden(levels: dict | None, model: str, metric: str) -> tuple[float, float] | None:
    """(value, stderr) of golden/<metric> of `model` ('teacher' or 'student_init') in a
    levels record, or None."""
    entry = ((levels or {}).get(model) or {}).get(metric)
    if not isinstance(entry, dict) or "value" not in entry:
        return None
    return float(entry["value"]), float(entry.get("stderr", float("nan")))


def entropy(levels: dict | None) -> tuple[float, float] | None:
    """(value, stderr) of the oracle's entropy (nats per response), or None."""
    entry = (levels or {}).get(ENTROPY)
    if not isinstance(entry, dict) or "value" not in entry:
        return None
    return float(entry["value"]), float(entry.get("stderr", float("nan")))


def cells(levels: dict | None, metric: str) -> list[str]:
    """The table cells (HEADERS order) of one run's levels; "n/a" where absent."""
    values = [golden(levels, m, metric) for m in MODELS] + [entropy(levels)]
    return ["n/a" if v is None else pm(*v) for v in values]


def group_levels(table, members) -> dict | None:
    """The levels of a group: its members' when they share them (one world: the same
    models and evaluator); for a group spanning worlds (experiment/worlds.py), the mean
    over its runs of each run's own levels, so that it compares with the group's mean
    final golden as each run with its own teacher. None when no member has levels."""
    records = [table.runs[i].levels for i in members if table.runs[i].levels]
    if not records or all(r == records[0] for r in records):
        return records[0] if records else None
    out = {}
    for model in MODELS:
        divs = set.intersection(*(set(r.get(model) or {}) for r in records))
        per_div = {d: [golden(r, model, d) for r in records] for d in sorted(divs)}
        out[model] = {d: _mean(v) for d, v in per_div.items() if None not in v}
    if all(entropy(r) is not None for r in records):
        out[ENTROPY] = _mean([entropy(r) for r in records])
    return out


def _mean(levels: list) -> dict:
    """{"value", "stderr"} of the mean over runs of (value, stderr) levels; runs sharing a
    workdir share its level (the same estimate, counted once in the stderr)."""
    counts: dict[tuple, int] = {}
    for level in levels:
        counts[level] = counts.get(level, 0) + 1
    n = len(levels)
    value = sum(v * k for (v, _), k in counts.items()) / n
    stderr = sum((se * k) ** 2 for (_, se), k in counts.items()) ** 0.5 / n
    return {"value": value, "stderr": stderr}


def plot_lines(table, members: dict, metric: str, with_entropy: bool) -> list[tuple]:
    """The distinct levels of the groups drawn (members: label -> run indices) as (label,
    value, style) for horizontal lines on a golden/<metric> axis."""
    lines = {}
    for indices in members.values():
        levels = group_levels(table, indices)
        for model, name in MODELS.items():
            level = golden(levels, model, metric)
            if level is not None:
                style = "--" if model == "teacher" else "-."
                lines.setdefault(f"{name} {level[0]:.4g}", (level[0], style))
        level = entropy(levels) if with_entropy else None
        if level is not None:
            lines.setdefault(f"oracle entropy {level[0]:.4g}", (level[0], ":"))
    return [(label, value, style) for label, (value, style) in lines.items()]


def warnings(table, metric: str, group_finals: dict) -> list[str]:
    """The report's lines on the levels: a WARNING naming every run (and every group mean,
    group_finals: label -> mean final golden) whose final golden is below its teacher's
    golden, with the explanation; else one line saying none is, or that no run has levels."""
    runs, groups = [], []
    for run, label, a in zip(table.runs, table.labels, table.analyses, strict=True):
        teacher = golden(run.levels, "teacher", metric)
        if teacher is not None and a["final_golden"] < teacher[0]:
            runs.append(f"{label} ({a['final_golden']:.4g} < {teacher[0]:.4g})")
    for grp in table.groups:
        teacher = golden(group_levels(table, grp.members), "teacher", metric)
        final = group_finals[grp.label]
        if teacher is not None and final < teacher[0]:
            groups.append(f"{grp.label} (mean {final:.4g} < {teacher[0]:.4g})")
    if not any(golden(r.levels, "teacher", metric) for r in table.runs):
        return [
            "Reference levels: n/a (no run's workdir has `reference_levels.json`: runs, or run "
            "summaries, made before the levels existed)."
        ]
    if not runs and not groups:
        return [f"No run and no group mean ends below its teacher's golden/{metric}."]
    named = "; ".join(
        part
        for part in (
            "runs: " + ", ".join(runs) if runs else "",
            "group means: " + ", ".join(groups) if groups else "",
        )
        if part
    )
    return [
        f"**WARNING**: final golden/{metric} below the teacher's golden: {named}. In these, "
        + WARNING_TEXT
    ]

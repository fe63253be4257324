"""The text of report.md: what was run, the tables, the findings of docs/method.md, the notes.

Pure formatting over `report.analyse` dicts (numpy only); the findings are decided in
findings.py, the reference cross-entropy section and the field-mode (no oracle) tables in
reference_text.py, the reference levels' cells and warning in levels.py (oracle mode only).
"""

from __future__ import annotations

import dataclasses

from thack_jax.reporting import findings, levels, reference, reference_text
from thack_jax.reporting.findings import RISE_Z
from thack_jax.reporting.text_format import (
    data,
    experiment_lines,
    g,
    pm,
    pooled_experiment,
    relative,
    wall,
)


def _keep(a) -> str:
    if a.get("best_step") is None:
        return "n/a"
    return f"{a['best_step']} ({a['best_golden_excess']:+.3g})"


@dataclasses.dataclass(frozen=True)
class ReportRuns:
    """What the report is about, checked when it is made: `runs` (report.Run), their
    `labels` (names in the tables) and `analyses` (`report.analyse` dicts), one of each per
    run in table order; `groups` (report.Group, members index `runs`) and the distinct
    `experiments` (experiment.json dicts), as `report.group_runs` returns them."""

    runs: list
    labels: list
    analyses: list
    groups: list
    experiments: list

    def __post_init__(self):
        n = len(self.runs)
        if not len(self.labels) == len(self.analyses) == n:
            raise ValueError(
                f"ReportRuns: {n} runs but {len(self.labels)} labels and "
                f"{len(self.analyses)} analyses; want one of each per run"
            )
        for grp in self.groups:
            bad = [i for i in grp.members if not 0 <= i < n]
            if bad:
                raise ValueError(
                    f"ReportRuns: group {grp.label!r} has members {bad} not in 0..{n - 1}"
                )


def _runs_table(table, out_dir: str, metric: str) -> list[str]:
    lines = [
        "| run | group | regime | data | seed | evals (last step) | golden min: step, value "
        "| final golden | " + " | ".join(levels.HEADERS) + " | golden rise (se) "
        "| proxy at golden min -> final (se) | U shape | verdict | flag step | lag "
        "| oracle-free keep: step (golden - min) | wall | metrics file |",
        "|" + "---|" * (17 + len(levels.HEADERS)),
    ]
    group_of = {i: grp.label for grp in table.groups for i in grp.members}
    for i, (run, label, a) in enumerate(zip(table.runs, table.labels, table.analyses, strict=True)):
        u = {True: "yes", False: "no", None: "n/a"}[a["u_shape"]]
        verdict = a["verdict"] + (f" ({a['reason']})" if a.get("reason") else "")
        lines.append(
            f"| {label} | {group_of[i]} | {run.config['regime']} | {data(run.config)} "
            f"| {run.config['seed']} | {a['n_evals']} ({a['last_step']}) "
            f"| {a['golden_min_step']}: {pm(a['golden_min'], a['golden_min_stderr'])} "
            f"| {pm(a['final_golden'], a['final_golden_stderr'])} "
            f"| {' | '.join(levels.cells(run.levels, metric))} | {a['golden_rise_z']:.1f} "
            f"| {g(a['proxy_at_golden_min'])} -> {g(a['final_proxy'])} "
            f"({a['proxy_change_z']:+.1f}) | {u} | {verdict} | {g(a['flag_step'])} "
            f"| {g(a['lag'])} | {_keep(a)} | {wall(run.wall_seconds)} "
            f"| `{relative(run.metrics_path, out_dir)}` |"
        )
    return lines


def worlds_note(grp) -> str:
    """ " (3 worlds)" after a group's runs when they span several worlds, " (world 2)" for
    one world other than 0, "" in world 0 (the report of one world reads as before)."""
    if len(grp.worlds) > 1:
        return f" ({len(grp.worlds)} worlds)"
    return f" (world {grp.worlds[0]})" if grp.worlds[0] else ""


def _group_finals(table) -> dict:
    """group label -> its mean final golden (findings.group_stats)."""
    views = [findings.golden_view(a) for a in table.analyses]
    return {grp.label: findings.group_stats(grp, views)["final"] for grp in table.groups}


def _groups_table(table, metric: str) -> list[str]:
    lines = [
        "| group | runs | golden rise, mean (min..max) | rise (se), mean | final golden, mean "
        "| " + " | ".join(levels.HEADERS) + " | final proxy, mean | U shape | flagged |",
        "|" + "---|" * (8 + len(levels.HEADERS)),
    ]
    views = [findings.golden_view(a) for a in table.analyses]
    for grp in table.groups:
        s = findings.group_stats(grp, views)
        names = ", ".join(table.labels[i] for i in grp.members) + worlds_note(grp)
        level_cells = " | ".join(levels.cells(levels.group_levels(table, grp.members), metric))
        lines.append(
            f"| {grp.label} | {names} | {g(s['rise'])} ({g(s['rise_min'])}.."
            f"{g(s['rise_max'])}) | {s['rise_z']:.1f} | {g(s['final'])} | {level_cells} "
            f"| {g(s['final_proxy'])} | {s['u']}/{s['n']} | {s['flagged']}/{s['n']} |"
        )
    return lines


def _levels_section(table, metric: str) -> list[str]:
    """The reference-levels section of an oracle-mode report: what the levels are, and the
    warning when a run or group mean ends below its teacher."""
    return [
        "",
        "## Reference levels",
        "",
        f"Teacher golden = `golden/{metric}` of the teacher scored as if it were the student; "
        "initial student golden = that of the student before distillation (`student_init`); "
        "oracle entropy = -E log p(y|x) of the oracle's own samples (nats per response), the "
        "scale of the golden divergences. The same evaluator, prompts and oracle samples as "
        "the runs (`reference_levels.json` of the workdir); n/a: none there.",
        "",
        *levels.warnings(table, metric, _group_finals(table)),
    ]


def _metric_line(metric: str, oracle: bool, workdirs) -> str:
    built = "Built by `python launch/report.py` from " + ", ".join(f"`{w}`" for w in workdirs)
    if oracle:
        return (
            f"Metric: `{metric}` (proxy = `proxy/{metric}`, student vs teacher; golden = "
            f"`golden/{metric}`, student vs oracle; nats per response, lower is better). "
            f"{built}."
        )
    return (
        f"Metric: `{metric}` (proxy = `proxy/{metric}`, student vs teacher; nats per "
        "response, lower is better). Field mode: no oracle, so the student is measured against "
        f"the task's references instead (`{reference.REFERENCE}`). {built}."
    )


def _worlds_line(runs) -> list[str]:
    """The line naming the worlds of an experiment's runs; none in world 0 alone."""
    spanned = sorted({r.experiment.get("world", 0) for r in runs})
    if spanned == [0]:
        return []
    return [
        f"- worlds: {spanned} (whole-world seeds, docs/experiment.md: every seed derived from "
        "(world, base seed); the seeds above are the base ones, each workdir's "
        "`experiment.json` holds its own)"
    ]


def render(workdirs, out_dir, metric, table: ReportRuns, plot_files) -> str:
    """The whole report.md text of `table`'s runs (plot_files: (file name, title) pairs).
    Oracle mode when every run has an oracle (`reference.report_mode`), else field mode."""
    runs, groups, experiments = table.runs, table.groups, table.experiments
    oracle = reference.report_mode(table.analyses) == "oracle"
    lines = ["# Teacher-hacking report", ""]
    lines += [_metric_line(metric, oracle, workdirs), "", "## What was run", ""]
    for k, exp in enumerate(experiments):
        mine = [r for r in runs if pooled_experiment(r.experiment) == exp]
        dirs = sorted({r.workdir for r in mine})
        head = f"Experiment {k + 1} " if len(experiments) > 1 else ""
        lines += [f"{head}(`experiment.json` of {', '.join(dirs)}):", ""]
        lines += experiment_lines(exp) + _worlds_line(mine) + [""]
    seeds = sorted({r.config["seed"] for r in runs})
    n_groups = f"{len(groups)} group{'s' if len(groups) > 1 else ''}"
    lines += [
        f"{len(runs)} run{'s' if len(runs) > 1 else ''} in {n_groups}; run seeds: {seeds}.",
        "",
    ]
    lines += ["## Runs", ""]
    lines += (
        _runs_table(table, out_dir, metric)
        if oracle
        else reference_text.field_runs_table(table, out_dir)
    )
    lines += ["", "## Groups (runs that differ only in seed)", ""]
    lines += _groups_table(table, metric) if oracle else reference_text.field_groups_table(table)
    if oracle:
        lines += _levels_section(table, metric)
    section = reference_text.reference_section(table, oracle)
    lines += section
    lines += ["", "## Plots", ""]
    for name, title in plot_files:
        lines += [f"### {title}", "", f"![{title}](plots/{name})", ""]
    lines += ["## Findings (docs/method.md)", ""]
    for k, f in enumerate(findings.findings(runs, table.labels, table.analyses, groups), 1):
        lines += [f"{k}. **{f.title}**: **{f.label}**. {f.text}", ""]
    if not oracle:
        notes = reference_text.FIELD_NOTES
    else:
        notes = NOTES + ([reference_text.REFERENCE_NOTE] if section else [])
        notes += [WORLDS_NOTE] if any(len(grp.worlds) > 1 for grp in groups) else []
    lines += ["## Notes", "", *notes]
    return "\n".join(lines) + "\n"


NOTES = [
    "- Each row of the runs table comes from the metrics file in its last column (the lines "
    "with evaluator keys; a step logged twice keeps the later line); wall time from the "
    "run's `COMPLETE.json`.",
    "- The analysis uses the evaluations at step >= 1. The step-0 evaluation (before "
    "distillation) is the start of the proxy-golden curves and of finding 2, and is left out "
    "of log-step axes.",
    f"- Golden rise = final golden - minimum golden; (se) = in units of sqrt(se_min^2 + "
    f"se_final^2), significant above {RISE_Z:g}. U shape = significant rise while the proxy "
    "ends below its value at the golden minimum (`diagnostics.detect_u_shape`). Proxy change "
    "(se) = (final - at golden min) / its combined stderr.",
    "- Verdict, flag step and lag (flag step - golden minimum step) come from "
    "`diagnostics.verdict` on the proxy alone with the default detector, fed what the run's "
    "guard was fed (from the end of warmup, no stderrs; docs/diagnostics.md). Oracle-free "
    "keep = the checkpoint the oracle-free rule keeps (section 6 there) and how much worse "
    "its golden is than the golden minimum (nats).",
    "- Plots: a group of >= 2 seeds is the mean over seeds with a min-max band (on the steps "
    "every seed evaluated), faint lines are single seeds; a single run has a +- stderr band.",
    "- Findings compare group means over seeds; 'not run' means these runs cannot decide it.",
    "- Reference levels (columns teacher golden, initial student golden, oracle entropy; "
    "lines on the golden plots): constants of the experiment, +- their stderr over prompts; "
    "a group shows its first member's. A final golden below the teacher's golden is "
    "warned about in the section above the plots.",
]
WORLDS_NOTE = (
    "- Worlds: a group spanning several worlds pools runs of workdirs that differ only in "
    "`ExperimentConfig.world` (their oracle, teacher, initial student, data and evaluation "
    "prompts all differ); each run is compared with its own workdir's reference levels, and "
    "a group's level is the mean over its runs of their own levels."
)

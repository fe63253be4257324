"""The parts of report.md that the reference metrics and field mode (no oracle) add: the
reference cross-entropy section (either mode), the field-mode runs and groups tables and
notes. Pure formatting over `report.analyse` dicts (numpy only); no golden value here.
"""

from __future__ import annotations

from thack_jax.reporting import findings, reference
from thack_jax.reporting.text_format import data, g, pm, relative, wall

REF = f"`{reference.REFERENCE}`"


def _flagged(a) -> str:
    return a["verdict"] + (f" ({a['reason']})" if a.get("reason") else "")


def field_runs_table(table, out_dir: str) -> list[str]:
    """One row per run: its proxy and the oracle-free verdict (field mode has nothing else
    per run but the reference section's numbers)."""
    lines = [
        "| run | group | regime | data | seed | evals (last step) | proxy: start -> final (se) "
        "| verdict | flag step | oracle-free keep: step | wall | metrics file |",
        "|" + "---|" * 12,
    ]
    group_of = {i: grp.label for grp in table.groups for i in grp.members}
    for i, (run, label, a) in enumerate(zip(table.runs, table.labels, table.analyses, strict=True)):
        lines.append(
            f"| {label} | {group_of[i]} | {run.config['regime']} | {data(run.config)} "
            f"| {run.config['seed']} | {a['n_evals']} ({a['last_step']}) "
            f"| {g(a['start_proxy'])} -> {pm(a['final_proxy'], a['final_proxy_stderr'])} "
            f"| {_flagged(a)} | {g(a['flag_step'])} | {g(a.get('best_step'))} "
            f"| {wall(run.wall_seconds)} | `{relative(run.metrics_path, out_dir)}` |"
        )
    return lines


def field_groups_table(table) -> list[str]:
    """Per group: the mean final proxy and flags; when runs have the reference cross-entropy,
    its rise, final value and U shapes ("–" for a group a member of which lacks it)."""
    views = [findings.reference_view(a) for a in table.analyses]
    with_ref = any(v is not None for v in views)
    head = "| group | runs | final proxy, mean | flagged |"
    if with_ref:
        head += (
            " reference CE rise, mean (min..max) | rise (se), mean | final reference CE, mean "
            "| U shape (reference CE) |"
        )
    lines = [head, "|" + "---|" * (8 if with_ref else 4)]
    for grp in table.groups:
        a = [table.analyses[i] for i in grp.members]
        proxy = sum(x["final_proxy"] for x in a) / len(a)
        flagged = sum(x["flag_step"] is not None for x in a)
        names = ", ".join(table.labels[i] for i in grp.members)
        row = f"| {grp.label} | {names} | {g(proxy)} | {flagged}/{len(a)} |"
        if with_ref:
            cells = ["–"] * 4
            if all(views[i] is not None for i in grp.members):
                s = findings.group_stats(grp, views)
                cells = [
                    f"{g(s['rise'])} ({g(s['rise_min'])}..{g(s['rise_max'])})",
                    f"{s['rise_z']:.1f}",
                    g(s["final"]),
                    f"{s['u']}/{s['n']}",
                ]
            row += " " + " | ".join(cells) + " |"
        lines.append(row)
    return lines


def _u(value) -> str:
    return {True: "yes", False: "no", None: "n/a"}[value]


def _level(ref, role) -> str:
    return "–" if ref[role] is None else pm(ref[role], ref[f"{role}_stderr"])


def reference_section(table, oracle: bool) -> list[str]:
    """The "Reference cross-entropy" section: what it is, one row per run that has it, the
    runs that lack it, and the warning for students that end better than their teacher.
    [] in oracle mode when no run has it (the report is then as before reference metrics)."""
    refs = [a.get("reference") for a in table.analyses]
    with_ref = [i for i, r in enumerate(refs) if r is not None]
    if oracle and not with_ref:
        return []
    lines = ["", "## Reference cross-entropy", ""]
    if not with_ref:
        return lines + [
            f"No run logged {REF}: without an oracle and without it nothing measures the "
            "student against the task's data, so only the proxy and the oracle-free verdict "
            "are reported."
        ]
    samples = "oracle samples" if oracle else "the task's reference responses"
    lines += [
        f"{REF}: the student's negative log-likelihood of {samples} (nats per response), = "
        "KL(data || student) + H(data): it moves as the student's forward KL from the data "
        "does. Teacher's level: the teacher's on the same references"
        + (" (oracle's level: the oracle's, its entropy estimate)" if oracle else "")
        + "; constant over training.",
        "",
    ]
    oracle_head = " oracle's level |" if oracle else ""
    lines += [
        "| run | group | reference CE min: step, value | final reference CE | rise (se) "
        "| proxy at its min -> final (se) | U shape | flag step | lag | oracle-free keep: "
        f"reference CE - min | teacher's level | final - teacher (se) |{oracle_head}",
        "|" + "---|" * (13 if oracle else 12),
    ]
    group_of = {i: grp.label for grp in table.groups for i in grp.members}
    for i in with_ref:
        r, a = refs[i], table.analyses[i]
        vs = (
            "–" if r["vs_teacher"] is None else f"{r['vs_teacher']:+.3g} ({r['vs_teacher_z']:+.1f})"
        )
        excess = "–" if r["best_excess"] is None else f"{r['best_excess']:+.3g}"
        lines.append(
            f"| {table.labels[i]} | {group_of[i]} | {r['min_step']}: "
            f"{pm(r['min'], r['min_stderr'])} | {pm(r['final'], r['final_stderr'])} "
            f"| {r['rise_z']:.1f} | {g(r['proxy_at_min'])} -> {g(a['final_proxy'])} "
            f"({r['proxy_change_z']:+.1f}) | {_u(r['u_shape'])} | {g(a['flag_step'])} "
            f"| {g(r['lag'])} | {excess} | {_level(r, 'teacher')} | {vs} |"
            + (f" {_level(r, 'oracle')} |" if oracle else "")
        )
    without = [table.labels[i] for i, r in enumerate(refs) if r is None]
    if without:
        lines += ["", f"Without {REF} in their metrics (older workdirs): {', '.join(without)}."]
    better = [i for i in with_ref if refs[i]["better_than_teacher"]]
    if better:
        runs = ", ".join(f"{table.labels[i]} ({refs[i]['vs_teacher_z']:+.1f} se)" for i in better)
        lines += [
            "",
            f"**Warning**: the student ends better than its teacher on the references ({runs}): "
            "an early-stopped or regularised student, not distillation, explains it.",
        ]
    return lines


REFERENCE_NOTE = (
    f"- Reference cross-entropy: rise = final - minimum, (se) in units of sqrt(se_min^2 + "
    f"se_final^2), U shape = a rise above {findings.RISE_Z:g} se while the proxy ends below "
    "its value at the minimum; lag = flag step - its minimum step; oracle-free keep = how much "
    "worse it is at the checkpoint the oracle-free rule keeps than at its minimum (nats). "
    "Final - teacher (se) in units of their combined stderr; below "
    f"-{reference.BETTER_Z:g} the report warns."
)

FIELD_NOTES = [
    "- Field mode: no oracle, so nothing in the report compares the student with the oracle; "
    f"the reference cross-entropy ({REF}) stands in for it in findings 1-5 (they are not "
    "measurable without it) and finding 6 needs the proxy alone. A report mixing workdirs "
    "is in field mode when any run is.",
    "- Each row of the runs table comes from the metrics file in its last column (the lines "
    "with evaluator keys; a step logged twice keeps the later line); wall time from the "
    "run's `COMPLETE.json`.",
    "- The analysis uses the evaluations at step >= 1. The step-0 evaluation (before "
    "distillation) is the start of the proxy curves and of finding 2, and is left out of "
    "log-step axes.",
    REFERENCE_NOTE,
    "- Verdict and flag step come from `diagnostics.verdict` on the proxy alone with the "
    "default detector, fed what the run's guard was fed (from the end of warmup, no stderrs; "
    "docs/diagnostics.md). Oracle-free keep = the checkpoint the oracle-free rule keeps "
    "(section 6 there).",
    "- Plots: a group of >= 2 seeds is the mean over seeds with a min-max band (on the steps "
    "every seed evaluated), faint lines are single seeds; a single run has a +- stderr band.",
    "- Findings compare group means over seeds; 'not run' means these runs cannot decide it.",
]

"""The text of report.md: what was run, the tables, the findings of docs/method.md, the notes.

Pure formatting and decisions over `report.analyse` dicts (numpy only). Each finding is
decided from numbers printed in the report, per run or per group (runs that differ only in
seed; group values are means over seeds).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath

import numpy as np

from thack_jax.core import storage

ONLINE = ("online_teacher", "online_student")
RISE_Z = 2.0  # a golden rise is significant above this many combined stderrs
STATUS = {True: "reproduced", False: "not reproduced", None: "not run"}


def _g(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _pm(value, se) -> str:
    return f"{value:.4g} ± {se:.2g}"


def _wall(seconds) -> str:
    if seconds is None:
        return "incomplete"
    if not np.isfinite(seconds):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _relative(path: str, start: str) -> str:
    """`path` as the report names it from `start` (its folder): relative when both are
    local or both in the same bucket, else in full (a local report of a gs:// workdir)."""
    if not storage.is_remote(path) and not storage.is_remote(start):
        return os.path.relpath(path, start)
    (scheme, _, rest), (start_scheme, _, start_rest) = path.partition("://"), start.partition("://")
    bucket, _, key = rest.partition("/")
    start_bucket, _, start_key = start_rest.partition("/")
    if (scheme, bucket) != (start_scheme, start_bucket) or not storage.is_remote(start):
        return path
    return posixpath.relpath("/" + key, "/" + start_key)


def _data(cfg: dict) -> str:
    offline = f"{cfg['num_prompts']} prompts x {cfg['completions_per_prompt']}"
    if cfg["regime"] == "offline":
        return offline
    if cfg["regime"] == "mixed":
        return f"{offline} + {100 * cfg['online_fraction']:g}% online {cfg['online_role']}"
    return f"fresh {cfg['regime'].removeprefix('online_')} samples per batch"


def group_stats(group, analyses: list[dict]) -> dict:
    """Means over the group's seeds, and counts of U shapes and flagged runs."""
    a = [analyses[i] for i in group.members]
    out = {k: float(np.mean([x[k] for x in a])) for k in ("golden_rise", "golden_rise_z")}
    out.update({k: float(np.mean([x[k] for x in a])) for k in ("final_golden", "final_proxy")})
    rises = [x["golden_rise"] for x in a]
    out.update(n=len(a), rise_min=min(rises), rise_max=max(rises))
    out["u"] = sum(bool(x["u_shape"]) for x in a)
    out["flagged"] = sum(x["flag_step"] is not None for x in a)
    return out


# ------------------------------------------------------------------------------ findings
def _of(groups, regime):
    return [g for g in groups if g.config["regime"] == regime]


def _f1_u_shape(runs, labels, analyses, groups, stats):
    # The finding is about many epochs of one completion per prompt (the paper's offline
    # set); more completions per prompt are finding 5's generation budget, which is meant
    # to weaken hacking, so those runs are reported but do not decide this finding.
    offline = [i for i, r in enumerate(runs) if r.config["regime"] == "offline"]
    idx = [i for i in offline if runs[i].config.get("completions_per_prompt", 1) == 1]
    if not idx:
        return None, "No offline run with one completion per prompt."
    u = [i for i in idx if analyses[i]["u_shape"]]
    per_run = "; ".join(
        f"{labels[i]}: golden {_g(a['golden_min'])} at step {a['golden_min_step']} -> "
        f"{_g(a['final_golden'])} (rise {a['golden_rise_z']:.1f} se), proxy "
        f"{_g(a['proxy_at_golden_min'])} -> {_g(a['final_proxy'])}"
        for i, a in ((i, analyses[i]) for i in idx)
    )
    text = f"{len(u)} of {len(idx)} offline runs with one completion per prompt show a U shape"
    others = len(offline) - len(idx)
    if others:
        n_u = sum(bool(analyses[i]["u_shape"]) for i in offline if i not in idx)
        text += f" ({n_u} of {others} runs with more completions per prompt do)"
    return len(u) == len(idx), f"{text}. {per_run}."


def _f2_online_monotone(runs, labels, analyses, groups, stats):
    idx = [i for i, r in enumerate(runs) if r.config["regime"] in ONLINE]
    if not idx:
        return None, "No online_teacher or online_student run."
    ok, parts = 0, []
    for i in idx:
        a = analyses[i]
        good = (
            a["golden_rise_z"] <= RISE_Z
            and a["final_golden"] < a["start_golden"]
            and a["final_proxy"] < a["start_proxy"]
        )
        ok += good
        parts.append(
            f"{labels[i]}: golden {_g(a['start_golden'])} -> {_g(a['final_golden'])}, rise "
            f"after its minimum {a['golden_rise_z']:.1f} se; proxy {_g(a['start_proxy'])} -> "
            f"{_g(a['final_proxy'])}{'' if good else ' (fails)'}"
        )
    text = (
        f"{ok} of {len(idx)} online runs end below their start on both metrics with no "
        f"significant golden rise (<= {RISE_Z:g} se). " + "; ".join(parts) + "."
    )
    return ok == len(idx), text


def _offline_reference(group, offline):
    """Offline groups with the mixed group's offline data, else all of its experiment's."""
    same = [o for o in offline if o.experiment == group.experiment]
    match = [
        o
        for o in same
        if all(o.config[k] == group.config[k] for k in ("num_prompts", "completions_per_prompt"))
    ]
    return match or same


def _f3_mixed(runs, labels, analyses, groups, stats):
    mixed, offline = _of(groups, "mixed"), _of(groups, "offline")
    pairs = [(g, _offline_reference(g, offline)) for g in mixed]
    pairs = [(g, ref) for g, ref in pairs if ref]
    if not pairs:
        return None, "Needs a mixed run and an offline run of the same experiment."
    ok, parts = 0, []
    for g, ref in pairs:
        ref_rise = float(np.mean([stats[o.label]["golden_rise"] for o in ref]))
        s = stats[g.label]
        ok += s["golden_rise"] < ref_rise
        parts.append(
            f"{g.label}: golden rise {_g(s['golden_rise'])} ({s['golden_rise_z']:.1f} se) vs "
            f"{_g(ref_rise)} for {', '.join(o.label for o in ref)}"
        )
    text = f"{ok} of {len(pairs)} mixed groups rise less than offline. " + "; ".join(parts) + "."
    return ok == len(pairs), text


def _ordered_sets(groups, bucket_key, order_key):
    """Offline groups bucketed by `bucket_key`, each bucket with >= 2 values of `order_key`,
    sorted by it."""
    buckets = {}
    for g in _of(groups, "offline"):
        buckets.setdefault((g.experiment, bucket_key(g.config)), []).append(g)
    return [
        sorted(b, key=lambda g: order_key(g.config))
        for b in buckets.values()
        if len({order_key(g.config) for g in b}) >= 2
    ]


def _f4_prompt_diversity(runs, labels, analyses, groups, stats):
    sets = _ordered_sets(
        groups,
        lambda c: c["num_prompts"] * c["completions_per_prompt"],
        lambda c: -c["num_prompts"],
    )
    if not sets:
        return (
            None,
            "Needs offline groups of equal size (prompts x completions) with fewer prompts.",
        )
    ok, parts = 0, []
    for s in sets:
        rises = [stats[g.label]["golden_rise"] for g in s]
        ok += bool(np.all(np.diff(rises) > 0))
        parts.append(", ".join(f"{g.label}: rise {_g(r)}" for g, r in zip(s, rises, strict=True)))
    text = (
        f"Golden rise grows as the prompts get fewer in {ok} of {len(sets)} sets of equal "
        "size. " + "; ".join(parts) + "."
    )
    return ok == len(sets), text


def _f5_completions(runs, labels, analyses, groups, stats):
    sets = _ordered_sets(groups, lambda c: c["num_prompts"], lambda c: c["completions_per_prompt"])
    if not sets:
        return None, "Needs offline groups with the same prompts and more completions per prompt."
    ok, parts = 0, []
    for s in sets:
        golden = [stats[g.label]["final_golden"] for g in s]
        proxy = [stats[g.label]["final_proxy"] for g in s]
        ok += bool(np.all(np.diff(golden) < 0) and np.all(np.diff(proxy) < 0))
        parts.append(
            ", ".join(
                f"{g.label}: final proxy {_g(p)}, golden {_g(q)}"
                for g, p, q in zip(s, proxy, golden, strict=True)
            )
        )
    text = (
        f"Both final metrics fall with more completions per prompt in {ok} of {len(sets)} "
        "sets. " + "; ".join(parts) + "."
    )
    return ok == len(sets), text


def _keep(a) -> str:
    if a.get("best_step") is None:
        return "n/a"
    return f"{a['best_step']} ({a['best_golden_excess']:+.3g})"


def _f6_detector(runs, labels, analyses, groups, stats):
    def flagged(regimes):
        idx = [i for i, r in enumerate(runs) if r.config["regime"] in regimes]
        hit = [i for i in idx if analyses[i]["flag_step"] is not None]
        return idx, hit

    off, off_hit = flagged(("offline",))
    on, on_hit = flagged(ONLINE)
    if not off or not on:
        return None, "Needs offline and online runs."
    flags = "; ".join(
        f"{labels[i]}: step {analyses[i]['flag_step']} (lag {_g(analyses[i]['lag'])})"
        for i in off_hit + on_hit
    )
    lags = [analyses[i]["lag"] for i in off_hit]
    median_lag = (
        f" Median lag after the golden minimum: {_g(float(np.median(lags)))} steps." if lags else ""
    )
    text = (
        f"Flagged: {len(off_hit)} of {len(off)} offline runs, {len(on_hit)} of {len(on)} "
        f"online runs.{median_lag} {flags or 'No flags'}."
    )
    return len(off_hit) == len(off) and not on_hit, text


FINDINGS = (
    ("Offline, many epochs: proxy falls, golden falls then rises (U shape)", _f1_u_shape),
    ("Online teacher and online student: both metrics fall monotonically", _f2_online_monotone),
    ("A small online fraction (about 10%) stabilises the golden metric", _f3_mixed),
    ("Fewer unique prompts (same data size) make hacking stronger", _f4_prompt_diversity),
    ("More generations per prompt make both metrics better", _f5_completions),
    ("The proxy's power-law deviation flags hacking without the oracle", _f6_detector),
)


def findings(runs, labels, analyses, groups) -> list[tuple[str, bool | None, str]]:
    """(title, True / False / None = reproduced / not / not run, the numbers) per finding."""
    stats = {g.label: group_stats(g, analyses) for g in groups}
    return [(t, *f(runs, labels, analyses, groups, stats)) for t, f in FINDINGS]


# ------------------------------------------------------------------------------ markdown
def _experiment_lines(exp: dict) -> list[str]:
    if not exp:
        return ["- experiment.json: not found"]

    def spec(role):
        s = exp.get(role) or {}
        text = f"`{s.get('size', '?')}`"
        if s.get("overrides"):
            text += " (" + ", ".join(f"{k}={v}" for k, v in dict(s["overrides"]).items()) + ")"
        return text + (f" from `{s['checkpoint']}`" if s.get("checkpoint") else "")

    def sft(key, examples):
        t = exp.get(key) or {}
        n = exp.get(examples) or "all"
        return f"SFT {t.get('num_steps')} steps, batch {t.get('batch_size')}, lr " + (
            f"{t.get('learning_rate')}, on {n} oracle examples"
        )

    options = f", options {dict(exp['task_options'])}" if exp.get("task_options") else ""
    return [
        f"- task: `{exp.get('task')}` (inputs {exp.get('max_input_length')} tokens, targets "
        f"{exp.get('max_target_length')}{options})",
        f"- oracle: {spec('oracle')}, logit scale {exp.get('oracle_logit_scale')}; oracle "
        f"data: {exp.get('oracle_data_prompts')} prompts",
        f"- teacher: {spec('teacher')}; {sft('teacher_sft', 'teacher_sft_examples')}",
        f"- student: {spec('student')}; {sft('student_sft', 'student_sft_examples')}",
        f"- experiment seed: {exp.get('seed')}",
    ]


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
        for g in self.groups:
            bad = [i for i in g.members if not 0 <= i < n]
            if bad:
                raise ValueError(
                    f"ReportRuns: group {g.label!r} has members {bad} not in 0..{n - 1}"
                )


def render(workdirs, out_dir, metric, table: ReportRuns, plot_files) -> str:
    """The whole report.md text of `table`'s runs (plot_files: (file name, title) pairs)."""
    runs, labels, analyses = table.runs, table.labels, table.analyses
    groups, experiments = table.groups, table.experiments
    lines = ["# Teacher-hacking report", ""]
    lines += [
        f"Metric: `{metric}` (proxy = `proxy/{metric}`, student vs teacher; golden = "
        f"`golden/{metric}`, student vs oracle; nats per response, lower is better). Built by "
        "`python launch/report.py` from " + ", ".join(f"`{w}`" for w in workdirs) + ".",
        "",
        "## What was run",
        "",
    ]
    for k, exp in enumerate(experiments):
        dirs = sorted({r.workdir for r in runs if r.experiment == exp})
        head = f"Experiment {k + 1} " if len(experiments) > 1 else ""
        lines += [f"{head}(`experiment.json` of {', '.join(dirs)}):", ""]
        lines += _experiment_lines(exp) + [""]
    seeds = sorted({r.config["seed"] for r in runs})
    n_groups = f"{len(groups)} group{'s' if len(groups) > 1 else ''}"
    lines += [
        f"{len(runs)} run{'s' if len(runs) > 1 else ''} in {n_groups}; run seeds: {seeds}.",
        "",
    ]
    lines += ["## Runs", ""]
    lines += [
        "| run | group | regime | data | seed | evals (last step) | golden min: step, value "
        "| final golden | golden rise (se) | proxy at golden min -> final (se) | U shape "
        "| verdict | flag step | lag | oracle-free keep: step (golden - min) | wall "
        "| metrics file |",
        "|" + "---|" * 17,
    ]
    group_of = {i: g.label for g in groups for i in g.members}
    for i, (run, label, a) in enumerate(zip(runs, labels, analyses, strict=True)):
        u = {True: "yes", False: "no", None: "n/a"}[a["u_shape"]]
        verdict = a["verdict"] + (f" ({a['reason']})" if a.get("reason") else "")
        lines.append(
            f"| {label} | {group_of[i]} | {run.config['regime']} | {_data(run.config)} "
            f"| {run.config['seed']} | {a['n_evals']} ({a['last_step']}) "
            f"| {a['golden_min_step']}: {_pm(a['golden_min'], a['golden_min_stderr'])} "
            f"| {_pm(a['final_golden'], a['final_golden_stderr'])} | {a['golden_rise_z']:.1f} "
            f"| {_g(a['proxy_at_golden_min'])} -> {_g(a['final_proxy'])} "
            f"({a['proxy_change_z']:+.1f}) | {u} | {verdict} | {_g(a['flag_step'])} "
            f"| {_g(a['lag'])} | {_keep(a)} | {_wall(run.wall_seconds)} "
            f"| `{_relative(run.metrics_path, out_dir)}` |"
        )
    lines += ["", "## Groups (runs that differ only in seed)", ""]
    lines += [
        "| group | runs | golden rise, mean (min..max) | rise (se), mean | final golden, mean "
        "| final proxy, mean | U shape | flagged |",
        "|" + "---|" * 8,
    ]
    for g in groups:
        s = group_stats(g, analyses)
        names = ", ".join(labels[i] for i in g.members)
        lines.append(
            f"| {g.label} | {names} | {_g(s['golden_rise'])} ({_g(s['rise_min'])}.."
            f"{_g(s['rise_max'])}) | {s['golden_rise_z']:.1f} | {_g(s['final_golden'])} "
            f"| {_g(s['final_proxy'])} | {s['u']}/{s['n']} | {s['flagged']}/{s['n']} |"
        )
    lines += ["", "## Plots", ""]
    for name, title in plot_files:
        lines += [f"### {title}", "", f"![{title}](plots/{name})", ""]
    lines += ["## Findings (docs/method.md)", ""]
    for k, (title, status, text) in enumerate(findings(runs, labels, analyses, groups), 1):
        lines += [f"{k}. **{title}**: **{STATUS[status]}**. {text}", ""]
    lines += ["## Notes", "", *NOTES]
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
]

"""Tests of the reference levels in the report (reporting/levels.py): the columns of the runs
and groups tables, the lines handed to the plots, the warning exactly when a final golden is
below the teacher's, and run summaries with and without levels."""

import json
import os

import pytest
from test_report import make_workdir

from thack_jax.reporting import levels, plots, report, summary

NAMES = ("offline", "offline_s1", "online_teacher")


def _record(teacher_fkl, student_fkl=3.0, entropy=7.5):
    """A reference_levels.json record; the other divergences scaled as in test_report."""

    def model(fkl):
        divs = {"forward_kl": 1.0, "reverse_kl": 1.3, "js": 0.2}
        return {d: {"value": f * fkl, "stderr": 0.01} for d, f in divs.items()}

    return {
        "format": "thack_jax.reference_levels/1",
        "teacher": model(teacher_fkl),
        "student_init": model(student_fkl),
        "oracle_entropy": {
            "value": entropy,
            "stderr": 0.1,
            "per_token": 0.7,
            "per_token_stderr": 0,
        },
    }


def _workdir(path, record):
    workdir = make_workdir(path, names=NAMES)
    if record is not None:
        with open(os.path.join(workdir, levels.FILE), "w") as f:
            json.dump(record, f)
    return workdir


def _report(workdir, runs=None):
    return open(report.write_report([workdir], workdir, runs=runs)).read()


def _row(text, name):
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_columns_and_warning_below_the_teacher(tmp_path):
    # Finals: offline ~0.64 (both seeds), online_teacher ~0.46; the teacher's level between.
    text = _report(_workdir(tmp_path / "w", _record(0.5)))
    assert _row(text, "offline")[8:11] == ["0.5 ± 0.01", "3 ± 0.01", "7.5 ± 0.1"]
    assert "| offline N=64x1 | offline, offline_s1 |" in text
    group = _row(text, "offline N=64x1")
    assert group[5:8] == ["0.5 ± 0.01", "3 ± 0.01", "7.5 ± 0.1"]
    warnings = [x for x in text.splitlines() if x.startswith("**WARNING**")]
    assert len(warnings) == 1
    (warning,) = warnings
    final = next(
        report.analyse(r)["final_golden"]
        for r in report.load_runs([str(tmp_path / "w")])
        if r.name == "online_teacher"
    )
    assert final < 0.5
    assert f"runs: online_teacher ({final:.4g} < 0.5)" in warning
    assert f"group means: online_teacher (mean {final:.4g} < 0.5)" in warning
    assert "offline" not in warning.split("In these")[0].replace("online_teacher", "")
    assert "early stopping" in warning


def test_no_warning_when_every_run_ends_above_its_teacher(tmp_path):
    text = _report(_workdir(tmp_path / "w", _record(0.3)))
    assert "**WARNING**" not in text
    assert "No run and no group mean ends below its teacher's golden/forward_kl." in text
    # Another divergence reads its own level (js = 0.2 x forward_kl in these fakes).
    js = open(report.write_report([str(tmp_path / "w")], str(tmp_path / "w"), "js")).read()
    assert _row(js, "offline")[8] == "0.06 ± 0.01" and "**WARNING**" not in js


def test_warning_is_strict_and_per_group_mean(tmp_path):
    """A final golden equal to the teacher's is no warning; a group whose mean is below is
    named even when a member alone is not."""
    runs = report.load_runs([_workdir(tmp_path / "w", _record(0.5))])
    analyses = [report.analyse(r) for r in runs]
    groups, experiments = report.group_runs(runs)
    finals = {r.name: a["final_golden"] for r, a in zip(runs, analyses, strict=True)}
    mean = (finals["offline"] + finals["offline_s1"]) / 2
    # The teacher's level: exactly the offline group's mean, between its two seeds.
    low, high = sorted((finals["offline"], finals["offline_s1"]))
    assert low < mean < high
    for run in runs:
        run.levels = _record(mean)
    table = report.report_text.ReportRuns(runs, [r.name for r in runs], analyses, groups, [{}])
    group_finals = report.report_text._group_finals(table)
    (line,) = levels.warnings(table, "forward_kl", group_finals)
    lower = "offline" if finals["offline"] < mean else "offline_s1"
    assert f"runs: {lower} (" in line and "online_teacher (" in line
    assert "group means: online_teacher" in line and "offline N=64x1" not in line
    for run in runs:
        run.levels = _record(group_finals["online_teacher"])  # equal: not below
    (line,) = levels.warnings(table, "forward_kl", group_finals)
    assert "online_teacher" not in line


def test_plots_receive_the_levels(tmp_path, monkeypatch):
    seen = {}
    real_vs, real_pg = plots.plot_vs_step, plots.plot_proxy_golden

    def vs_step(path, groups, metric, levels=None):
        seen["vs_step"] = levels
        real_vs(path, groups, metric, levels=levels)

    def proxy_golden(path, panels, y_name="golden", y_label=None, levels=None):
        seen.setdefault("proxy_golden", []).append(levels)
        real_pg(path, panels, y_name, y_label, levels=levels)

    monkeypatch.setattr(plots, "plot_vs_step", vs_step)
    monkeypatch.setattr(plots, "plot_proxy_golden", proxy_golden)
    _report(_workdir(tmp_path / "w", _record(0.5)))
    assert seen["vs_step"] == {
        "golden": [
            ("teacher golden 0.5", 0.5, "--"),
            ("initial student golden 3", 3.0, "-."),
            ("oracle entropy 7.5", 7.5, ":"),
        ]
    }
    one, every = seen["proxy_golden"]
    assert one["forward_kl"] == [
        ("teacher golden 0.5", 0.5, "--"),
        ("initial student golden 3", 3.0, "-."),
    ]
    assert every["js"][0] == ("teacher golden 0.1", pytest.approx(0.1), "--")
    # Without levels: no lines.
    seen.clear()
    _report(_workdir(tmp_path / "none", None))
    assert seen["vs_step"] == {"golden": []}


def test_summaries_keep_the_levels_and_older_ones_read_as_na(tmp_path):
    workdir = _workdir(tmp_path / "w", _record(0.5))
    out = str(tmp_path / "summary")
    paths = summary.summarize([workdir], out)
    text = _report(out, runs=summary.load_summaries([out]))
    assert _row(text, "offline")[8:11] == ["0.5 ± 0.01", "3 ± 0.01", "7.5 ± 0.1"]
    assert "**WARNING**" in text
    for path in paths:  # a summary written before the levels existed lacks the field
        with open(path) as f:
            record = json.load(f)
        del record["reference_levels"]
        with open(path, "w") as f:
            json.dump(record, f)
    text = _report(out, runs=summary.load_summaries([out]))
    assert _row(text, "offline")[8:11] == ["n/a"] * 3 and "**WARNING**" not in text
    assert "Reference levels: n/a" in text


def test_unreadable_levels_file_is_a_report_error(tmp_path):
    workdir = _workdir(tmp_path / "w", None)
    with open(os.path.join(workdir, levels.FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(report.ReportError, match="reference_levels.json"):
        report.load_runs([workdir])

"""Tests of the report with reference metrics (reporting/reference.py, reference_text.py,
report_plots.py) and in field mode (no oracle), on test_report's synthetic workdirs: the
field-mode report has no golden value anywhere, decides findings 1-5 on the reference
cross-entropy (not measurable without it), warns when a student ends better than its
teacher; an oracle-mode report only gains the reference section."""

import os
import re

import pytest
from test_report import ENTROPY, GOLDEN_SE, Reference, _rows, make_workdir

from thack_jax.reporting import reference_text, report, summary


def _plots(workdir, text):
    """The file names of the plots the report links, each checked to be a drawn PNG."""
    links = re.findall(r"!\[[^]]*\]\((plots/[^)]+\.png)\)", text)
    for link in links:
        data = open(os.path.join(workdir, link), "rb").read()
        assert data[:4] == b"\x89PNG" and len(data) > 5000, link
    return [os.path.basename(link) for link in links]


def _statuses(text):
    return re.findall(r"^\d\. \*\*.*?\*\*: \*\*(.+?)\*\*\.", text, re.M)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """test_report's synthetic experiment, oracle mode without reference metrics."""
    return make_workdir(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """The runs of `oracle` (same seeds, so the same proxy curves) in a field-mode workdir:
    no golden keys, reference metrics with the golden's shape, the teacher's level 5.3."""
    workdir = make_workdir(tmp_path_factory.mktemp("field"), ref=Reference(), field=True)
    path = report.write_report([workdir], workdir)
    return workdir, path, open(path).read()


def test_analyse_field_mode(field, oracle):
    """No golden values; the verdict is the oracle-mode one of the same proxy; the reference
    cross-entropy (golden + a constant here) has the golden's minimum, rise, U shape, lag."""
    oracle_runs = {r.name: r for r in report.load_runs([oracle])}
    for run in report.load_runs([field[0]]):
        a, o = report.analyse(run), report.analyse(oracle_runs[run.name])
        assert a["mode"] == "field" and o["mode"] == "oracle"
        assert [k for k in a if "golden" in k] == []
        assert (a["verdict"], a["flag_step"], a["best_step"]) == (
            o["verdict"],
            o["flag_step"],
            o["best_step"],
        )
        r = a["reference"]
        assert (r["min_step"], r["u_shape"], r["lag"]) == (
            o["golden_min_step"],
            o["u_shape"],
            o["lag"],
        )
        assert r["rise"] == pytest.approx(o["golden_rise"], abs=1e-9)
        assert r["best_excess"] == pytest.approx(o["best_golden_excess"], abs=1e-9)
        assert r["start"] == pytest.approx(o["start_golden"] + ENTROPY)
        assert (r["teacher"], r["teacher_stderr"], r["oracle"]) == (5.3, GOLDEN_SE, None)
        assert not r["better_than_teacher"] and r["vs_teacher_z"] > 2


def test_field_report(field, oracle):
    workdir, path, text = field
    assert "golden" not in text.lower() and not re.search(r"\bnan\b", text)
    assert "Field mode: no oracle" in text and "(`reference/cross_entropy`)" in text
    assert "- oracle: none (field mode: no oracle); the task's references: 512 examples" in text
    assert "on all reference examples" in text
    a = report.analyse(next(r for r in report.load_runs([oracle]) if r.name == "offline"))
    runs_row, ref_row = _rows(text, "offline")
    assert runs_row[6:10] == [
        f"12 -> {a['final_proxy']:.4g} ± {a['final_proxy_stderr']:.2g}",
        "teacher_hacking",
        str(a["flag_step"]),
        str(a["best_step"]),
    ]
    assert ref_row[2] == f"{a['golden_min_step']}: {a['golden_min'] + ENTROPY:.4g} ± 0.005"
    assert ref_row[6:9] == ["yes", str(a["flag_step"]), str(a["lag"])]
    assert ref_row[10] == "5.3 ± 0.005" and len(ref_row) == 12  # no oracle's level
    assert "| offline N=64x1 | offline, offline_s1 | " in text
    assert _statuses(text) == ["reproduced on the reference cross-entropy"] * 5 + ["reproduced"]
    assert "2 of 2 offline runs with one completion per prompt show a U shape" in text
    assert "Median lag after the reference cross-entropy minimum" in text
    assert "**Warning**" not in text  # every student ends above its teacher's level
    assert _plots(workdir, text) == [
        "forward_kl_vs_step.png",
        "proxy_reference_forward_kl.png",
        "power_law_forward_kl.png",
        "reference_cross_entropy.png",
    ]


def test_field_report_without_reference_metrics(tmp_path):
    workdir = make_workdir(tmp_path / "w", names=("offline", "online_teacher"), field=True)
    text = open(report.write_report([workdir], workdir)).read()
    assert "golden" not in text.lower() and not re.search(r"\bnan\b", text)
    assert "| reference CE" not in text  # no empty columns: the section says why
    assert "No run logged `reference/cross_entropy`: without an oracle and without it" in text
    assert _statuses(text) == ["not measurable (field mode: no oracle)"] * 5 + ["reproduced"]
    assert "Flagged: 1 of 1 offline runs, 0 of 1 online runs. offline: step 2000." in text
    assert _plots(workdir, text) == ["forward_kl_vs_step.png", "power_law_forward_kl.png"]


def test_warning_when_a_student_ends_better_than_its_teacher(tmp_path):
    """Warned beyond 2 combined stderrs only: the offline student ends at 5.637 on the
    references, 9 se below a teacher at 5.7; the online one at 5.457, 0.7 se below 5.462."""
    refs = {"offline": Reference(teacher=5.7), "online_teacher": Reference(teacher=5.462)}
    names = ("offline", "online_teacher")
    workdir = make_workdir(tmp_path / "w", names, ref=Reference(), refs=refs, field=True)
    text = open(report.write_report([workdir], workdir)).read()
    runs = {r.name: report.analyse(r)["reference"] for r in report.load_runs([workdir])}
    z = runs["offline"]["vs_teacher_z"]
    assert z < -2 < runs["online_teacher"]["vs_teacher_z"] < 0
    warnings = [line for line in text.splitlines() if "Warning" in line]
    assert warnings == [
        f"**Warning**: the student ends better than its teacher on the references (offline "
        f"({z:+.1f} se)): an early-stopped or regularised student, not distillation, explains it."
    ]


def test_oracle_report_with_reference_metrics(tmp_path):
    """The oracle-mode report of runs with reference metrics is the one of the same runs
    without them plus the reference section (with the oracle's level), its plot and note."""
    names = ("offline", "online_teacher")
    plain = make_workdir(tmp_path / "plain", names)
    refs = {"offline": Reference(teacher=5.7)}
    with_ref = make_workdir(tmp_path / "ref", names, ref=Reference(), refs=refs)
    a = open(report.write_report([plain], plain)).read()
    b = open(report.write_report([with_ref], with_ref)).read()
    section = b[b.index("\n## Reference cross-entropy") : b.index("\n## Plots")]
    assert "oracle samples" in section and "| oracle's level |" in section
    assert _rows(section, "offline")[0][-3:] == ["5.7 ± 0.005", "-0.0629 (-8.9)", "5 ± 0.005"]
    assert "**Warning**: the student ends better than its teacher" in section
    title = "Reference cross-entropy vs step, the teacher's and the oracle's levels"
    plot = f"### {title}\n\n![{title}](plots/reference_cross_entropy.png)\n\n"
    assert plot in b and _plots(with_ref, b)[-1] == "reference_cross_entropy.png"
    stripped = b.replace(section, "").replace(plot, "")
    stripped = stripped.replace("\n" + reference_text.REFERENCE_NOTE, "").replace(with_ref, plain)
    assert stripped == a


def test_field_report_from_run_summaries(field, tmp_path):
    """Run summaries keep the reference metrics and the mode: the same field-mode report."""
    workdir, _, text = field
    out = str(tmp_path / "summaries")
    summary.summarize([workdir], out)
    runs = summary.load_summaries([out])
    assert all(r.experiment["mode"] == "field" for r in runs)
    again = open(report.write_report([out], str(tmp_path), runs=runs)).read()
    strip = re.compile(r"`[^`]*(metrics\.jsonl|\.json)` \|$", re.M)
    a, b = (strip.sub("SOURCE |", t) for t in (text, again))
    assert a.replace(workdir, "SOURCES") == b.replace(out, "SOURCES")


def test_mode_and_reference_errors(tmp_path):
    workdir = make_workdir(tmp_path / "w", names=("offline",), ref=Reference(), field=True)
    (run,) = report.load_runs([workdir])
    del run.metrics["reference/cross_entropy_stderr"]
    with pytest.raises(report.ReportError, match="has 'reference/cross_entropy' but not .*_stderr"):
        report.analyse(run)
    run.experiment = dict(run.experiment, mode="fld")
    with pytest.raises(report.ReportError, match=r"experiment.json: experiment mode is 'fld'"):
        report.analyse(run)

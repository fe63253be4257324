r"""Rebuilds the teacher-hacking report (report.md + plots/) from workdirs or run summaries.

  python launch/report.py --workdir=DIR [--workdir=DIR2 ...] [--out_dir=DIR] \
      [--metric=forward_kl]
  python launch/report.py --summary_dir=docs/reproduction/runs --out_dir=docs/reproduction
  python launch/report.py --workdir=DIR --write_summary=docs/reproduction/runs
  python launch/report.py --workdir=DIR --reference_check=docs/field
  python launch/report.py --summary_dir=A --summary_dir=B ... --sensitivity=OUT.md

Reads every `DIR/runs/<name>/train/metrics.jsonl` (with `run.json` beside it) and
`DIR/experiment.json`, and/or every run summary `SUMMARY_DIR/*.json`
(`thack_jax/reporting/summary.py`); writes `OUT_DIR/report.md` and `OUT_DIR/plots/*.png`
(default OUT_DIR: the first workdir) and prints the findings. With --write_summary it
writes the workdirs' run summaries into that directory instead of a report; with
--sensitivity, the sensitivity table (reporting/sensitivity.py) of the runs instead. Every path may
be local or a URI (gs://...). Neither jax nor tensorflow is imported.
"""

from __future__ import annotations

from absl import app, flags

from thack_jax.cli import common
from thack_jax.core import storage
from thack_jax.reporting import reference_check, report, sensitivity, summary  # noqa: E402

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common)  # --help lists --verbose
flags.DEFINE_multi_string("workdir", None, "Experiment workdir (repeat for several).")
flags.DEFINE_multi_string(
    "summary_dir", None, "Directory of run summaries, *.json (repeat for several)."
)
flags.DEFINE_string("out_dir", None, "Where report.md and plots/ go; default: the first workdir.")
flags.DEFINE_enum("metric", "forward_kl", report.DIVERGENCES, "Divergence of the analysis.")
flags.DEFINE_string(
    "write_summary", None, "Write the workdirs' run summaries into this directory (no report)."
)
flags.DEFINE_string(
    "sensitivity",
    None,
    "Write the sensitivity table (teacher error x steps x regime, pooled over worlds) of the "
    "runs to this markdown file instead of a report.",
)
flags.DEFINE_string(
    "reference_check",
    None,
    "Write the reference-metric check of one oracle-mode --workdir into this directory.",
)


def _sources() -> tuple[list[str], list[str]]:
    workdirs, summary_dirs = FLAGS.workdir or [], FLAGS.summary_dir or []
    if not workdirs and not summary_dirs:
        raise app.UsageError("--workdir or --summary_dir is required (repeat for several)")
    return workdirs, summary_dirs


def _runs(workdirs: list[str], summary_dirs: list[str]) -> list:
    return (report.load_runs(workdirs) if workdirs else []) + summary.load_summaries(summary_dirs)


def _report() -> str:
    workdirs, summary_dirs = _sources()
    if not FLAGS.out_dir and not workdirs:
        raise app.UsageError("--out_dir is required with --summary_dir alone")
    runs = _runs(workdirs, summary_dirs)
    out_dir = FLAGS.out_dir or workdirs[0]
    return report.write_report(workdirs + summary_dirs, out_dir, FLAGS.metric, runs=runs)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.reference_check is not None:
        if not FLAGS.workdir or len(FLAGS.workdir) != 1:
            raise app.UsageError("--reference_check needs exactly one --workdir")
        path = reference_check.write(FLAGS.workdir[0], FLAGS.reference_check)
        print(f"report: {path}")
        print(reference_check.summary_line(reference_check.agreement(FLAGS.workdir[0])))
        return
    if FLAGS.write_summary is not None:
        if not FLAGS.workdir or FLAGS.summary_dir:
            raise app.UsageError("--write_summary needs --workdir (and no --summary_dir)")
        paths = summary.summarize(FLAGS.workdir, FLAGS.write_summary)
        print(f"report: {len(paths)} run summaries in {FLAGS.write_summary}")
        return
    if FLAGS.sensitivity is not None:
        workdirs, summary_dirs = _sources()
        runs = _runs(workdirs, summary_dirs)
        print(sensitivity.write(runs, FLAGS.sensitivity, workdirs + summary_dirs, FLAGS.metric))
        return
    path = _report()  # ReportError is a ValueError (one line, common.run); so are bad JSON lines
    print(f"report: {path}")
    if not storage.exists(path):  # another process than 0 of a multi-process run
        return
    text = storage.read_text(path)
    findings = text[text.find("## Findings") : text.find("## Notes")].strip()
    print(findings)


def run() -> None:
    """Console script `thack-report` (and `python launch/report.py`)."""
    common.run(main, "report.py")


if __name__ == "__main__":
    run()

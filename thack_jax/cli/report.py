r"""Rebuilds the teacher-hacking report (report.md + plots/) from experiment workdirs.

  python launch/report.py --workdir=DIR [--workdir=DIR2 ...] [--out_dir=DIR] \
      [--metric=forward_kl]

Reads every `DIR/runs/<name>/train/metrics.jsonl` (with `run.json` beside it) and
`DIR/experiment.json`; writes `OUT_DIR/report.md` and `OUT_DIR/plots/*.png` (default OUT_DIR:
the first workdir) and prints the findings. Neither jax nor tensorflow is imported.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from thack_jax.reporting import report  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Experiment workdir (repeat for several).")
flags.DEFINE_string("out_dir", None, "Where report.md and plots/ go; default: the first workdir.")
flags.DEFINE_enum("metric", "forward_kl", report.DIVERGENCES, "Divergence of the analysis.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (repeat it for several workdirs)")
    out_dir = FLAGS.out_dir or FLAGS.workdir[0]
    try:
        path = report.write_report(FLAGS.workdir, out_dir, FLAGS.metric)
    except (ValueError, OSError) as e:  # ReportError is a ValueError; so are bad JSON lines
        sys.exit(f"report: error: {e}")
    print(f"report: {path}")
    if not os.path.exists(path):  # another process than 0 of a multi-process run
        return
    with open(path) as f:
        text = f.read()
    findings = text[text.find("## Findings") : text.find("## Notes")].strip()
    print(findings)


def run() -> None:
    """Console script `thack-report` (and `python launch/report.py`)."""
    app.run(main)


if __name__ == "__main__":
    run()

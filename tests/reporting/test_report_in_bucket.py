"""The report and the run summaries of a gs:// workdir, written into the bucket: the same
report.md (but for the workdir's name), the same plots, the same analyses as from a local
copy of the workdir."""

import os

import pytest
from _fake_gcs import (  # noqa: F401  (fixtures)
    bucket_fixture,
    gcs_bucket,
    gcs_server,
    memory_bucket_fixture,
    upload,
)
from test_report import make_workdir
from test_summary import _add_per_prompt, _same

from thack_jax.core import storage
from thack_jax.hacking import diagnostics, guard
from thack_jax.reporting import report, summary


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A small workdir (a U-shaped offline run with guard settings and per-prompt values,
    an online run) and its report."""
    path = make_workdir(tmp_path_factory.mktemp("exp") / "exp", names=("offline", "online_teacher"))
    settings = guard.guard_settings(1200, "proxy/forward_kl", diagnostics.DetectorConfig())
    storage.write_json(os.path.join(path, "runs", "offline", guard.GUARD_FILE), settings)
    _add_per_prompt(path, "offline", 0)
    out = str(tmp_path_factory.mktemp("report"))
    return path, out, storage.read_text(report.write_report([path], out))


def test_report_of_a_bucket_workdir(bucket, local):
    workdir, local_out, local_text = local
    remote = upload(workdir, f"{bucket}/exp")
    out = f"{bucket}/exp/report"
    path = report.write_report([remote], out)
    assert path == f"{out}/report.md"
    text = storage.read_text(path)
    assert "| `../runs/offline/train/metrics.jsonl` |" in text
    assert text.replace(remote, "WORKDIR") == local_text.replace(workdir, "WORKDIR").replace(
        f"`{os.path.relpath(os.path.join(workdir, 'runs'), local_out)}/", "`../runs/"
    )
    plots = storage.listdir(f"{out}/plots")
    assert plots == sorted(os.listdir(os.path.join(local_out, "plots"))) and len(plots) == 4
    for name in plots:
        got = storage.read_bytes(f"{out}/plots/{name}")
        assert got == storage.read_bytes(os.path.join(local_out, "plots", name)), name


def test_summaries_in_a_bucket(memory_bucket, local):
    workdir = local[0]
    remote = upload(workdir, f"{memory_bucket}/exp")
    paths = summary.summarize([remote], f"{memory_bucket}/summaries")
    assert paths == [f"{memory_bucket}/summaries/{n}.json" for n in ("offline", "online_teacher")]
    runs = summary.load_summaries([f"{memory_bucket}/summaries"])
    for run, reference in zip(runs, report.load_runs([workdir]), strict=True):
        assert run.noise_covs is not None or run.name == "online_teacher"
        _same(report.analyse(run), report.analyse(reference))
    with pytest.raises(report.ReportError, match="summary directory not found: gs://"):
        summary.load_summaries([f"{memory_bucket}/absent"])
    with pytest.raises(report.ReportError, match="workdir not found: gs://"):
        report.load_runs([f"{memory_bucket}/absent"])

"""The light CLIs on gs:// paths: launch/report.py and launch/diagnose.py in subprocesses
against the GCS emulator (the only bucket another process can reach), eval.py's loaders
in-process on an in-memory bucket; no local 'gs:' folder appears."""

import dataclasses
import json
import os

import numpy as np
import pytest
from _cli_common import REPO, run_light_script
from _fake_gcs import gcs_bucket, gcs_server, memory_bucket_fixture, upload  # noqa: F401
from test_report import make_workdir
from test_summary import _add_per_prompt

from thack_jax import models
from thack_jax.cli import eval_inputs as eval_cli
from thack_jax.core import storage
from thack_jax.hacking import diagnostics, guard


@pytest.fixture
def remote_workdir(gcs_bucket, tmp_path):  # noqa: F811  (the imported fixture)
    """A synthetic experiment (offline run with guard settings and per-prompt values, an
    online run) uploaded to the emulator's bucket."""
    local = make_workdir(tmp_path / "exp", names=("offline", "online_teacher"))
    settings = guard.guard_settings(1200, "proxy/forward_kl", diagnostics.DetectorConfig())
    storage.write_json(os.path.join(local, "runs", "offline", guard.GUARD_FILE), settings)
    _add_per_prompt(local, "offline", 0)
    yield upload(local, f"{gcs_bucket}/exp")
    assert not os.path.exists(REPO / "gs:"), "a local folder named 'gs:' was written"


def _ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported:" not in result.stdout
    return result.stdout


def test_report_cli_on_a_bucket(remote_workdir):
    out = _ok(run_light_script("report", f"--workdir={remote_workdir}", timeout=300))
    assert f"report: {remote_workdir}/report.md" in out and "## Findings" in out
    assert len(storage.listdir(f"{remote_workdir}/plots")) == 4
    summaries, report_dir = f"{remote_workdir}/summaries", f"{remote_workdir}/from_summaries"
    out = _ok(
        run_light_script("report", f"--workdir={remote_workdir}", f"--write_summary={summaries}")
    )
    assert storage.listdir(summaries) == ["offline.json", "online_teacher.json"]
    args = (f"--summary_dir={summaries}", f"--out_dir={report_dir}")
    out = _ok(run_light_script("report", *args, timeout=300))
    assert "| `../summaries/offline.json` |" in storage.read_text(f"{report_dir}/report.md")


def test_diagnose_cli_on_a_bucket(remote_workdir):
    metrics = f"{remote_workdir}/runs/offline/train/metrics.jsonl"
    plot = f"{remote_workdir}/curves.png"
    out = _ok(run_light_script("diagnose", f"--metrics={metrics}", f"--plot={plot}"))
    assert "steps 1200..4000" in out  # min_step from the run's guard_settings.json
    assert f"per-prompt values in {remote_workdir}/runs/offline/train/per_prompt" in out
    assert storage.read_bytes(plot)[:4] == b"\x89PNG"
    result = run_light_script("diagnose", f"--metrics={remote_workdir}/absent.jsonl")
    assert result.returncode == 1
    assert f"metrics file not found: {remote_workdir}/absent.jsonl" in result.stderr


def test_eval_loaders_read_a_bucket(memory_bucket):
    prompts = np.arange(12, dtype=np.int32).reshape(3, 4)
    storage.save_npy(f"{memory_bucket}/prompts.npy", prompts)
    np.testing.assert_array_equal(
        eval_cli.load_prompts(f"{memory_bucket}/prompts.npy", "p"), prompts
    )
    config = models.get_config("tiny")
    storage.write_json(f"{memory_bucket}/tiny.json", dataclasses.asdict(config))
    assert eval_cli.load_config(f"{memory_bucket}/tiny.json", "student_config") == config
    with pytest.raises(eval_cli.EvalCliError, match="--p=gs://memory-bucket/x.npy: file not found"):
        eval_cli.load_prompts(f"{memory_bucket}/x.npy", "p")
    with pytest.raises(eval_cli.EvalCliError, match="neither a size name .* nor a file"):
        eval_cli.load_config(f"{memory_bucket}/absent.json", "student_config")
    with pytest.raises(eval_cli.EvalCliError, match="the directory does not exist"):
        eval_cli.load_model(f"{memory_bucket}/oracle", None, "oracle")


def test_eval_loaders_name_damaged_files(tmp_path):
    (tmp_path / "p.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"p\.npy: not a readable \.npy array"):
        eval_cli.load_prompts(str(tmp_path / "p.npy"), "prompts")
    (tmp_path / "c.json").write_text(json.dumps({"d_model": 8})[:-3])
    with pytest.raises(ValueError, match=r"c\.json: not valid JSON"):
        eval_cli.load_config(str(tmp_path / "c.json"), "student_config")

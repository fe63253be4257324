"""Runs launch/report.py in a subprocess on synthetic workdirs (see reporting/test_report.py)."""

import os
from pathlib import Path

import pytest
from _cli_common import run_light_script
from test_report import make_workdir


def _run(*args):
    return run_light_script("report", *args, timeout=300)


def test_two_workdirs_to_out_dir(tmp_path):
    a = make_workdir(tmp_path / "a", names=("offline", "online_student"))
    b = make_workdir(tmp_path / "b", names=("offline_s1",))
    out = tmp_path / "out"
    result = _run(f"--workdir={a}", f"--workdir={b}", f"--out_dir={out}", "--metric=js")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"report: {out / 'report.md'}" in result.stdout
    assert "1. **Offline, many epochs" in result.stdout and "**reproduced**" in result.stdout
    text = (out / "report.md").read_text()
    assert "Metric: `js`" in text and "| offline N=64x1 | offline, offline_s1 |" in text
    assert "`../b/runs/offline_s1/train/metrics.jsonl`" in text
    assert len(os.listdir(out / "plots")) == 4
    assert not os.path.exists(os.path.join(a, "report.md"))


def test_default_out_dir_is_first_workdir(tmp_path):
    a = make_workdir(tmp_path / "a", names=("online_teacher",))
    result = _run(f"--workdir={a}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (Path(a) / "report.md").exists() and (Path(a) / "plots").is_dir()


@pytest.mark.parametrize(
    "setup, message",
    [
        ("absent", "report.py: error: workdir not found: {dir}/absent"),
        (
            "empty",
            "report.py: error: no runs found; searched: {dir}/empty/runs/*/train/metrics.jsonl",
        ),
        ("no_eval", "{dir}/no_eval/runs/r/train/metrics.jsonl: no evaluation lines"),
    ],
)
def test_errors(tmp_path, setup, message):
    (tmp_path / "empty").mkdir()
    train = tmp_path / "no_eval" / "runs" / "r" / "train"
    train.mkdir(parents=True)
    (train.parent / "run.json").write_text(
        '{"name": "r", "regime": "offline", "num_prompts": 8, "completions_per_prompt": 1, '
        '"online_fraction": 0.0, "online_role": "student", "seed": 0}'
    )
    (train / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1.0}\n')
    result = _run(f"--workdir={tmp_path / setup}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert message.format(dir=tmp_path) in result.stderr
    assert "imported:" not in result.stdout


def test_usage_error_without_workdir():
    result = _run()
    assert result.returncode != 0 and "--workdir or --summary_dir is required" in result.stderr
    result = _run("--summary_dir=x")
    assert result.returncode != 0 and "--out_dir is required with --summary_dir" in result.stderr


def test_write_summary_then_report_from_it(tmp_path):
    a = make_workdir(tmp_path / "a", names=("offline", "online_teacher"))
    runs = tmp_path / "runs"
    result = _run(f"--workdir={a}", f"--write_summary={runs}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"report: 2 run summaries in {runs}" in result.stdout
    assert sorted(os.listdir(runs)) == ["offline.json", "online_teacher.json"]
    assert not os.path.exists(os.path.join(a, "report.md"))  # a summary, not a report
    out = tmp_path / "out"
    result = _run(f"--summary_dir={runs}", f"--out_dir={out}")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (out / "report.md").read_text()
    assert f"from `{runs}`" in text and "| `../runs/offline.json` |" in text
    assert "imported:" not in result.stdout
    result = _run(f"--summary_dir={tmp_path / 'absent'}", f"--out_dir={out}")
    assert result.returncode == 1 and "summary directory not found" in result.stderr

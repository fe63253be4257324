"""Tests of the sensitivity table (reporting/sensitivity.py): cells by teacher error, step
budget and run configuration, pooled over worlds, each run against its own levels."""

import json
import os

import pytest
from _cli_common import run_light_script
from test_report_worlds import NAMES, _workdir

from thack_jax.reporting import report, sensitivity, summary


def _scaled(path, world: int, scale: float, teacher_level: float) -> str:
    """A fake workdir of NAMES (test_report_worlds) whose experiment.json records the teacher
    error `scale`."""
    workdir = _workdir(path, world, teacher_level)
    exp_path = os.path.join(workdir, "experiment.json")
    experiment = json.load(open(exp_path))
    json.dump(dict(experiment, teacher_logit_scale=scale), open(exp_path, "w"))
    return workdir


def _cells(text: str) -> dict[tuple[str, str], list[str]]:
    """(scale, configuration label) -> the row's cells."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows[1:]]
    return {(c[0], c[2].split(":")[0]): c for c in cells}


def test_worlds_pool_and_scales_stay_apart(tmp_path):
    dirs = [
        _scaled(tmp_path / "a", 0, 1.6, 0.3),
        _scaled(tmp_path / "b", 1, 1.6, 0.7),
        _scaled(tmp_path / "c", 0, 1.0, 0.3),
    ]
    runs = report.load_runs(dirs)
    text = sensitivity.table(runs)
    rows = _cells(text)
    assert list(rows) == [
        ("1", "offline N=64x1"),
        ("1", "online_teacher"),
        ("1.6", "offline N=64x1"),
        ("1.6", "online_teacher"),
    ]
    offline = rows[("1.6", "offline N=64x1")]
    # 2 seeds x 2 worlds; the teacher's level of each run is its own workdir's.
    assert offline[2] == "offline N=64x1: 4" and offline[3] == "0, 1"
    assert offline[4] == "0.50 (0.30..0.70)"
    expected = {r.name: report.analyse(r) for r in runs[: len(NAMES)]}  # workdir a's
    rise = expected["offline"]["golden_rise"]  # the fakes are equal across workdirs
    assert offline[6] == f"{rise:.2f} ({rise:.2f}..{rise:.2f})"
    flagged = sum(expected[n]["flag_step"] is not None for n in ("offline", "offline_s1"))
    assert offline[9] == f"{2 * flagged}/4"
    # online_teacher ends at ~0.46: below the teacher of world 1 (0.7), not of world 0 (0.3)
    assert rows[("1.6", "online_teacher")][11] == "1/2"
    assert rows[("1", "online_teacher")][11] == "0/1"
    assert offline[1] == f"{int(expected['offline']['last_step']):,}"


def test_one_row_per_world(tmp_path):
    dirs = [_scaled(tmp_path / "a", 0, 1.6, 0.3), _scaled(tmp_path / "b", 1, 1.6, 0.7)]
    text = sensitivity.table(report.load_runs(dirs), by_world=True)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    assert [(c[2], c[3], c[4]) for c in cells] == [
        ("offline N=64x1: 2", "0", "0.30 (0.30..0.30)"),  # 2 seeds in one world
        ("offline N=64x1: 2", "1", "0.70 (0.70..0.70)"),
        ("online_teacher: 1", "0", "0.30"),
        ("online_teacher: 1", "1", "0.70"),
    ]
    assert [c[11] for c in cells[2:]] == ["0/1", "1/1"]


def test_the_same_run_twice_is_refused(tmp_path):
    a = _scaled(tmp_path / "a", 0, 1.6, 0.3)
    runs = report.load_runs([a, a])
    with pytest.raises(report.ReportError, match="are the same run .*scale 1.6"):
        sensitivity.table(runs)


def test_an_experiment_without_a_teacher_scale_is_named(tmp_path):
    a = _workdir(tmp_path / "a", 0, 0.3)
    with pytest.raises(report.ReportError, match="metrics.jsonl: experiment.json has no teacher"):
        sensitivity.table(report.load_runs([a]))


def test_the_cli_writes_the_table_from_summaries(tmp_path):
    a, b = _scaled(tmp_path / "a", 0, 1.6, 0.3), _scaled(tmp_path / "b", 1, 1.6, 0.7)
    dirs = [str(tmp_path / "sa"), str(tmp_path / "sb")]
    for workdir, out in zip((a, b), dirs, strict=True):
        summary.summarize([workdir], out)
    out = str(tmp_path / "sensitivity.md")
    args = [f"--summary_dir={d}" for d in dirs] + [f"--sensitivity={out}"]
    result = run_light_script("report", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    text = open(out).read()
    assert f"--summary_dir={dirs[0]} --summary_dir={dirs[1]} --sensitivity={out}" in text
    # From summaries, the same table as from the workdirs.
    assert sensitivity.table(report.load_runs([a, b])) in text
    assert sensitivity.table(report.load_runs([a, b]), by_world=True) in text

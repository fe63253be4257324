"""Tests of reporting.summary: run summaries give the analysis and report of the workdir."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from test_report import make_workdir

from thack_jax.hacking import diagnostics, guard, noise
from thack_jax.reporting import report, summary


def _add_per_prompt(workdir, name, seed, skip_step=None):
    """Per-prompt proxy values (16 prompts) at every evaluation of run `name`."""
    (run,) = [r for r in report.load_runs([workdir]) if r.name == name]
    directory = os.path.join(workdir, "runs", name, "train", noise.PER_PROMPT_DIR)
    effect = np.random.default_rng(seed).normal(0, 0.3, 16)
    for step, value in zip(run.steps, run.metrics["proxy/forward_kl"], strict=True):
        if step != skip_step:
            row = value * np.exp(effect) / np.exp(effect).mean()
            noise.save_per_prompt(directory, int(step), {"proxy/forward_kl": row})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The synthetic experiment, with the guard settings and per-prompt values of real runs
    on some runs (a warmup of 1200 steps, a missing per-prompt file) and not on others."""
    path = make_workdir(tmp_path_factory.mktemp("exp"))
    config = diagnostics.DetectorConfig()
    for name, min_step in (("offline", 1200), ("mixed10", 100)):
        with open(os.path.join(path, "runs", name, guard.GUARD_FILE), "w") as f:
            json.dump(guard.guard_settings(min_step, "proxy/forward_kl", config), f)
    with open(os.path.join(path, "runs", "offline", summary.GUARD_RECORD_FILE), "w") as f:
        json.dump({"best_step": 1500, "fired_at_eval_step": 2000}, f)
    _add_per_prompt(path, "offline", 0)
    _add_per_prompt(path, "offline_s1", 1)
    _add_per_prompt(path, "mixed10", 2, skip_step=300)  # its verdict: invalid, missing step
    return path


@pytest.fixture(scope="module")
def summary_dir(workdir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("summary"))
    paths = summary.summarize([workdir], out)
    assert sorted(os.path.basename(p) for p in paths) == sorted(os.listdir(out))
    return out


def _same(a, b):
    """Equal analyses, nan == nan (a run without stderrs)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and np.isnan(a[key]):
            assert np.isnan(b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("metric", ["forward_kl", "js"])
def test_round_trip_gives_the_same_analysis(workdir, summary_dir, metric):
    from_workdir = report.load_runs([workdir])
    from_summary = summary.load_summaries([summary_dir])
    assert [r.name for r in from_summary] == [r.name for r in from_workdir]
    by_name = {r.name: report.analyse(r, metric) for r in from_workdir}
    for run in from_summary:
        _same(report.analyse(run, metric), by_name[run.name])
    analyses = {r.name: report.analyse(r, metric) for r in from_summary}
    if metric == "forward_kl":  # the per-prompt covariance was used, and its absence seen
        assert analyses["offline"]["fit"]["n"] == by_name["offline"]["fit"]["n"]
        assert analyses["offline"]["verdict"] == "teacher_hacking"
        assert analyses["mixed10"]["verdict"] == "invalid"
        assert "missing for steps [300]" in analyses["mixed10"]["reason"]
    else:  # the per-prompt files hold forward_kl only: the same error as from the workdir
        assert "lacks 'proxy/js'" in analyses["offline"]["reason"]


def test_summary_keeps_the_runs_fields(workdir, summary_dir):
    runs = {r.name: r for r in summary.load_summaries([summary_dir])}
    offline, online = runs["offline"], runs["online_student"]
    assert offline.config["num_prompts"] == 64 and offline.experiment["task"] == "synthetic"
    assert offline.wall_seconds == 125.0 and online.wall_seconds is None  # incomplete run
    assert sorted(offline.metrics) == sorted(summary.KEYS)  # no per-token or training keys
    assert report.guard_min_step(offline) == 1200 and report.guard_min_step(online) == 1
    assert online.noise_covs is None  # no per-prompt values: the verdict estimates the noise
    record = json.load(open(os.path.join(summary_dir, "offline.json")))
    assert record["guard"] == {"best_step": 1500, "fired_at_eval_step": 2000}
    # The covariance is the one the workdir's per-prompt values give, bit for bit.
    directory = os.path.join(workdir, "runs", "offline", "train", noise.PER_PROMPT_DIR)
    steps = offline.steps[offline.steps >= 1200]
    expected = noise.covariance_at(directory, "proxy/forward_kl", steps)
    np.testing.assert_array_equal(report.noise_cov(offline, "proxy/forward_kl", steps), expected)
    sub = steps[[0, 2, 3]]
    np.testing.assert_array_equal(
        report.noise_cov(offline, "proxy/forward_kl", sub), expected[np.ix_([0, 2, 3], [0, 2, 3])]
    )
    with pytest.raises(ValueError, match=r"offline.json: noise covariance of .* lacks \[100\]"):
        report.noise_cov(offline, "proxy/forward_kl", [100])


def test_report_from_summaries_equals_report_from_workdir(workdir, summary_dir, tmp_path):
    runs = summary.load_summaries([summary_dir])
    a = open(report.write_report([workdir], str(tmp_path / "a"))).read()
    b = open(report.write_report([summary_dir], str(tmp_path / "b"), runs=runs)).read()
    # Only the sources named differ: the workdir or summary dir, and each run's file.
    strip = re.compile(r"`[^`]*(metrics\.jsonl|\.json)` \|$", re.M)
    a, b = (strip.sub("SOURCE |", t) for t in (a, b))
    a, b = (t.replace(workdir, "SOURCES").replace(summary_dir, "SOURCES") for t in (a, b))
    assert a == b and "teacher_hacking" in a
    for name in os.listdir(tmp_path / "a" / "plots"):
        same = (tmp_path / "a" / "plots" / name).read_bytes()
        assert (tmp_path / "b" / "plots" / name).read_bytes() == same, name


def test_a_directory_of_summary_directories_stands_for_them(summary_dir, tmp_path):
    parent = tmp_path / "worlds"
    for name in ("world1", "world0"):
        shutil.copytree(summary_dir, parent / name)
    (parent / "empty").mkdir()  # no summaries: skipped
    runs = summary.load_summaries([str(parent)])
    one = summary.load_summaries([summary_dir])
    assert [r.name for r in runs] == [r.name for r in one] * 2
    assert [r.workdir for r in runs] == [str(parent / "world0")] * len(one) + [
        str(parent / "world1")
    ] * len(one)


def _write(path, record):
    with open(path, "w") as f:
        json.dump(record, f)


def test_errors(workdir, summary_dir, tmp_path):
    record = json.load(open(os.path.join(summary_dir, "offline.json")))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(report.ReportError, match="no run summaries"):
        summary.load_summaries([str(bad)])
    with pytest.raises(report.ReportError, match="summary directory not found"):
        summary.load_summaries([str(tmp_path / "absent")])
    cases = [
        (dict(record, format="other/9"), "format is 'other/9'"),
        ({k: v for k, v in record.items() if k != "evaluations"}, r"lacks \['evaluations'\]"),
        (dict(record, run={"regime": "offline"}), "run lacks"),
        (
            dict(record, evaluations=dict(record["evaluations"], **{"proxy/js": [1.0]})),
            r"evaluations\['proxy/js'\] is not a list of 41 numbers",
        ),
        (dict(record, guard_settings={"min_step": 0}), "guard_settings.min_step is 0"),
    ]
    for content, message in cases:
        _write(bad / "r.json", content)
        with pytest.raises(report.ReportError, match=message):
            summary.load_summaries([str(bad)])
    twice = make_workdir(tmp_path / "other", names=("offline",))
    with pytest.raises(report.ReportError, match=r"runs \['offline'\] occur in several"):
        summary.summarize([workdir, twice], str(tmp_path / "out"))

"""launch/train.py refuses a bad configuration before any stage runs: one line naming the
field, a non-zero exit status, and nothing written to the workdir."""

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"


def _train(workdir, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--gin_file=experiments/default.gin", f"--workdir={workdir}"]
        + list(args),
        capture_output=True,
        text=True,
        timeout=60,  # it must fail in seconds; a run that trains would take minutes
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--gin_bindings=offline/RunConfig.regime = 'ofline'"],
            "train.py: error: RunConfig.regime='ofline' is not a regime; valid regimes: "
            "offline, online_teacher, online_student, mixed (gin scope 'offline')",
        ),
        (
            ["--gin_bindings=online_student/RunConfig.online_fraction = 1.5"],
            "train.py: error: RunConfig.online_fraction=1.5 must be a number in [0, 1] "
            "(gin scope 'online_student')",
        ),
        (
            ["--gin_bindings=distill/TrainConfig.num_microbatches = 3"],
            "train.py: error: TrainConfig.num_microbatches=3 must divide "
            "TrainConfig.batch_size=32 (gin scope 'distill')",
        ),
        (
            ["--gin_bindings=student/ModelSpec.overrides = {'d_modle': 8}"],
            "train.py: error: ExperimentConfig.student: unknown T5Config field(s) ['d_modle']",
        ),
        (["--stages=oracle,distil"], "train.py: error: unknown stage(s) ['distil']"),
        (["--stages=distill", "--runs=ofline"], "train.py: error: unknown run(s) ['ofline']"),
    ],
    ids=["regime", "online_fraction", "microbatches", "overrides", "stage", "run"],
)
def test_bad_configuration_fails_before_the_workdir(tmp_path, args, expected):
    workdir = tmp_path / "wd"
    result = _train(workdir, *args)
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())


def test_existing_workdir_is_left_untouched(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    result = _train(workdir, "--gin_bindings=EvalConfig.estimator = 'rb'")
    assert result.returncode != 0
    assert "EvalConfig.estimator='rb' must be one of rao_blackwell, plain" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_sigterm_exits_non_zero_saying_rerun_to_resume(tmp_path):
    workdir = tmp_path / "wd"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--gin_file=experiments/default.gin", f"--workdir={workdir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # lands before or in oracle_data, or in the teacher's SFT
            if line.startswith("[thack_jax] stage oracle done"):
                proc.send_signal(signal.SIGTERM)
                break
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"train\.py: interrupted by SIGTERM (before stage (oracle_data|teacher)|while filling "
        r"the offline store \S+ at chunk \d+ \(finished chunks saved\)|during the teacher SFT "
        r"at step \d+ of \d+ \(checkpoint saved\)); rerun the same command to resume",
        last,
    ), last
    assert "Traceback" not in stderr
    assert not (workdir / "teacher" / "COMPLETE.json").exists()
    assert not (workdir / "student_init").exists()  # no later stage ran


def _run(cwd, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_gin_file_convention_search_paths_package_then_current_folder(tmp_path):
    """The same experiment named four ways, from a folder that is not the checkout."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "local.gin").write_text("include 'experiments/default.gin'\n")
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "found.gin").write_text("include 'experiments/default.gin'\n")
    workdir = tmp_path / "wd"
    names = [
        ["--gin_file=experiments/default.gin"],  # the package's configs
        ["--gin_file=gin_configs/experiments/default.gin"],  # with the folder's name
        ["--gin_file=mine/local.gin"],  # the current folder
        [f"--gin_file={tmp_path / 'mine' / 'local.gin'}"],  # absolute
        ["--gin_file=found.gin", f"--gin_search_paths={tmp_path / 'search'}"],
    ]
    for args in names:
        result = _run(tmp_path, *args, f"--workdir={workdir}", "--dry_run")
        assert result.returncode == 0, (args, result.stderr)
        assert "dry run: experiment default (oracle mode)" in result.stdout
    assert not workdir.exists()  # a dry run writes nothing
    missing = _run(tmp_path, "--gin_file=nope.gin", f"--workdir={workdir}")
    (line,) = missing.stderr.strip().splitlines()
    assert missing.returncode == 1
    assert line.startswith("train.py: error: gin file 'nope.gin' not found (looked in ")
    assert str(tmp_path) in line and "gin_configs" in line


def test_dry_run_checks_the_workdir_and_verbose_shows_the_traceback(tmp_path):
    from thack_jax.experiment import gin_registry, runner

    workdir = tmp_path / "wd"
    gin_registry.parse(["experiments/default.gin"])
    runner.check_workdir(gin_registry.experiment_config(), str(workdir))  # experiment.json
    before = sorted(p.name for p in workdir.iterdir())
    same = _run(tmp_path, "--gin_file=experiments/default.gin", f"--workdir={workdir}", "--dry_run")
    assert same.returncode == 0, same.stderr
    other = ["--gin_file=experiments/default.gin", "--gin_bindings=ExperimentConfig.seed = 1"]
    refused = _run(tmp_path, *other, f"--workdir={workdir}", "--dry_run")
    assert refused.returncode == 1
    assert refused.stderr.startswith("train.py: error: workdir ") and "seed" in refused.stderr
    assert "Traceback" not in refused.stderr
    verbose = _run(tmp_path, *other, f"--workdir={workdir}", "--dry_run", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert "ExperimentMismatchError" in verbose.stderr
    scheme = _run(tmp_path, "--gin_file=experiments/default.gin", "--workdir=s3://b/x", "--dry_run")
    assert scheme.stderr.strip() == (
        "train.py: error: workdir 's3://b/x': scheme 's3' is not supported (a local path, or gs://)"
    )
    assert sorted(p.name for p in workdir.iterdir()) == before

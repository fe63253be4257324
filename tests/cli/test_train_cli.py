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

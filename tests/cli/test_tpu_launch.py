"""Tests for cli/tpu.py (launch/tpu.py): the plan of steps, validation, the tarball, the dry run.

The gcloud argument lists and remote-shell quoting: tests/cli/test_tpu_commands.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "launch" / "tpu.py"

from thack_jax.cli import tpu  # noqa: E402
from thack_jax.experiment import gin_registry  # noqa: E402


def _remote_command(argv) -> str:
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command=") :]


def _fake_repo(tmp_path: Path, gin_names=("exp.gin",)) -> Path:
    repo = tmp_path / "repo"
    (repo / "gin_configs").mkdir(parents=True)
    (repo / "setup.cfg").write_text("[metadata]\nname = x\n")
    for gin_name in gin_names:
        # A real experiment (the package's default), so that the configuration check passes.
        (repo / "gin_configs" / gin_name).write_text("include 'experiments/default.gin'\n")
    return repo


def _config(tmp_path, **overrides):
    repo = _fake_repo(tmp_path)
    values = dict(
        name="thack-v4",
        zone="us-central2-b",
        accelerator_type="v4-32",
        gin_files=("gin_configs/exp.gin",),
        gin_bindings=("distill/TrainConfig.num_steps = 10",),
        workdir="gs://bucket/run1",
        repo_dir=str(repo),
    )
    values.update(overrides)
    return tpu.LaunchConfig(**values)


def test_plan_all_orders_the_steps(tmp_path):
    cfg = _config(tmp_path, queued_resource=True, spot=True, delete_after=True)
    steps = tpu.plan(cfg, "all")
    assert [s.description for s in steps] == [
        "create", "wait for ACTIVE", "ship code", "install", "train", "delete",
    ]  # fmt: skip
    assert steps[1].wait_until_active and steps[2].needs_tarball
    scp = steps[2].argv
    assert "--worker=all" in scp and "--recurse" in scp and "thack-v4:thack_jax_src.tar.gz" in scp
    assert tpu.plan(cfg, "create")[0].argv == steps[0].argv
    assert [s.description for s in tpu.plan(cfg, "logs")] == ["logs"]
    assert "--worker=0" in tpu.plan(cfg, "logs")[0].argv


def test_plan_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="--workdir is required"):
        tpu.plan(_config(tmp_path, workdir=""), "run")
    with pytest.raises(ValueError, match="--gin_file='missing.gin'"):
        tpu.plan(_config(tmp_path / "a", gin_files=("missing.gin",)), "run")
    with pytest.raises(ValueError, match="--gin_search_paths='/etc'"):
        tpu.plan(_config(tmp_path / "b", gin_search_paths=("/etc",)), "all")
    with pytest.raises(ValueError, match="--action='deploy'"):
        tpu.plan(_config(tmp_path / "c"), "deploy")
    with pytest.raises(ValueError, match="--name='Bad_Name'"):
        tpu.plan(_config(tmp_path / "d", name="Bad_Name"), "delete")
    # delete needs neither a workdir nor gin files
    assert tpu.plan(_config(tmp_path / "e", workdir="", gin_files=()), "delete")


def test_gin_files_follow_train_py_convention_and_outside_ones_are_shipped(tmp_path):
    mine = tmp_path / "elsewhere" / "mine.gin"
    mine.parent.mkdir()
    mine.write_text("include 'experiments/default.gin'\nExperimentConfig.seed = 3\n")
    # The package's configs by their short name, a checkout file, and a file from outside.
    names = ("experiments/default.gin", "gin_configs/exp.gin", str(mine))
    cfg = _config(tmp_path, gin_files=names)
    where = tpu.gin_locations(cfg)
    assert where.remote[1] == "gin_configs/exp.gin"
    assert where.remote[2] == "_shipped_gin/2_mine.gin"
    # The fake checkout has no experiments/: the file came from this package, and is shipped.
    package_default = os.path.join(gin_registry.GIN_DIR, "experiments", "default.gin")
    assert where.remote[0] == "_shipped_gin/0_default.gin"
    assert where.shipped == {
        "_shipped_gin/0_default.gin": package_default,
        "_shipped_gin/2_mine.gin": str(mine),
    }
    train_tokens = shlex.split(_remote_command(tpu.plan(cfg, "run")[-1].argv))
    assert "--gin_file=_shipped_gin/2_mine.gin" in train_tokens
    out = tpu.make_source_tarball(cfg.repo_dir, str(tmp_path / "s.tgz"), where.shipped)
    with tarfile.open(out) as tar:
        assert tar.extractfile("./_shipped_gin/2_mine.gin").read() == mine.read_bytes()
    assert tpu.check_experiment(cfg) == "default"


def test_configuration_is_checked_as_train_py_will(tmp_path):
    with pytest.raises(ValueError, match="doesn't have a parameter named 'sead'"):
        tpu.check_experiment(_config(tmp_path / "a", gin_bindings=("ExperimentConfig.sead = 1",)))
    with pytest.raises(ValueError, match="ExperimentConfig.seed=-3 must be an integer >= 0"):
        tpu.check_experiment(_config(tmp_path / "b", gin_bindings=("ExperimentConfig.seed = -3",)))
    with pytest.raises(ValueError, match="scheme 's3' is not supported"):
        tpu.check_experiment(_config(tmp_path / "c", workdir="s3://bucket/run"))
    with pytest.raises(ValueError, match="names no bucket"):
        tpu.check_experiment(_config(tmp_path / "d", workdir="gs:///run"))


def test_dry_run_refuses_a_bad_config_before_printing_any_command(tmp_path):
    repo = _fake_repo(tmp_path)
    result = _run_cli(
        "--action=all",
        "--dry_run",
        "--name=thack-v4",
        "--zone=us-central2-b",
        f"--repo_dir={repo}",
        "--gin_file=gin_configs/exp.gin",
        "--gin_bindings=ExperimentConfig.sead = 1",
        "--workdir=gs://bucket/run1",
    )
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tpu.py: error: ") and "'sead'" in line


def test_source_tarball_excludes_vcs_and_caches(tmp_path):
    repo = _fake_repo(tmp_path)
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref")
    (repo / "pkg" / "__pycache__").mkdir(parents=True)
    (repo / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    (repo / "pkg" / "m.py").write_text("x = 1\n")
    out = tpu.make_source_tarball(str(repo), str(tmp_path / "src.tar.gz"))
    with tarfile.open(out) as tar:
        names = {Path(n).as_posix() for n in tar.getnames()}
    assert {"pkg/m.py", "setup.cfg", "gin_configs/exp.gin"} <= names
    assert not any(".git" in n or "__pycache__" in n or n.endswith(".pyc") for n in names)


def _split_commands(stdout: str) -> list[list[str]]:
    """Parses dry-run output: one shlex.join'ed command per line (quoted newlines allowed)."""
    commands, pending = [], ""
    for line in stdout.splitlines(keepends=True):
        pending += line
        try:
            commands.append(shlex.split(pending))
        except ValueError:  # inside a quoted newline: the command continues on the next line
            continue
        pending = ""
    assert pending == "", f"unterminated command in dry-run output: {pending!r}"
    return commands


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_dry_run_prints_the_exact_commands(tmp_path):
    repo = _fake_repo(tmp_path, gin_names=("exp.gin", "odd name $(x).gin"))
    binding = "ExperimentConfig.name = 'a; b \"$(id)\" `id`'\nExperimentConfig.seed = 5"
    workdir = "gs://bucket/run 1;$(id)"
    result = _run_cli(
        "--action=all",
        "--dry_run",
        "--name=thack-v4",
        "--zone=us-central2-b",
        "--accelerator_type=v4-32",
        "--spot",
        f"--repo_dir={repo}",
        "--gin_file=gin_configs/exp.gin",
        "--gin_file=gin_configs/odd name $(x).gin",
        f"--gin_bindings={binding}",
        "--gin_bindings=distill/TrainConfig.num_steps = 5",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr
    commands = _split_commands(result.stdout)
    assert [c[3:5] for c in commands] == [
        ["tpu-vm", "create"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],
    ]  # fmt: skip
    assert "--spot" in commands[0] and "--accelerator-type=v4-32" in commands[0]
    train_tokens = shlex.split(_remote_command(commands[3]))
    assert f"--gin_bindings={binding}" in train_tokens
    assert "--gin_bindings=distill/TrainConfig.num_steps = 5" in train_tokens
    assert "--gin_file=gin_configs/odd name $(x).gin" in train_tokens
    assert f"--workdir={workdir}" in train_tokens
    assert "python3" in train_tokens and "launch/train.py" in train_tokens
    assert "warning" not in result.stderr  # gs:// workdir: no local-workdir warning


def test_cli_errors_are_clear():
    bad_name = _run_cli("--action=delete", "--dry_run", "--name=Bad Name", "--zone=us-central2-b")
    assert bad_name.returncode != 0
    assert "--name='Bad Name' is not a valid GCP resource name" in bad_name.stderr
    no_zone = _run_cli("--action=delete", "--dry_run", "--name=thack-v4")
    assert no_zone.returncode != 0 and "--zone is required" in no_zone.stderr
    ok = _run_cli("--action=delete", "--dry_run", "--name=thack-v4", "--zone=us-central2-b")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == (
        "gcloud compute tpus tpu-vm delete thack-v4 --zone=us-central2-b --quiet\n"
    )

"""Tests for launch/tpu.py: gcloud argument lists, remote-shell quoting, dry run, validation."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "launch" / "tpu.py"

_spec = importlib.util.spec_from_file_location("thack_launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tpu  # dataclasses look the module up by name
_spec.loader.exec_module(tpu)

HOSTILE = [
    "train.lr = 'x'; rm -rf ~",
    'a "double" quote',
    "$(touch /tmp/pwned)",
    "`id`",
    "two words  and spaces",
    "line one\nline two",
    "back\\slash & | > < * ? ~ #",
]


def _remote_command(argv) -> str:
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command=") :]


def _fake_repo(tmp_path: Path, gin_names=("exp.gin",)) -> Path:
    repo = tmp_path / "repo"
    (repo / "gin_configs").mkdir(parents=True)
    (repo / "setup.cfg").write_text("[metadata]\nname = x\n")
    for gin_name in gin_names:
        (repo / "gin_configs" / gin_name).write_text("# gin\n")
    return repo


def _config(tmp_path, **overrides):
    repo = _fake_repo(tmp_path)
    values = dict(
        name="thack-v4",
        zone="us-central2-b",
        accelerator_type="v4-32",
        gin_files=("gin_configs/exp.gin",),
        gin_bindings=("train.num_steps = 10",),
        workdir="gs://bucket/run1",
        repo_dir=str(repo),
    )
    values.update(overrides)
    return tpu.LaunchConfig(**values)


def test_create_commands():
    argv = tpu.build_create_command("my-tpu", "us-central2-b", "v4-32", "tpu-ubuntu2204-base")
    assert argv == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "my-tpu",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--zone=us-central2-b",
    ]
    queued = tpu.build_create_command(
        "my-tpu", "us-east5-b", "v5p-8", "v2-alpha-tpuv5", project="proj-1", spot=True,
        queued_resource=True,
    )  # fmt: skip
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
    for token in ("--node-id=my-tpu", "--runtime-version=v2-alpha-tpuv5", "--project=proj-1"):
        assert token in queued
    assert "--spot" in queued and "--zone=us-east5-b" in queued


def test_delete_commands():
    assert tpu.build_delete_command("t", "us-central2-b") == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=us-central2-b", "--quiet",
    ]  # fmt: skip
    queued = tpu.build_delete_command("t", "us-central2-b", queued_resource=True)
    assert queued[3:6] == ["queued-resources", "delete", "t"] and "--force" in queued


@pytest.mark.parametrize(
    "name", ["", "My-TPU", "1tpu", "tpu-", "tpu_1", "a" * 64, "x; rm -rf ~", "$(id)", "t\nu"]
)
def test_invalid_names_are_rejected(name):
    with pytest.raises(ValueError, match="--name"):
        tpu.build_create_command(name, "us-central2-b", "v4-8", "tpu-ubuntu2204-base")
    with pytest.raises(ValueError, match="--name"):
        tpu.build_ssh_command(name, "us-central2-b", "true")


def test_missing_or_bad_zone_is_rejected():
    with pytest.raises(ValueError, match="--zone is required"):
        tpu.build_delete_command("t", "")
    with pytest.raises(ValueError, match="does not look like a GCP zone"):
        tpu.build_delete_command("t", "us-central2-b --project=evil")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_reach_the_trainer_as_single_literal_tokens(value):
    remote = tpu.build_train_remote_command(
        "thack_jax",
        gin_files=["gin_configs/exp.gin"],
        gin_bindings=[value, "b = 1"],
        workdir=value,
        env=[f"NOTE={value}"],
    )
    argv = tpu.build_ssh_command("thack-v4", "us-central2-b", remote)
    assert argv[-1] == f"--command={remote}"  # the local argv carries the string verbatim
    tokens = shlex.split(_remote_command(argv))
    assert tokens.count(f"--gin_bindings={value}") == 1
    assert tokens.count("--gin_bindings=b = 1") == 1
    assert tokens.count(f"--workdir={value}") == 1
    assert tokens.count(f"NOTE={value}") == 1
    # The only shell operators are the ones the launcher wrote itself.
    assert [t for t in tokens if t in ("&&", "|", ";", "&")] == ["&&", "|"]
    assert tokens[:3] == ["set", "-o", "pipefail;"]


def test_background_run_and_logs_commands():
    remote = tpu.build_train_remote_command(
        "thack_jax", ["g.gin"], ["x = '$(id)'"], "gs://b/w", log_file="run.log", background=True
    )
    tokens = shlex.split(remote)
    assert tokens[:4] == ["cd", "thack_jax", "&&", "nohup"]
    assert tokens[-6:] == [">", "run.log", "2>&1", "<", "/dev/null", "&"]
    assert "--gin_bindings=x = '$(id)'" in tokens
    assert shlex.split(tpu.build_logs_remote_command("thack_jax", "run.log")) == [
        "tail", "-n", "+1", "-F", "thack_jax/run.log",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--remote_dir"):
        tpu.build_logs_remote_command("../etc")
    with pytest.raises(ValueError, match="--env="):
        tpu.build_train_remote_command("d", [], [], "w", env=["1BAD=x"])


def test_install_command_unpacks_and_installs_editable():
    with pytest.raises(ValueError, match="--remote_dir='code dir'"):
        tpu.build_install_remote_command("code dir")
    tokens = shlex.split(tpu.build_install_remote_command("thack_jax"))
    assert tokens[-7:] == ["python3", "-m", "pip", "install", "-e", ".", "jax[tpu]"]
    assert "tar" in tokens and "thack_jax_src.tar.gz" in tokens


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
    with pytest.raises(ValueError, match="--gin_file='/etc/passwd'"):
        tpu.plan(_config(tmp_path / "b", gin_files=("/etc/passwd",)), "all")
    with pytest.raises(ValueError, match="--action='deploy'"):
        tpu.plan(_config(tmp_path / "c"), "deploy")
    with pytest.raises(ValueError, match="--name='Bad_Name'"):
        tpu.plan(_config(tmp_path / "d", name="Bad_Name"), "delete")
    # delete needs neither a workdir nor gin files
    assert tpu.plan(_config(tmp_path / "e", workdir="", gin_files=()), "delete")


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
    binding = "train.note = 'a; b' \"$(id)\" `id`\nsecond line"
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
        "--gin_bindings=train.num_steps = 5",
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
    assert "--gin_bindings=train.num_steps = 5" in train_tokens
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

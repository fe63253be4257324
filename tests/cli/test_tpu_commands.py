"""Tests for thack_jax.cli.tpu_commands: gcloud argument lists, remote-shell quoting, validation."""

from __future__ import annotations

import shlex

import pytest

from thack_jax.cli import tpu_commands

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


def test_create_commands():
    argv = tpu_commands.build_create_command(
        "my-tpu", "us-central2-b", "v4-32", "tpu-ubuntu2204-base"
    )
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
    queued = tpu_commands.build_create_command(
        "my-tpu", "us-east5-b", "v5p-8", "v2-alpha-tpuv5", project="proj-1", spot=True,
        queued_resource=True,
    )  # fmt: skip
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
    for token in ("--node-id=my-tpu", "--runtime-version=v2-alpha-tpuv5", "--project=proj-1"):
        assert token in queued
    assert "--spot" in queued and "--zone=us-east5-b" in queued


def test_delete_commands():
    assert tpu_commands.build_delete_command("t", "us-central2-b") == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=us-central2-b", "--quiet",
    ]  # fmt: skip
    queued = tpu_commands.build_delete_command("t", "us-central2-b", queued_resource=True)
    assert queued[3:6] == ["queued-resources", "delete", "t"] and "--force" in queued


@pytest.mark.parametrize(
    "name", ["", "My-TPU", "1tpu", "tpu-", "tpu_1", "a" * 64, "x; rm -rf ~", "$(id)", "t\nu"]
)
def test_invalid_names_are_rejected(name):
    with pytest.raises(ValueError, match="--name"):
        tpu_commands.build_create_command(name, "us-central2-b", "v4-8", "tpu-ubuntu2204-base")
    with pytest.raises(ValueError, match="--name"):
        tpu_commands.build_ssh_command(name, "us-central2-b", "true")


def test_missing_or_bad_zone_is_rejected():
    with pytest.raises(ValueError, match="--zone is required"):
        tpu_commands.build_delete_command("t", "")
    with pytest.raises(ValueError, match="does not look like a GCP zone"):
        tpu_commands.build_delete_command("t", "us-central2-b --project=evil")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_reach_the_trainer_as_single_literal_tokens(value):
    remote = tpu_commands.build_train_remote_command(
        "thack_jax",
        gin_files=["gin_configs/exp.gin"],
        gin_bindings=[value, "b = 1"],
        workdir=value,
        env=[f"NOTE={value}"],
    )
    argv = tpu_commands.build_ssh_command("thack-v4", "us-central2-b", remote)
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
    remote = tpu_commands.build_train_remote_command(
        "thack_jax", ["g.gin"], ["x = '$(id)'"], "gs://b/w", log_file="run.log", background=True
    )
    tokens = shlex.split(remote)
    assert tokens[:4] == ["cd", "thack_jax", "&&", "nohup"]
    assert tokens[-6:] == [">", "run.log", "2>&1", "<", "/dev/null", "&"]
    assert "--gin_bindings=x = '$(id)'" in tokens
    assert shlex.split(tpu_commands.build_logs_remote_command("thack_jax", "run.log")) == [
        "tail", "-n", "+1", "-F", "thack_jax/run.log",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--remote_dir"):
        tpu_commands.build_logs_remote_command("../etc")
    with pytest.raises(ValueError, match="--env="):
        tpu_commands.build_train_remote_command("d", [], [], "w", env=["1BAD=x"])


def test_install_command_unpacks_and_installs_editable():
    with pytest.raises(ValueError, match="--remote_dir='code dir'"):
        tpu_commands.build_install_remote_command("code dir")
    tokens = shlex.split(tpu_commands.build_install_remote_command("thack_jax"))
    assert tokens[-7:] == ["python3", "-m", "pip", "install", "-e", ".", "jax[tpu]"]
    assert "tar" in tokens and "thack_jax_src.tar.gz" in tokens


def test_scp_state_and_worker_commands():
    scp = tpu_commands.build_scp_command(
        "t", "us-central2-b", "/tmp/src.tar.gz", "src.tar.gz", project="proj-1"
    )
    assert scp == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "/tmp/src.tar.gz",
        "t:src.tar.gz", "--worker=all", "--zone=us-central2-b", "--project=proj-1",
    ]  # fmt: skip
    state = tpu_commands.build_queued_state_command("t", "us-central2-b")
    assert state[3:6] == ["queued-resources", "describe", "t"]
    assert state[-1] == "--format=value(state.state)"
    assert "--worker=3" in tpu_commands.build_ssh_command("t", "us-central2-b", "true", worker="3")
    with pytest.raises(ValueError, match="worker='x'"):
        tpu_commands.build_ssh_command("t", "us-central2-b", "true", worker="x")
    with pytest.raises(ValueError, match="--project='Bad Project'"):
        tpu_commands.build_delete_command("t", "us-central2-b", project="Bad Project")

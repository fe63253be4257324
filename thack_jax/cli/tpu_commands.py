"""gcloud command lines for Cloud TPU VMs, and the shell strings run on their workers.

Pure functions used by `launch/tpu.py`: each returns an argument list (or, for the remote
side, one shell string) and validates its values first, raising ValueError that names the
flag. Every gcloud command is an argument list to run without a shell. The only shell
strings are the `--command=` of `gcloud compute tpus tpu-vm ssh`, which the remote login
shell interprets: every user value in them goes through shlex.quote. Standard library only.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

TARBALL_NAME = "thack_jax_src.tar.gz"

# GCP resource names: lowercase letter first, then lowercase letters, digits, hyphens; no
# trailing hyphen; at most 63 characters.
_NAME_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ZONE_RE = re.compile(r"[a-z]+(?:-[a-z]+)*[0-9]+-[a-z]")  # us-central2-b, europe-west4-a
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # accelerator types, runtime versions
_PROJECT_RE = re.compile(r"[a-z][-a-z0-9.:]*[a-z0-9]")  # also domain:project ids
_REMOTE_DIR_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def validate_name(name: str | None) -> str:
    if not name:
        raise ValueError("--name is required (the TPU VM / queued resource name).")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"--name={name!r} is not a valid GCP resource name: use 1-63 lowercase letters, "
            "digits and hyphens, starting with a letter and not ending with a hyphen."
        )
    return name


def validate_zone(zone: str | None) -> str:
    if not zone:
        raise ValueError("--zone is required (e.g. us-central2-b for v4, us-east5-b for v5p).")
    if not _ZONE_RE.fullmatch(zone):
        raise ValueError(f"--zone={zone!r} does not look like a GCP zone (e.g. us-central2-b).")
    return zone


def validate_token(flag: str, value: str | None, example: str) -> str:
    if not value or not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"--{flag}={value!r} is not valid (expected e.g. {example}).")
    return value


def validate_project(project: str | None) -> str | None:
    if project is not None and not _PROJECT_RE.fullmatch(project):
        raise ValueError(f"--project={project!r} is not a valid GCP project id.")
    return project


def validate_remote_dir(remote_dir: str) -> str:
    if not _REMOTE_DIR_RE.fullmatch(remote_dir) or ".." in remote_dir.split("/"):
        raise ValueError(
            f"--remote_dir={remote_dir!r} must be a relative path under the remote home "
            "directory (letters, digits, '._-' and '/'; no '..')."
        )
    return remote_dir


def validate_worker(worker: str) -> str:
    if worker != "all" and not worker.isdigit():
        raise ValueError(f"worker={worker!r} must be 'all' or a worker index such as 0.")
    return worker


def _location_flags(zone: str, project: str | None) -> list[str]:
    out = [f"--zone={validate_zone(zone)}"]
    if project is not None:
        out.append(f"--project={validate_project(project)}")
    return out


def build_create_command(
    name: str,
    zone: str,
    accelerator_type: str,
    runtime_version: str,
    project: str | None = None,
    spot: bool = False,
    queued_resource: bool = False,
) -> list[str]:
    """`gcloud compute tpus tpu-vm create` or `... queued-resources create` (node id = name)."""
    validate_name(name)
    accel = f"--accelerator-type={validate_token('accelerator_type', accelerator_type, 'v4-32')}"
    runtime = validate_token("runtime_version", runtime_version, "tpu-ubuntu2204-base")
    if queued_resource:
        argv = ["gcloud", "compute", "tpus", "queued-resources", "create", name]
        argv += [f"--node-id={name}", accel, f"--runtime-version={runtime}"]
    else:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", name]
        argv += [accel, f"--version={runtime}"]
    argv += _location_flags(zone, project)
    if spot:
        argv.append("--spot")
    return argv


def build_queued_state_command(name: str, zone: str, project: str | None = None) -> list[str]:
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)."""
    argv = ["gcloud", "compute", "tpus", "queued-resources", "describe", validate_name(name)]
    return argv + _location_flags(zone, project) + ["--format=value(state.state)"]


def build_scp_command(
    name: str,
    zone: str,
    local_path: str,
    remote_path: str,
    project: str | None = None,
    worker: str = "all",
) -> list[str]:
    """Copies `local_path` to `remote_path` (relative to the remote home) on the workers."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    argv += [local_path, f"{validate_name(name)}:{remote_path}", f"--worker={worker}"]
    return argv + _location_flags(zone, project)


def build_ssh_command(
    name: str, zone: str, remote_command: str, project: str | None = None, worker: str = "all"
) -> list[str]:
    """Runs `remote_command` (a shell string: quote its values!) on the workers."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", validate_name(name)]
    argv += [f"--worker={validate_worker(worker)}"] + _location_flags(zone, project)
    return argv + [f"--command={remote_command}"]


def build_delete_command(
    name: str, zone: str, project: str | None = None, queued_resource: bool = False
) -> list[str]:
    """Deletes the TPU VM, or the queued resource together with its TPU (--force)."""
    if queued_resource:
        argv = ["gcloud", "compute", "tpus", "queued-resources", "delete", validate_name(name)]
        return argv + _location_flags(zone, project) + ["--force", "--quiet"]
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "delete", validate_name(name)]
    return argv + _location_flags(zone, project) + ["--quiet"]


def build_install_remote_command(
    remote_dir: str, tarball: str = TARBALL_NAME, pip_packages: Sequence[str] = ("jax[tpu]",)
) -> str:
    """Unpacks the shipped tarball into `remote_dir` and pip-installs the package there."""
    d, t = shlex.quote(validate_remote_dir(remote_dir)), shlex.quote(tarball)
    pip = ["python3", "-m", "pip", "install", "-e", "."] + list(pip_packages)
    return f"mkdir -p {d} && tar -xzf {t} -C {d} && rm -f {t} && cd {d} && {shlex.join(pip)}"


def build_train_remote_command(
    remote_dir: str,
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    workdir: str,
    log_file: str = "train.log",
    background: bool = False,
    env: Sequence[str] = (),
    train_script: str = "launch/train.py",
    gin_search_paths: Sequence[str] = (),
) -> str:
    """`cd remote_dir && python3 launch/train.py --gin_file=.. --gin_bindings=.. --workdir=..`.

    Foreground: output is tee'd into `log_file` (inside remote_dir) and streams back through
    ssh. Background: nohup, output only in `log_file`; ssh returns at once.
    """
    if not workdir:
        raise ValueError("--workdir is required to run training (gs://bucket/path on pods).")
    for item in env:
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"--env={item!r} must be KEY=VALUE with KEY a variable name.")
    argv = ["env", *env] if env else []
    argv += ["python3", train_script]
    argv += [f"--gin_search_paths={p}" for p in gin_search_paths]
    argv += [f"--gin_file={f}" for f in gin_files]
    argv += [f"--gin_bindings={b}" for b in gin_bindings]
    argv.append(f"--workdir={workdir}")
    train = shlex.join(argv)  # quotes every token, hostile or not
    d, log = shlex.quote(validate_remote_dir(remote_dir)), shlex.quote(log_file)
    if background:
        return f"cd {d} && nohup {train} > {log} 2>&1 < /dev/null &"
    # pipefail: the ssh exit status is the trainer's, not tee's (TPU VM login shell is bash).
    return f"set -o pipefail; cd {d} && {train} 2>&1 | tee {log}"


def build_logs_remote_command(remote_dir: str, log_file: str = "train.log", follow=True) -> str:
    path = shlex.quote(f"{validate_remote_dir(remote_dir)}/{log_file}")
    return f"tail -n +1 -F {path}" if follow else f"cat {path}"

r"""Run thack_jax on a Cloud TPU VM (single host or pod slice) with one command.

  python launch/tpu.py --action=all --name=thack-v4 --zone=us-central2-b \
      --accelerator_type=v4-32 --gin_file=gin_configs/experiments/x.gin \
      --gin_bindings='train.num_steps = 1000' --workdir=gs://my-bucket/thack/run1

Actions:
  create  create the TPU VM (or a queued resource with --queued_resource, then wait for it)
  run     ship this checkout to every worker, `pip install -e .` there, run launch/train.py
          on all workers (foreground: its output streams here; --background: under nohup)
  logs    tail the run's log file on one worker (--log_worker)
  delete  delete the TPU VM (or the queued resource and its TPU)
  all     create, then run (then delete with --delete_after)

Every gcloud command is an argument list run without a shell. The only shell strings are the
`--command=` of `gcloud compute tpus tpu-vm ssh`, which the remote login shell interprets:
every user value in them goes through shlex.quote. `--dry_run` prints the commands
(shlex.join, one per line) and runs nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from absl import app, flags

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIONS = ("create", "run", "logs", "delete", "all")
TARBALL_NAME = "thack_jax_src.tar.gz"
# Not shipped: VCS data, caches, local environments, build outputs.
EXCLUDED_NAMES = frozenset(
    {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "venv", "build", "dist"}
)

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


def _validate_token(flag: str, value: str | None, example: str) -> str:
    if not value or not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"--{flag}={value!r} is not valid (expected e.g. {example}).")
    return value


def _validate_project(project: str | None) -> str | None:
    if project is not None and not _PROJECT_RE.fullmatch(project):
        raise ValueError(f"--project={project!r} is not a valid GCP project id.")
    return project


def _validate_remote_dir(remote_dir: str) -> str:
    if not _REMOTE_DIR_RE.fullmatch(remote_dir) or ".." in remote_dir.split("/"):
        raise ValueError(
            f"--remote_dir={remote_dir!r} must be a relative path under the remote home "
            "directory (letters, digits, '._-' and '/'; no '..')."
        )
    return remote_dir


def _validate_worker(worker: str) -> str:
    if worker != "all" and not worker.isdigit():
        raise ValueError(f"worker={worker!r} must be 'all' or a worker index such as 0.")
    return worker


def _location_flags(zone: str, project: str | None) -> list[str]:
    out = [f"--zone={validate_zone(zone)}"]
    if project is not None:
        out.append(f"--project={_validate_project(project)}")
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
    accel = f"--accelerator-type={_validate_token('accelerator_type', accelerator_type, 'v4-32')}"
    runtime = _validate_token("runtime_version", runtime_version, "tpu-ubuntu2204-base")
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
    argv += [f"--worker={_validate_worker(worker)}"] + _location_flags(zone, project)
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
    d, t = shlex.quote(_validate_remote_dir(remote_dir)), shlex.quote(tarball)
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
    argv += [f"--gin_file={f}" for f in gin_files]
    argv += [f"--gin_bindings={b}" for b in gin_bindings]
    argv.append(f"--workdir={workdir}")
    train = shlex.join(argv)  # quotes every token, hostile or not
    d, log = shlex.quote(_validate_remote_dir(remote_dir)), shlex.quote(log_file)
    if background:
        return f"cd {d} && nohup {train} > {log} 2>&1 < /dev/null &"
    # pipefail: the ssh exit status is the trainer's, not tee's (TPU VM login shell is bash).
    return f"set -o pipefail; cd {d} && {train} 2>&1 | tee {log}"


def build_logs_remote_command(remote_dir: str, log_file: str = "train.log", follow=True) -> str:
    path = shlex.quote(f"{_validate_remote_dir(remote_dir)}/{log_file}")
    return f"tail -n +1 -F {path}" if follow else f"cat {path}"


@dataclass(frozen=True)
class LaunchConfig:
    """Everything one launch needs; built from the flags (or directly in tests)."""

    name: str
    zone: str
    accelerator_type: str = "v4-8"
    runtime_version: str = "tpu-ubuntu2204-base"
    project: str | None = None
    spot: bool = False
    queued_resource: bool = False
    gin_files: tuple[str, ...] = ()
    gin_bindings: tuple[str, ...] = ()
    workdir: str = ""
    repo_dir: str = str(REPO_ROOT)
    remote_dir: str = "thack_jax"
    log_file: str = "train.log"
    background: bool = False
    env: tuple[str, ...] = ()
    pip_packages: tuple[str, ...] = ("jax[tpu]",)
    log_worker: str = "0"
    follow: bool = True
    delete_after: bool = False
    tarball_path: str = field(default="")

    def tarball(self) -> str:
        return self.tarball_path or os.path.join(
            tempfile.gettempdir(), f"thack_jax-{self.name}.tar.gz"
        )


@dataclass(frozen=True)
class Step:
    description: str
    argv: tuple[str, ...]
    wait_until_active: bool = False  # poll argv (a describe command) until ACTIVE
    needs_tarball: bool = False  # build the source tarball before running argv


def validate_config(cfg: LaunchConfig, action: str) -> None:
    """Raises ValueError naming the first bad flag."""
    if action not in ACTIONS:
        raise ValueError(f"--action={action!r} must be one of {', '.join(ACTIONS)}.")
    validate_name(cfg.name)
    validate_zone(cfg.zone)
    _validate_project(cfg.project)
    _validate_remote_dir(cfg.remote_dir)
    _validate_worker(cfg.log_worker)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.log_file):
        raise ValueError(f"--log_file={cfg.log_file!r} must be a plain file name.")
    if action in ("create", "all"):
        _validate_token("accelerator_type", cfg.accelerator_type, "v4-32")
        _validate_token("runtime_version", cfg.runtime_version, "tpu-ubuntu2204-base")
    if action in ("run", "all"):
        if not cfg.workdir:
            raise ValueError("--workdir is required for --action=run/all (use gs:// on pods).")
        repo = Path(cfg.repo_dir)
        if not (repo / "setup.cfg").is_file() and not (repo / "pyproject.toml").is_file():
            raise ValueError(f"--repo_dir={cfg.repo_dir!r} is not a Python project checkout.")
        for gin_file in cfg.gin_files:
            path = Path(gin_file)
            if path.is_absolute() or ".." in path.parts or not (repo / path).is_file():
                raise ValueError(
                    f"--gin_file={gin_file!r} must be a file inside --repo_dir={cfg.repo_dir!r}, "
                    "given relative to it (it is shipped with the code)."
                )


def plan(cfg: LaunchConfig, action: str) -> list[Step]:
    """The gcloud steps of `action`, in order."""
    validate_config(cfg, action)
    loc = dict(zone=cfg.zone, project=cfg.project)
    steps: list[Step] = []
    if action in ("create", "all"):
        create = build_create_command(
            cfg.name,
            cfg.zone,
            cfg.accelerator_type,
            cfg.runtime_version,
            project=cfg.project,
            spot=cfg.spot,
            queued_resource=cfg.queued_resource,
        )
        steps.append(Step("create", tuple(create)))
        if cfg.queued_resource:
            state = build_queued_state_command(cfg.name, **loc)
            steps.append(Step("wait for ACTIVE", tuple(state), wait_until_active=True))
    if action in ("run", "all"):
        scp = build_scp_command(cfg.name, local_path=cfg.tarball(), remote_path=TARBALL_NAME, **loc)
        steps.append(Step("ship code", tuple(scp), needs_tarball=True))
        install = build_install_remote_command(cfg.remote_dir, TARBALL_NAME, cfg.pip_packages)
        steps.append(
            Step("install", tuple(build_ssh_command(cfg.name, remote_command=install, **loc)))
        )
        train = build_train_remote_command(
            cfg.remote_dir,
            cfg.gin_files,
            cfg.gin_bindings,
            cfg.workdir,
            log_file=cfg.log_file,
            background=cfg.background,
            env=cfg.env,
        )
        steps.append(Step("train", tuple(build_ssh_command(cfg.name, remote_command=train, **loc))))
    if action == "logs":
        tail = build_logs_remote_command(cfg.remote_dir, cfg.log_file, follow=cfg.follow)
        ssh = build_ssh_command(cfg.name, remote_command=tail, worker=cfg.log_worker, **loc)
        steps.append(Step("logs", tuple(ssh)))
    if action == "delete" or (action == "all" and cfg.delete_after):
        delete = build_delete_command(cfg.name, queued_resource=cfg.queued_resource, **loc)
        steps.append(Step("delete", tuple(delete)))
    return steps


def make_source_tarball(repo_dir: str, out_path: str) -> str:
    """Packs `repo_dir` (minus EXCLUDED_NAMES and *.pyc) into a .tar.gz at `out_path`."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p in EXCLUDED_NAMES or p.endswith(".egg-info") for p in parts):
            return None
        if info.name.endswith(".pyc") or Path(out_path).name == Path(info.name).name:
            return None
        return info

    with tarfile.open(out_path, "w:gz") as tar:
        tar.add(repo_dir, arcname=".", filter=keep)
    return out_path


def wait_until_active(argv: Sequence[str], timeout_s: float, poll_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        state = result.stdout.strip()
        print(f"[tpu] queued resource state: {state or result.stderr.strip()}", file=sys.stderr)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
            raise RuntimeError(f"Queued resource entered state {state}: {shlex.join(argv)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Queued resource not ACTIVE after {timeout_s:g} s (state {state}).")
        time.sleep(poll_s)


def execute(steps: Sequence[Step], cfg: LaunchConfig, wait_timeout_s: float) -> None:
    for step in steps:
        print(f"[tpu] {step.description}: {shlex.join(step.argv)}", file=sys.stderr)
        if step.wait_until_active:
            wait_until_active(step.argv, wait_timeout_s)
            continue
        if step.needs_tarball:
            make_source_tarball(cfg.repo_dir, cfg.tarball())
        try:
            rc = subprocess.run(list(step.argv), check=False).returncode
        finally:
            if step.needs_tarball and os.path.exists(cfg.tarball()):
                os.remove(cfg.tarball())
        if rc != 0:
            raise RuntimeError(f"Step '{step.description}' failed with exit status {rc}.")


def _define_flags() -> None:
    # Defined only when run as a script, so importing this module (tests) defines no flags.
    flags.DEFINE_enum("action", None, list(ACTIONS), "What to do.", required=True)
    flags.DEFINE_string("name", None, "TPU VM / queued resource name.")
    flags.DEFINE_string("zone", None, "GCP zone, e.g. us-central2-b.")
    flags.DEFINE_string("project", None, "GCP project (default: gcloud's configured project).")
    flags.DEFINE_string("accelerator_type", "v4-8", "TPU type, e.g. v4-32 or v5p-64.")
    flags.DEFINE_string("runtime_version", "tpu-ubuntu2204-base", "TPU VM software version.")
    flags.DEFINE_bool("spot", False, "Use Spot capacity (preemptible, cheaper).")
    flags.DEFINE_bool("queued_resource", False, "Create through the queued-resources API.")
    flags.DEFINE_multi_string("gin_file", [], "Gin file, relative to --repo_dir (repeatable).")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin binding (repeatable).")
    flags.DEFINE_string("workdir", "", "Training workdir; gs://bucket/path for pods.")
    flags.DEFINE_string("repo_dir", str(REPO_ROOT), "Local checkout to ship.")
    flags.DEFINE_string("remote_dir", "thack_jax", "Code directory under the remote home.")
    flags.DEFINE_string("log_file", "train.log", "Log file name inside --remote_dir.")
    flags.DEFINE_bool("background", False, "Run training under nohup and return at once.")
    flags.DEFINE_multi_string("env", [], "KEY=VALUE for the training process (repeatable).")
    flags.DEFINE_multi_string("pip_package", ["jax[tpu]"], "Extra pip requirements to install.")
    flags.DEFINE_string("log_worker", "0", "Worker whose log --action=logs shows ('all' too).")
    flags.DEFINE_bool("follow", True, "--action=logs: keep following the log (tail -F).")
    flags.DEFINE_bool("delete_after", False, "--action=all: delete the TPU when training ends.")
    flags.DEFINE_float("wait_timeout_s", 6 * 3600, "Max wait for a queued resource (seconds).")
    flags.DEFINE_bool("dry_run", False, "Print the gcloud commands, one per line; run nothing.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    renamed = {"gin_files": "gin_file", "pip_packages": "pip_package"}
    kwargs = {}
    for field_ in dataclasses.fields(LaunchConfig):
        flag = renamed.get(field_.name, field_.name)
        if flag in f:
            value = f[flag].value
            kwargs[field_.name] = tuple(value) if isinstance(value, list) else value
    cfg = LaunchConfig(**kwargs)
    try:
        steps = plan(cfg, f.action)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if cfg.workdir and not cfg.workdir.startswith("gs://") and f.action in ("run", "all"):
        print(
            f"[tpu] warning: --workdir={cfg.workdir!r} is local to each worker; on a multi-host "
            "slice use gs:// so all hosts share checkpoints and reports.",
            file=sys.stderr,
        )
    if f.dry_run:
        for step in steps:
            print(shlex.join(step.argv))
        return
    if shutil.which("gcloud") is None:
        raise SystemExit("[tpu] error: gcloud not found on PATH; install the Google Cloud CLI.")
    try:
        execute(steps, cfg, f.wait_timeout_s)
    except (RuntimeError, TimeoutError) as e:
        raise SystemExit(f"[tpu] error: {e}") from None


if __name__ == "__main__":
    _define_flags()
    app.run(main)

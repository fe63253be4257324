r"""Run thack_jax on a Cloud TPU VM (single host or pod slice) with one command.

  python launch/tpu.py --action=all --name=thack-v4 --zone=us-central2-b \
      --accelerator_type=v4-32 --gin_file=experiments/paper_xsum_small.gin \
      --gin_bindings='distill/TrainConfig.num_steps = 1000' --workdir=gs://my-bucket/thack/run1

Gin files follow train.py's convention (--gin_search_paths, then gin_configs/, then the
current folder). Before anything runs, the gin files and bindings are parsed and the
ExperimentConfig built exactly as train.py will, and the workdir's scheme is checked: a
typo fails here, in a second, not after a pod was created. A gin file inside --repo_dir is
passed by its path there; one outside it is shipped in the tarball (under _shipped_gin/).

Actions:
  create  create the TPU VM (or a queued resource with --queued_resource, then wait for it)
  run     ship this checkout to every worker, `pip install -e .` there, run launch/train.py
          on all workers (foreground: its output streams here; --background: under nohup)
  logs    tail the run's log file on one worker (--log_worker)
  delete  delete the TPU VM (or the queued resource and its TPU)
  all     create, then run (then delete with --delete_after)

The commands come from `thack_jax.cli.tpu_commands` (argument lists run without a shell; the
one shell string per ssh is quoted there). `--dry_run` checks the configuration, prints the
commands (shlex.join, one per line) and runs nothing.
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

from thack_jax.cli import common  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

from thack_jax.cli.tpu_commands import (  # noqa: E402
    TARBALL_NAME,
    build_create_command,
    build_delete_command,
    build_install_remote_command,
    build_logs_remote_command,
    build_queued_state_command,
    build_scp_command,
    build_ssh_command,
    build_train_remote_command,
    validate_name,
    validate_project,
    validate_remote_dir,
    validate_token,
    validate_worker,
    validate_zone,
)

ACTIONS = ("create", "run", "logs", "delete", "all")
# Not shipped: VCS data, caches, local environments, build outputs.
EXCLUDED_NAMES = frozenset(
    {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "venv", "build", "dist"}
)


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
    gin_search_paths: tuple[str, ...] = ()
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
    validate_project(cfg.project)
    validate_remote_dir(cfg.remote_dir)
    validate_worker(cfg.log_worker)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.log_file):
        raise ValueError(f"--log_file={cfg.log_file!r} must be a plain file name.")
    if action in ("create", "all"):
        validate_token("accelerator_type", cfg.accelerator_type, "v4-32")
        validate_token("runtime_version", cfg.runtime_version, "tpu-ubuntu2204-base")
    if action in ("run", "all"):
        if not cfg.workdir:
            raise ValueError("--workdir is required for --action=run/all (use gs:// on pods).")
        repo = Path(cfg.repo_dir)
        if not (repo / "setup.cfg").is_file() and not (repo / "pyproject.toml").is_file():
            raise ValueError(f"--repo_dir={cfg.repo_dir!r} is not a Python project checkout.")
        gin_locations(cfg)  # every file found, every search path inside the checkout


SHIPPED_GIN = "_shipped_gin"  # where gin files from outside --repo_dir go in the tarball


@dataclass(frozen=True)
class GinLocations:
    """Where the gin files are here (`local`) and what train.py is given there (`remote`,
    relative to the shipped checkout); `shipped`: {tarball name: local path} of the files
    from outside the checkout; `search_paths`: the search paths, relative to it."""

    local: tuple[str, ...]
    remote: tuple[str, ...]
    shipped: dict[str, str]
    search_paths: tuple[str, ...]


def gin_locations(cfg: LaunchConfig) -> GinLocations:
    """Resolves --gin_file as train.py will on the workers (the checkout's gin_configs/
    standing in for the package's). Raises ValueError naming the flag."""
    from thack_jax.experiment import gin_registry

    repo = Path(cfg.repo_dir).resolve()
    search = []
    for folder in cfg.gin_search_paths:
        path = Path(folder).resolve()
        if not path.is_dir() or not path.is_relative_to(repo):
            raise ValueError(
                f"--gin_search_paths={folder!r} must be a folder inside --repo_dir="
                f"{cfg.repo_dir!r} (it is shipped with the code)."
            )
        search.append(str(path))
    local, remote, shipped = [], [], {}
    for i, name in enumerate(cfg.gin_files):
        try:
            roots = [*search, str(repo / "gin_configs"), str(repo)]
            path = Path(gin_registry.resolve_gin_file(name, roots))
        except gin_registry.GinConfigError as e:
            raise ValueError(f"--gin_file={name!r}: {e}") from None
        path = path.resolve()
        if path.is_relative_to(repo):
            remote.append(path.relative_to(repo).as_posix())
        else:
            arcname = f"{SHIPPED_GIN}/{i}_{path.name}"
            shipped[arcname] = str(path)
            remote.append(arcname)
        local.append(str(path))
    rel = tuple(Path(p).relative_to(repo).as_posix() for p in search)
    return GinLocations(tuple(local), tuple(remote), shipped, rel)


def check_experiment(cfg: LaunchConfig) -> str:
    """Parses the gin files and bindings and builds the ExperimentConfig as train.py will,
    and checks the workdir's scheme. Returns the experiment's name; raises ValueError with
    train.py's one-line message."""
    from thack_jax.core import storage
    from thack_jax.experiment import gin_registry, runner

    storage.check_scheme(cfg.workdir)
    where = gin_locations(cfg)
    search = [str(Path(cfg.repo_dir).resolve() / p) for p in where.search_paths]
    search.append(str(Path(cfg.repo_dir).resolve() / "gin_configs"))  # its includes
    try:
        gin_registry.parse(where.local, cfg.gin_bindings, search)
        experiment = gin_registry.experiment_config()
        runner.check_models(experiment)
    except ValueError as e:
        raise ValueError(f"the experiment's configuration: {e}") from None
    return experiment.name


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
        where = gin_locations(cfg)
        train = build_train_remote_command(
            cfg.remote_dir,
            where.remote,
            cfg.gin_bindings,
            cfg.workdir,
            log_file=cfg.log_file,
            background=cfg.background,
            env=cfg.env,
            gin_search_paths=where.search_paths,
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


def make_source_tarball(repo_dir: str, out_path: str, extra: dict[str, str] | None = None) -> str:
    """Packs `repo_dir` (minus EXCLUDED_NAMES and *.pyc) into a .tar.gz at `out_path`, plus
    the files `extra` ({name in the tarball: local path})."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p in EXCLUDED_NAMES or p.endswith(".egg-info") for p in parts):
            return None
        if info.name.endswith(".pyc") or Path(out_path).name == Path(info.name).name:
            return None
        return info

    with tarfile.open(out_path, "w:gz") as tar:
        tar.add(repo_dir, arcname=".", filter=keep)
        for arcname, path in (extra or {}).items():
            tar.add(path, arcname=f"./{arcname}")
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
            make_source_tarball(cfg.repo_dir, cfg.tarball(), gin_locations(cfg).shipped)
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
    common.define_gin_flags()
    flags.adopt_module_key_flags(common)  # --help lists the gin flags and --verbose
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
    flags.DEFINE_bool(
        "dry_run", False, "Check the configuration, print the gcloud commands; run nothing."
    )


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
        if f.action in ("run", "all"):
            name = check_experiment(cfg)
            print(f"[tpu] configuration checked: experiment {name!r}", file=sys.stderr)
    except ValueError as e:
        raise SystemExit(f"tpu.py: error: {e}") from None
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
        raise SystemExit("tpu.py: error: gcloud not found on PATH; install the Google Cloud CLI.")
    try:
        execute(steps, cfg, f.wait_timeout_s)
    except (RuntimeError, TimeoutError) as e:
        raise SystemExit(f"tpu.py: error: {e}") from None


def run() -> None:
    """Console script `thack-tpu` (and `python launch/tpu.py`)."""
    _define_flags()
    common.run(main, "tpu.py")


if __name__ == "__main__":
    run()

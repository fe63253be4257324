"""A whole experiment with a gs:// workdir, against the fake GCS server of tests/_gcs.py:
killed once (SIGKILL) and resumed, equal to the same experiment in a local folder, its report
rebuilt from the bucket; and two processes that share only the bucket. No local folder named
`gs:` may appear (the old behaviour: `./gs:/bucket/...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_distributed import parse_result, run_processes

from thack_jax.core import storage

REPO = Path(__file__).resolve().parents[2]

# A tiny experiment: shared stages, one offline and one online-teacher run of 8 steps.
_EXPERIMENT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from _experiment_common import tiny_config
    from thack_jax.experiment import runner
    from thack_jax.experiment.config import RunConfig, TrainConfig

    cfg = tiny_config(
        runs=(
            RunConfig(name="offline", regime="offline", num_prompts=16),
            RunConfig(name="online_teacher", regime="online_teacher"),
        ),
        distill=TrainConfig(num_steps=8, batch_size=8, warmup_steps=1, checkpoint_every=2),
    )
    runner.Experiment(cfg, sys.argv[1], progress=False).run()
    print("RESULT " + json.dumps({{"done": True}}), flush=True)
    """
).format(tests=str(REPO / "tests"))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> Path:
    """One JAX compilation cache for every process of this file (the same programs)."""
    return tmp_path_factory.mktemp("compilation_cache")


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)  # carries the emulator's variables (tests/_gcs.py)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(cache),
    )
    return env


def _start(workdir: str, cwd: Path, env) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", _EXPERIMENT, workdir],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "RESULT" in out, err[-4000:]


def _metrics(workdir: str, run: str) -> list[dict]:
    path = storage.join(workdir, "runs", run, "train", "metrics.jsonl")
    return [json.loads(line) for line in storage.read_text(path).splitlines()]


def _wait_for_a_checkpoint(proc: subprocess.Popen, workdir: str) -> None:
    """Returns once the offline run has a checkpoint in the bucket (mid-distillation)."""
    checkpoints = storage.join(workdir, "runs", "offline", "train", "checkpoints")
    deadline = time.time() + 600
    while not any(n.isdigit() for n in storage.listdir(checkpoints)):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.time() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.2)


def _no_local_gs_folder(*folders: Path) -> None:
    for folder in folders:
        found = [str(p) for p in folder.rglob("gs:")]
        assert not found, f"a local folder named gs: appeared: {found}"


@pytest.mark.slow
def test_experiment_in_a_bucket_killed_resumed_and_reported(
    gcs_bucket, tmp_path, compilation_cache
):
    env, cwd = _env(compilation_cache), tmp_path / "cwd"
    local = str(tmp_path / "local")
    _finish(_start(local, cwd, env))

    workdir = gcs_bucket + "/exp"
    proc = _start(workdir, cwd, env)
    _wait_for_a_checkpoint(proc, workdir)  # then SIGKILL, mid-distillation
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not storage.exists(storage.join(workdir, "runs", "offline", "COMPLETE.json"))
    _finish(_start(workdir, cwd, env))  # the first rerun finishes

    for run in ("offline", "online_teacher"):
        got, want = _metrics(workdir, run), _metrics(local, run)
        assert [r["step"] for r in got] == list(range(0, 9)), run  # each step once
        assert got == want, run  # bitwise: the bucket run equals the local one
        assert storage.exists(storage.join(workdir, "runs", run, "COMPLETE.json"))
    for name in ("report.md", "plots", "oracle/model/model.safetensors", "eval_prompts.npy"):
        assert storage.exists(storage.join(workdir, name)), name

    # The report rebuilt from the bucket alone, by the report entry point.
    storage.remove(storage.join(workdir, "report.md"))
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "report.py"), f"--workdir={workdir}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = storage.read_text(storage.join(workdir, "report.md"))
    assert "offline" in report and "online_teacher" in report
    _no_local_gs_folder(cwd, tmp_path)


_TWO_PROCESSES = textwrap.dedent(
    """
    import json, os, sys, tempfile
    from thack_jax.parallel import distributed
    distributed.initialize(initialization_timeout=60)
    import jax
    scratch = {scratch!r}[jax.process_index()]  # each process its own local folder
    os.makedirs(scratch, exist_ok=True)
    os.chdir(scratch)
    tempfile.tempdir = scratch
    sys.argv = ["experiment", {workdir!r}]
    exec(compile({experiment!r}, "experiment", "exec"))
    distributed.shutdown()
    """
)


@pytest.mark.slow
def test_two_processes_share_only_the_bucket(gcs_bucket, tmp_path):
    workdir = gcs_bucket + "/exp2"
    scratch = [str(tmp_path / "host0"), str(tmp_path / "host1")]
    script = _TWO_PROCESSES.format(scratch=scratch, workdir=workdir, experiment=_EXPERIMENT)
    results = run_processes(
        script,
        devices_per_process=4,
        timeout_s=900,
        extra_env={
            k: v
            for k, v in os.environ.items()
            if k.startswith(
                (
                    "STORAGE_",
                    "FSSPEC_",
                    "GCS",
                    "TENSORSTORE_",
                    "GOOGLE_",
                    "GCE_",
                    "NO_GCE",
                    "EPATH_",
                )
            )
        },
    )
    for r in results:
        assert parse_result(r, results) == {"done": True}
    for run in ("offline", "online_teacher"):
        steps = [r["step"] for r in _metrics(workdir, run)]
        assert steps == list(range(0, 9)), (run, steps)  # process 0 writes, once
        assert storage.exists(storage.join(workdir, "runs", run, "COMPLETE.json"))
    assert storage.exists(storage.join(workdir, "report.md"))
    _no_local_gs_folder(tmp_path)


def _delete_bucket(url: str) -> None:
    """Deletes every object, then the bucket; retried, since the run keeps writing."""
    bucket = url.removeprefix("gs://")
    for _ in range(50):
        try:
            storage.rmtree(url)
        except (FileExistsError, FileNotFoundError):
            pass  # gcsfs deletes the root too; 412 when an object landed in between
        request = urllib.request.Request(
            f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}", method="DELETE"
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
            return
        except urllib.error.HTTPError as e:
            if e.code == 404:  # the recursive delete of the root removed it
                return
            time.sleep(0.05)  # 412: an object landed in between
        except FileExistsError:
            time.sleep(0.05)
    raise AssertionError(f"could not delete {url}")


@pytest.mark.slow
def test_a_bucket_that_disappears_mid_run_stops_it_naming_the_path(
    gcs_bucket, tmp_path, compilation_cache
):
    env, cwd = _env(compilation_cache), tmp_path / "cwd"
    workdir = gcs_bucket + "/exp"
    proc = _start(workdir, cwd, env)
    _wait_for_a_checkpoint(proc, workdir)
    _delete_bucket(gcs_bucket)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode not in (0, None), "the run went on without its workdir"
    assert gcs_bucket.removeprefix("gs://") in err, err[
        -3000:
    ]  # the error names the bucket / path it could not write
    _no_local_gs_folder(cwd, tmp_path)  # and nothing fell back to the local disk

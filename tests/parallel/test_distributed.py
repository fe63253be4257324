"""Tests for parallel.distributed: settings, TPU detection, and a real 2-process CPU run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

from thack_jax.parallel import distributed

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Reusable multi-process harness (the trainer test extends it to train a few steps).
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A localhost TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    script: str,
    num_processes: int = 2,
    devices_per_process: int = 4,
    timeout_s: float = 60.0,
    coordinator_address: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[subprocess.CompletedProcess]:
    """Runs `script` (Python source) in `num_processes` CPU processes of one JAX job.

    Each process gets `devices_per_process` virtual CPU devices and the THACK_* variables that
    `distributed.initialize()` reads, so the script only has to call `initialize()`;
    `extra_env` is applied last and overrides any of them. All processes are killed if any is
    still running after `timeout_s`.

    Returns:
      One CompletedProcess per process id (stdout and stderr as text).
    """
    address = coordinator_address or f"127.0.0.1:{free_port()}"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("THACK_", "JAX_", "XLA_"))}
    base_env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        THACK_COORDINATOR_ADDRESS=address,
        THACK_NUM_PROCESSES=str(num_processes),
    )
    procs = []
    for pid in range(num_processes):
        env = dict(base_env, THACK_PROCESS_ID=str(pid))
        env.update(extra_env or {})  # last, so a test can override any variable
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=env,
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for pid, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                outs = [p.communicate() for p in procs]
                raise AssertionError(
                    f"process {pid} did not finish within {timeout_s} s; stderr tails:\n"
                    + "\n".join(f"[{i}] {o[1][-2000:]}" for i, o in enumerate(outs))
                ) from None
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def parse_result(
    completed: subprocess.CompletedProcess,
    results: list[subprocess.CompletedProcess] | None = None,
) -> dict:
    """The JSON object a worker printed on a line starting with 'RESULT '.

    `results` (every process of the job): a failure then shows each process's stderr tail,
    since the first process's log often only says that another one died.
    """
    if completed.returncode != 0:
        logs = [completed] if results is None else results
        tails = "\n".join(
            f"[process {i}, rc={r.returncode}]\n{r.stderr[-3000:]}" for i, r in enumerate(logs)
        )
        raise AssertionError(f"worker failed (rc={completed.returncode}):\n{tails}")
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no RESULT line in worker stdout:\n{completed.stdout[-2000:]}")


# ---------------------------------------------------------------------------------------------
# Multi-process tests.
# ---------------------------------------------------------------------------------------------

_PSUM_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    from thack_jax.parallel import distributed
    assert distributed.initialize(initialization_timeout=30)
    assert distributed.initialize()  # idempotent: second call is a no-op
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rank, n_local = jax.process_index(), jax.local_device_count()
    global_x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    rows = global_x.shape[0] // jax.process_count()
    local = global_x[rank * rows:(rank + 1) * rows]  # [4, 3] on each process
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    replicated = NamedSharding(mesh, P())
    total = jax.jit(jnp.sum, out_shardings=replicated)(x)
    mean = jax.jit(jnp.mean, out_shardings=replicated)(x)
    psum = jax.jit(jax.shard_map(
        lambda b: jax.lax.psum(b.sum(), "data"), mesh=mesh, in_specs=P("data"), out_specs=P()
    ))(x)
    print("RESULT " + json.dumps(dict(
        rank=rank, process_count=distributed.process_count(), is_primary=distributed.is_primary(),
        device_count=jax.device_count(), local_device_count=n_local, global_shape=list(x.shape),
        total=float(total), mean=float(mean), psum=float(psum),
    )))
    """
)


def test_two_processes_form_one_8_device_job():
    results = [parse_result(r) for r in run_processes(_PSUM_SCRIPT, timeout_s=90)]
    expected_total = float(sum(range(24)))
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        assert res["process_count"] == 2
        assert res["is_primary"] == (rank == 0)
        assert res["device_count"] == 8
        assert res["local_device_count"] == 4
        assert res["global_shape"] == [8, 3]
        assert res["total"] == pytest.approx(expected_total)
        assert res["psum"] == pytest.approx(expected_total)
        assert res["mean"] == pytest.approx(expected_total / 24)


_DEAD_COORDINATOR_SCRIPT = textwrap.dedent(
    """
    import time
    from thack_jax.parallel import distributed
    start = time.monotonic()
    try:
        distributed.initialize(initialization_timeout=5)
    except TimeoutError as e:
        print("TIMEOUT after %.1f s: %s" % (time.monotonic() - start, e))
        raise SystemExit(3)
    print("initialize returned without error")
    """
)


def test_unreachable_coordinator_times_out_naming_the_address():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    # Only process 1 runs: process 0 (which would host the coordinator) is "dead".
    (result,) = run_processes(
        _DEAD_COORDINATOR_SCRIPT,
        num_processes=1,
        coordinator_address=address,
        timeout_s=60,
        extra_env={"THACK_NUM_PROCESSES": "2", "THACK_PROCESS_ID": "1"},
    )
    assert result.returncode == 3, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    assert "TIMEOUT after" in result.stdout
    assert address in result.stdout
    elapsed = float(result.stdout.split("TIMEOUT after ")[1].split(" s")[0])
    assert 4.0 <= elapsed < 15.0


# ---------------------------------------------------------------------------------------------
# In-process unit tests (single process).
# ---------------------------------------------------------------------------------------------


def test_resolve_settings_arguments_win_over_environment():
    env = {
        "THACK_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "THACK_NUM_PROCESSES": "4",
        "THACK_PROCESS_ID": "2",
        "THACK_LOCAL_DEVICE_IDS": "0,1",
    }
    from_env = distributed.resolve_settings(environ=env)
    assert from_env == distributed.DistributedSettings("10.0.0.1:1234", 4, 2, (0, 1))
    from_args = distributed.resolve_settings("h:9", 2, 1, 3, environ=env)
    assert from_args == distributed.DistributedSettings("h:9", 2, 1, (3,))
    assert distributed.resolve_settings(environ={}).is_empty()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"THACK_NUM_PROCESSES": "two"}, "THACK_NUM_PROCESSES='two'"),
        ({"THACK_COORDINATOR_ADDRESS": "nohostport"}, "host:port"),
        ({"THACK_NUM_PROCESSES": "2", "THACK_PROCESS_ID": "2"}, r"process_id=2 must be in"),
        ({"THACK_LOCAL_DEVICE_IDS": "0;1"}, "THACK_LOCAL_DEVICE_IDS"),
    ],
)
def test_resolve_settings_rejects_bad_values(env, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve_settings(environ=env)


def test_incomplete_settings_name_what_is_missing(monkeypatch):
    for key in ("THACK_NUM_PROCESSES", "THACK_PROCESS_ID", "THACK_DISTRIBUTED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("THACK_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # never treat the test machine as a TPU VM
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        distributed.initialize()


def test_single_process_is_a_no_op(monkeypatch):
    for key in ("THACK_COORDINATOR_ADDRESS", "THACK_NUM_PROCESSES", "THACK_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("THACK_DISTRIBUTED", "auto")
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1, process_id=0, coordinator_address="h:1") is False
    monkeypatch.setenv("THACK_DISTRIBUTED", "off")
    assert distributed.initialize(num_processes=2, process_id=1, coordinator_address="h:1") is False
    monkeypatch.setenv("THACK_DISTRIBUTED", "sometimes")
    with pytest.raises(ValueError, match="THACK_DISTRIBUTED='sometimes'"):
        distributed.initialize()
    assert not jax.distributed.is_initialized()
    assert distributed.process_count() == 1
    assert distributed.is_primary()


def test_primary_only_runs_on_process_zero(monkeypatch):
    calls = []

    @distributed.primary_only
    def write_report(path):
        calls.append(path)
        return "written"

    assert write_report("a.md") == "written"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert write_report("b.md") is None
    assert calls == ["a.md"]
    assert write_report.__name__ == "write_report"
    distributed.barrier("single-process barrier is a no-op")


def _fake_pci(root: Path, devices: dict[str, tuple[str, str]]) -> str:
    for slot, (vendor, device) in devices.items():
        (root / slot).mkdir(parents=True)
        (root / slot / "vendor").write_text(vendor + "\n")
        (root / slot / "device").write_text(device + "\n")
    return str(root)


def test_cloud_tpu_detection(tmp_path):
    no_pci = str(tmp_path / "none")
    assert not distributed.running_on_cloud_tpu({}, pci_root=no_pci)
    assert distributed.running_on_cloud_tpu({"TPU_WORKER_HOSTNAMES": "a,b"}, pci_root=no_pci)
    assert distributed.running_on_cloud_tpu({"CLOUD_TPU_TASK_ID": "0"}, pci_root=no_pci)
    # JAX_PLATFORMS without tpu: a CPU run on a TPU VM stays single-process.
    assert not distributed.running_on_cloud_tpu(
        {"TPU_WORKER_HOSTNAMES": "a,b", "JAX_PLATFORMS": "cpu"}, pci_root=no_pci
    )
    gvnic_only = _fake_pci(tmp_path / "gvnic", {"0000:00:04.0": ("0x1ae0", "0x0042")})
    assert not distributed.running_on_cloud_tpu({}, pci_root=gvnic_only)
    v4 = _fake_pci(
        tmp_path / "v4",
        {"0000:00:04.0": ("0x1ae0", "0x0042"), "0000:00:05.0": ("0x1ae0", "0x005e")},
    )
    assert distributed.running_on_cloud_tpu({}, pci_root=v4)
    assert distributed.running_on_cloud_tpu({"JAX_PLATFORMS": "tpu,cpu"}, pci_root=v4)


def test_wait_for_coordinator_returns_once_listening():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        distributed.wait_for_coordinator(f"127.0.0.1:{port}", timeout_s=5)
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(TimeoutError, match=dead):
        distributed.wait_for_coordinator(dead, timeout_s=0.5)


def test_shutdown_is_a_no_op_for_one_process():
    distributed.shutdown()  # not initialised: nothing to leave, no error
    distributed.shutdown()
    assert not jax.distributed.is_initialized()


_SLOW_PROCESS_0 = textwrap.dedent(
    """
    import json, time
    from thack_jax.parallel import distributed
    distributed.initialize(initialization_timeout=60)
    import jax
    if jax.process_index() == 0:
        time.sleep(45)  # work of its own (a report): longer than gloo's 30 s timeout
    distributed.barrier("after_report")
    agreed = distributed.any_process(jax.process_index() == 1)
    distributed.shutdown()
    print("RESULT " + json.dumps({"agreed": agreed}))
    """
)


@pytest.mark.slow
def test_barrier_waits_for_a_process_busy_longer_than_the_collectives_timeout():
    # With a device collective as the barrier (multihost_utils.sync_global_devices) the
    # waiting process fails after 30 s ('Gloo context initialization failed:
    # DEADLINE_EXCEEDED') and leaves, and process 0 then hangs: the CI failure this replaces.
    results = run_processes(_SLOW_PROCESS_0, devices_per_process=1, timeout_s=240)
    assert [parse_result(r, results) for r in results] == [{"agreed": True}] * 2

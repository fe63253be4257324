"""Multi-process (multi-host) start-up: one call before any other JAX work.

`initialize()` decides between three cases:

1. Explicit settings (arguments, else the environment variables `THACK_COORDINATOR_ADDRESS`,
   `THACK_NUM_PROCESSES`, `THACK_PROCESS_ID`, `THACK_LOCAL_DEVICE_IDS`): calls
   `jax.distributed.initialize` with them. This is the GPU-cluster and CPU-test path.
2. Cloud TPU VM (detected from the environment, see `running_on_cloud_tpu`): calls
   `jax.distributed.initialize()` without arguments; JAX then reads the worker list and
   this worker's id from the TPU VM metadata server (GCE) or from `TPU_WORKER_HOSTNAMES` /
   `TPU_WORKER_ID` (GKE). Any explicit settings given are passed on; JAX fills in the rest.
3. Otherwise: a no-op; the run is single-process.

`THACK_DISTRIBUTED=off` forces case 3 and `THACK_DISTRIBUTED=on` forces a call to
`jax.distributed.initialize` (auto-detection for Slurm / Open MPI clusters). The call is
idempotent: once the distributed runtime is up, later calls return at once.

Why the coordinator is probed before JAX is called: when a non-zero process cannot reach the
coordinator, jaxlib (0.10.2) aborts the whole Python process with a C++ check failure
(`DEADLINE_EXCEEDED ... RegisterTask`) that no `except` can catch. A plain TCP probe first
turns the commonest failure (wrong address, coordinator not started) into a `TimeoutError`
that names the address.
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import jax

logger = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "THACK_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "THACK_NUM_PROCESSES"
ENV_PROCESS_ID = "THACK_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "THACK_LOCAL_DEVICE_IDS"
ENV_MODE = "THACK_DISTRIBUTED"  # auto (default) | on | off

# Set by Cloud TPU on GKE (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID, TPU_PROCESS_ADDRESSES), by
# multislice / queued resources (MEGASCALE_COORDINATOR_ADDRESS) and by older TPU pod
# runtimes (CLOUD_TPU_TASK_ID). A plain GCE TPU VM sets none of them; see the PCI scan.
TPU_ENV_VARS = (
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_ID",
    "CLOUD_TPU_TASK_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
)
# Google's PCI vendor id and the device ids of TPU chips (v2/v3 .. TPU7x). The vendor id
# alone is not enough: Google's virtual NIC (gVNIC) shares it.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DistributedSettings:
    """What `jax.distributed.initialize` is called with; None = let JAX detect it."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None

    def is_empty(self) -> bool:
        return all(
            v is None
            for v in (
                self.coordinator_address,
                self.num_processes,
                self.process_id,
                self.local_device_ids,
            )
        )

    def missing(self) -> list[str]:
        """Names of the settings a non-TPU multi-process run still needs."""
        names = ("coordinator_address", "num_processes", "process_id")
        return [n for n in names if getattr(self, n) is None]


def _env_int(environ: Mapping[str, str], key: str) -> int | None:
    raw = environ.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"Environment variable {key}={raw!r} is not an integer.") from None


def resolve_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedSettings:
    """Merges arguments with the THACK_* environment variables (arguments win)."""
    environ = os.environ if environ is None else environ
    if coordinator_address is None:
        coordinator_address = environ.get(ENV_COORDINATOR_ADDRESS) or None
    if num_processes is None:
        num_processes = _env_int(environ, ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(environ, ENV_PROCESS_ID)
    if local_device_ids is None and environ.get(ENV_LOCAL_DEVICE_IDS, "").strip():
        raw = environ[ENV_LOCAL_DEVICE_IDS]
        try:
            local_device_ids = [int(x) for x in raw.split(",")]
        except ValueError:
            raise ValueError(
                f"Environment variable {ENV_LOCAL_DEVICE_IDS}={raw!r} is not a comma-separated "
                "list of integers."
            ) from None
    if isinstance(local_device_ids, int):
        local_device_ids = [local_device_ids]
    ids = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)

    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(
            f"coordinator_address={coordinator_address!r} must be 'host:port' (e.g. 10.0.0.1:1234)."
        )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1.")
    if process_id is not None and num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id={process_id} must be in [0, num_processes={num_processes})."
            )
    return DistributedSettings(coordinator_address, num_processes, process_id, ids)


def running_on_cloud_tpu(
    environ: Mapping[str, str] | None = None, pci_root: str = "/sys/bus/pci/devices"
) -> bool:
    """True on a Cloud TPU VM, where `jax.distributed.initialize()` needs no arguments.

    Detected by a TPU environment variable (`TPU_ENV_VARS`) or, on a plain GCE TPU VM, by a
    TPU chip on the PCI bus. False when `JAX_PLATFORMS` is set and excludes `tpu` (e.g. CPU
    tests run on a TPU VM).
    """
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms and "tpu" not in platforms.lower().split(","):
        return False
    if any(environ.get(key) for key in TPU_ENV_VARS):
        return True
    for vendor_path in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor_path) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor_path), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Retries a TCP connection to `address` ('host:port') until it opens or `timeout_s` ends.

    Raises:
      TimeoutError: naming the address, when nothing accepted a connection in time.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # IPv6 literals come as [::1]:1234
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"coordinator_address={address!r} has a non-numeric port.") from None
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port_number), timeout=min(2.0, remaining)):
                return
        except OSError as e:  # refused, unreachable, unknown host: the coordinator may be late
            last_error = e
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        f"Could not reach the jax.distributed coordinator at {address} within {timeout_s:g} s "
        f"(last error: {last_error}). Check that process 0 is running and listening on that "
        f"address, and that the address is the same for every process "
        f"(${ENV_COORDINATOR_ADDRESS} or coordinator_address=)."
    )


def _use_gloo_for_cpu_collectives() -> None:
    # Cross-process collectives on the CPU backend need a collectives implementation. jax
    # 0.10.2 defaults to gloo already; older versions defaulted to none, so set it only if
    # unset. It must happen before the CPU backend is created.
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # a jax without the option: nothing to configure
        return
    if current is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Starts the JAX distributed runtime when this run spans several processes.

    Call once at program start, before any JAX computation or `jax.devices()`.

    Args:
      coordinator_address: 'host:port' of process 0 (env `THACK_COORDINATOR_ADDRESS`).
      num_processes: total number of processes (env `THACK_NUM_PROCESSES`).
      process_id: this process's rank in [0, num_processes) (env `THACK_PROCESS_ID`).
      local_device_ids: devices this process may use (env `THACK_LOCAL_DEVICE_IDS`, '0,1').
      initialization_timeout: seconds to wait for the coordinator and the other processes.

    Returns:
      True if the distributed runtime is up (now or from an earlier call), False for a
      single-process run.

    Raises:
      ValueError: incomplete or inconsistent settings (the message names them).
      TimeoutError: the coordinator did not accept a connection in time (names the address).
      RuntimeError: `jax.distributed.initialize` failed, e.g. it was called after JAX had
        already created its backends (the message names the coordinator address).
    """
    if jax.distributed.is_initialized():
        return True
    mode = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{ENV_MODE}={mode!r} must be one of auto, on, off.")
    if mode == "off":
        return False

    settings = resolve_settings(coordinator_address, num_processes, process_id, local_device_ids)
    on_tpu = running_on_cloud_tpu()
    if settings.is_empty() and not on_tpu and mode != "on":
        return False  # single process
    if not on_tpu and mode != "on" and settings.missing():
        raise ValueError(
            "Multi-process settings are incomplete: missing "
            f"{', '.join(settings.missing())} (give them as arguments or set "
            f"{ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got {settings}."
        )
    if settings.num_processes == 1 and not on_tpu:
        return False  # explicitly single-process: nothing to coordinate

    _use_gloo_for_cpu_collectives()
    address = settings.coordinator_address
    if address is not None and settings.process_id not in (None, 0):
        wait_for_coordinator(address, initialization_timeout)

    where = address or "(auto-detected)"
    logger.info(
        "jax.distributed.initialize: coordinator %s, process %s of %s",
        where,
        settings.process_id,
        settings.num_processes,
    )
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=None
            if settings.local_device_ids is None
            else list(settings.local_device_ids),
            initialization_timeout=initialization_timeout,
        )
    except Exception as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed (coordinator {where}, process "
            f"{settings.process_id} of {settings.num_processes}): {e}"
        ) from e
    return True


def process_count() -> int:
    """Number of processes (hosts) in this run; 1 when not distributed."""
    return jax.process_count()


def process_index() -> int:
    """This process's rank in [0, process_count())."""
    return jax.process_index()


def is_primary() -> bool:
    """True on process 0, the one that writes reports, plots and metric files."""
    return jax.process_index() == 0


def primary_only(fn: _F) -> _F:
    """Wraps `fn` so it runs on process 0 only; other processes get None back.

    For side effects that must happen once per run (reports, plots, metric files). Do not
    wrap anything that runs JAX collectives: every process must take part in those.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_primary():
            return fn(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


# How long a process waits at `barrier` for the others: process 0 may be writing a report
# or an export to a bucket meanwhile, which can take minutes on a loaded machine.
BARRIER_TIMEOUT_S = 3600
_barrier_calls = itertools.count()  # every process calls barriers in the same order


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process reaches the barrier `name`; a no-op for one process.

    The barrier is the coordination service's (`wait_at_barrier`), not a device collective:
    a collective waiting on a process busy with work of its own (process 0 writing the
    report) fails after the CPU collectives' (gloo's) fixed timeout, about 30 s, and the
    waiting process then leaves while process 0 hangs in the next collective. Each call gets
    a unique id (`name` and a call counter), since the service refuses a reused one.
    Raises the service's error (naming the barrier) after `timeout_s`.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the runtime's client (no public API)

    client = jax_distributed.global_state.client
    barrier_id = f"thack_{name}_{next(_barrier_calls)}"
    if client is None:  # not started by jax.distributed.initialize: a device collective
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(barrier_id)
        return
    client.wait_at_barrier(barrier_id, int(timeout_s * 1000))


def shutdown() -> None:
    """Leaves the distributed runtime now (a no-op when it is not up).

    Call it once every process has passed the same barrier (the end of
    `Experiment.run`): the processes then enter JAX's shutdown barrier together. Left to
    interpreter exit, that barrier runs after every later-registered atexit handler (gcsfs
    closing its sessions, orbax, TensorFlow), whose time differs per process; a process
    that reaches it more than `shutdown_timeout_seconds` (300 s) after another aborts both
    (SIGABRT, 'Shutdown barrier has failed').
    """
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def any_process(flag: bool) -> bool:
    """True when `flag` is True on any process (an all-gather; no-op for one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def stop_if_signalled(where: str) -> None:
    """Raises `interrupt.Interrupted` once SIGTERM / SIGINT reached any process (all agree,
    so that no process goes on into collectives the others have left). `where` ends the
    message, e.g. 'before stage teacher'."""
    import signal

    from thack_jax.core import interrupt

    # Everyone present first (see `barrier`): the gather below is a CPU collective with a
    # 30 s timeout, and between stages process 0 may come from work of its own (reports,
    # exports). Not in `any_process`, which the trainer calls every step in lockstep.
    barrier(f"stop_check_{where}")
    if any_process(interrupt.requested() is not None):
        raise interrupt.Interrupted(interrupt.requested() or signal.SIGTERM, where)


class WorkdirNotSharedError(RuntimeError):
    """The processes of a multi-process run do not see the same workdir."""


SHARED_CHECK_DIR = ".shared_check"


def check_shared_workdir(workdir: str) -> None:
    """Refuses a workdir that the processes of this run do not share; a no-op for one process.

    Every process saves its shards of the same checkpoints and reads the stage outputs that
    process 0 wrote, so a folder on each host's local disk silently splits the run into
    copies that vanish with the VMs. Process 0 writes a random token file into the workdir;
    every process must read the same token back. Costs one small write and read.
    """
    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    from thack_jax.core import storage

    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint8))
    name = bytes(np.asarray(token, np.uint8)).hex()
    path = storage.join(workdir, SHARED_CHECK_DIR, name)
    if jax.process_index() == 0:
        storage.write_atomic(path, name)
    barrier(f"shared_workdir_write_{name}")
    sees = storage.exists(path) and storage.read_text(path) == name
    seen = np.asarray(multihost_utils.process_allgather(np.asarray([sees])))
    barrier(f"shared_workdir_read_{name}")
    if jax.process_index() == 0:
        storage.remove(path)
    barrier(f"shared_workdir_clean_{name}")  # on return, no process sees the token
    blind = [i for i, ok in enumerate(seen.reshape(-1)) if not ok]
    if blind:
        raise WorkdirNotSharedError(
            f"workdir {workdir} is not shared by the {jax.process_count()} processes of this "
            f"run: process(es) {blind} cannot read {path}, which process 0 wrote. Every "
            "process writes the same checkpoints and reads the same stage outputs, so a "
            "folder on each host's own disk splits the run into copies that are lost with "
            "the VMs. Use a gs:// workdir (or a filesystem mounted on every host)."
        )

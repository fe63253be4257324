"""The offline store in a gs:// directory: the same files as a local store once complete,
one object per finished chunk while filling (resume at the first unfinished chunk), chunk
objects deleted at the end, one writer, integrity checks, the host-memory limit."""

import numpy as np
import pytest
from _fake_gcs import bucket_fixture, gcs_bucket, gcs_server, memory_bucket_fixture  # noqa: F401
from test_offline_store import _generate, _prompts, _silent, _spec

from thack_jax.core import storage
from thack_jax.data import offline_store
from thack_jax.data.offline_store import OfflineStore, StoreIntegrityError, StoreMismatchError


def _local(tmp_path, chunk_size=3):
    store = OfflineStore.create_or_open(str(tmp_path / "local"), _spec(), _prompts())
    store.fill(_generate, chunk_size, progress=_silent)
    return store


def test_remote_store_has_the_local_files(bucket, tmp_path):
    d = f"{bucket}/run/store"
    store = OfflineStore.create_or_open(d, _spec(), _prompts())
    assert storage.listdir(d) == ["inputs.npy", "manifest.json"]
    store.fill(_generate, chunk_size=3, progress=_silent)
    local = _local(tmp_path)
    assert storage.listdir(d) == ["inputs.npy", "manifest.json", "targets.npy"]  # no chunks/
    for name in ("inputs.npy", "manifest.json", "targets.npy"):
        remote_bytes = storage.read_bytes(storage.join(d, name))
        assert remote_bytes == storage.read_bytes(storage.join(local.directory, name)), name
    reopened = OfflineStore.open(d)  # verifies the checksums
    np.testing.assert_array_equal(reopened.targets, local.targets)
    np.testing.assert_array_equal(reopened.prompts, _prompts())
    assert not reopened.targets.flags.writeable and not reopened.inputs.flags.writeable
    assert OfflineStore.create_or_open(d, _spec()).is_complete


def test_remote_resume_at_first_unfinished_chunk(bucket, tmp_path):
    d = f"{bucket}/store"

    def failing(prompts, k):
        if k == 2:
            raise KeyboardInterrupt("simulated kill")
        return _generate(prompts, k)

    with pytest.raises(KeyboardInterrupt):
        OfflineStore.create_or_open(d, _spec(), _prompts()).fill(failing, 3, progress=_silent)
    chunks = storage.join(d, offline_store.CHUNKS_DIR)
    assert storage.listdir(chunks) == ["targets.000000.npy", "targets.000001.npy"]
    assert storage.read_json(storage.join(d, "manifest.json"))["chunks_done"] == 2
    resumed = OfflineStore.create_or_open(d, _spec(), _prompts())
    assert resumed.chunks_done == 2 and not resumed.is_complete
    local = _local(tmp_path)
    np.testing.assert_array_equal(resumed.targets[:18], local.targets[:18])  # chunks 0, 1
    assert not resumed.targets[18:].any()
    with pytest.raises(StoreMismatchError, match="chunk_size: stored 3 vs requested 5"):
        resumed.fill(_generate, 5, progress=_silent)
    seen = []
    resumed.fill(lambda p, k: seen.append(k) or _generate(p, k), 3, progress=_silent)
    assert seen == [2, 3]
    np.testing.assert_array_equal(OfflineStore.open(d).targets, local.targets)
    assert not storage.exists(chunks)


def test_remote_chunk_missing_is_named(memory_bucket):
    d = f"{memory_bucket}/store"
    store = OfflineStore.create_or_open(d, _spec(), _prompts())
    with pytest.raises(KeyboardInterrupt):
        store.fill(lambda p, k: _generate(p, k) if k < 2 else _kill(), 3, progress=_silent)
    storage.remove(storage.join(d, "chunks", "targets.000001.npy"))
    with pytest.raises(FileNotFoundError, match=r"chunks/targets\.000001\.npy"):
        OfflineStore.open(d)


def _kill():
    raise KeyboardInterrupt("simulated kill")


def test_remote_kill_while_deleting_chunks(memory_bucket):
    d = f"{memory_bucket}/store"
    store = OfflineStore.create_or_open(d, _spec(), _prompts())
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(OfflineStore, "_remove_chunks", lambda self: _kill())
        store.fill(_generate, 3, progress=_silent)
    assert storage.exists(storage.join(d, "chunks"))  # complete, with leftovers
    reopened = OfflineStore.create_or_open(d, _spec(), _prompts())
    assert reopened.is_complete and not storage.exists(storage.join(d, "chunks"))


def test_remote_non_writer_writes_nothing(memory_bucket, tmp_path):
    d = f"{memory_bucket}/store"
    store = OfflineStore.create_or_open(d, _spec(), _prompts(), writer=False)
    store.fill(_generate, 3, progress=_silent)
    assert store.is_complete and not storage.exists(d)
    np.testing.assert_array_equal(store.targets, _local(tmp_path).targets)


def test_remote_tampering_is_refused(memory_bucket):
    d = f"{memory_bucket}/store"
    OfflineStore.create_or_open(d, _spec(), _prompts()).fill(_generate, 3, progress=_silent)
    path = storage.join(d, "targets.npy")
    targets = storage.load_npy(path)
    targets[0] += 1
    storage.save_npy(path, targets)
    with pytest.raises(StoreIntegrityError, match=r"targets\.npy: the targets array's sha256"):
        OfflineStore.open(d)
    storage.write_atomic(path, storage.read_bytes(path)[:-7])
    with pytest.raises(ValueError, match=r"targets\.npy: not a readable \.npy array"):
        OfflineStore.open(d, verify_checksums=False)


def test_remote_store_over_the_memory_limit_is_refused(memory_bucket, monkeypatch):
    monkeypatch.setattr(offline_store, "REMOTE_MAX_BYTES", 100)
    with pytest.raises(ValueError, match="over the .* limit of remote stores: use a local"):
        OfflineStore.create_or_open(f"{memory_bucket}/store", _spec(), _prompts())
    assert not storage.exists(f"{memory_bucket}/store")

"""Tests of thack_jax.core.storage, each on a local folder and on a gs:// bucket of the local
GCS server (tests/_gcs.py): reads and writes, JSON and .npy, folders, moves, digests, URI
path arithmetic, and that a gs:// path never becomes a local folder named `gs:`."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from thack_jax.core import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path, monkeypatch):
    """A fresh, empty folder: local (tmp_path) or on the emulator (gs://<bucket>/w). The
    cwd is tmp_path, so that a URI mistaken for a local path shows up as ./gs:."""
    monkeypatch.chdir(tmp_path)
    if request.param == "local":
        yield str(tmp_path / "w")
    else:
        yield request.getfixturevalue("gcs_bucket") + "/w"
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written to local disk"


def test_write_atomic_and_reads(root):
    path = storage.join(root, "sub", "a.txt")
    storage.write_atomic(path, "first")
    assert storage.read_text(path) == "first"
    storage.write_atomic(path, b"\x00second\xff")  # replaces the whole content
    assert storage.read_bytes(path) == b"\x00second\xff"
    with storage.open_file(path, "rb") as f:
        assert f.read(3) == b"\x00se"
    with storage.open_file(storage.join(root, "b.txt"), "w") as f:
        f.write("text mode")
    assert storage.read_text(storage.join(root, "b.txt")) == "text mode"
    # The atomic write leaves no temporary file beside the target.
    assert storage.listdir(storage.join(root, "sub")) == ["a.txt"]


def test_append_is_refused_on_remote_storage(gcs_bucket):
    with pytest.raises(ValueError, match=r"gs://.*/m\.jsonl: mode 'a' is not supported"):
        storage.open_file(gcs_bucket + "/m.jsonl", "a")


def test_json_round_trip_and_damaged_json_names_the_file(root):
    path = storage.join(root, "state.json")
    value = {"b": [1, 2.5, None], "a": {"x": "y"}}
    storage.write_json(path, value)
    assert storage.read_json(path) == value
    assert storage.read_text(path) == json.dumps(value, indent=2, sort_keys=True)
    storage.write_atomic(path, '{"a": 1')  # cut short
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON .*damaged"):
        storage.read_json(path)


def test_npy_round_trip_refuses_pickles_and_names_a_damaged_file(root):
    path = storage.join(root, "values.npy")
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    storage.save_npy(path, array)
    loaded = storage.load_npy(path)
    assert loaded.dtype == np.float32 and loaded.shape == (3, 4)
    np.testing.assert_array_equal(loaded, array)
    with pytest.raises(ValueError, match="pickle"):
        storage.save_npy(storage.join(root, "obj.npy"), np.array([{"a": 1}], dtype=object))
    storage.write_atomic(path, storage.read_bytes(path)[:20])
    with pytest.raises(ValueError, match=rf"{path}: not a readable .npy array"):
        storage.load_npy(path)


def test_folders_listdir_exists_isdir_remove_rmtree(root):
    storage.makedirs(root)  # a no-op on GCS, a folder locally: both fine to write under
    for name in ("a/1.txt", "a/b/2.txt", "c.txt"):
        storage.write_atomic(storage.join(root, *name.split("/")), name)
    assert storage.listdir(root) == ["a", "c.txt"]
    assert storage.listdir(storage.join(root, "a")) == ["1.txt", "b"]
    assert storage.listdir(storage.join(root, "absent")) == []
    assert storage.isdir(storage.join(root, "a")) and storage.isdir(storage.join(root, "a/b"))
    assert not storage.isdir(storage.join(root, "c.txt"))
    assert storage.exists(storage.join(root, "c.txt")) and storage.exists(root)
    assert not storage.exists(storage.join(root, "absent.txt"))
    storage.remove(storage.join(root, "c.txt"))
    storage.remove(storage.join(root, "c.txt"))  # missing is fine
    assert not storage.exists(storage.join(root, "c.txt"))
    storage.rmtree(storage.join(root, "a"))
    storage.rmtree(storage.join(root, "a"))  # missing is fine
    assert not storage.exists(storage.join(root, "a"))
    assert storage.listdir(root) == []


def test_move_a_file_and_a_tree(root):
    storage.write_atomic(storage.join(root, "t", "x.txt"), "x")
    storage.write_atomic(storage.join(root, "t", "d", "y.txt"), "y")
    storage.move(storage.join(root, "t"), storage.join(root, "moved", "t.1"))
    assert not storage.exists(storage.join(root, "t"))
    assert storage.read_text(storage.join(root, "moved", "t.1", "d", "y.txt")) == "y"
    storage.move(storage.join(root, "moved", "t.1", "x.txt"), storage.join(root, "x2.txt"))
    assert storage.read_text(storage.join(root, "x2.txt")) == "x"
    assert storage.listdir(storage.join(root, "moved", "t.1")) == ["d"]


def test_move_between_local_and_remote_is_refused(tmp_path):
    with pytest.raises(ValueError, match="both be local or both remote"):
        storage.move(str(tmp_path / "a"), "gs://bucket/a")


def _tree(folder):
    storage.write_atomic(storage.join(folder, "model.bin"), bytes(range(256)) * 1000)
    storage.write_atomic(storage.join(folder, "sub", "config.json"), '{"d": 32}')


def test_digests_are_equal_for_the_same_bytes_local_and_remote(tmp_path, gcs_bucket):
    local, remote = str(tmp_path / "m"), gcs_bucket + "/runs/m"
    _tree(local)
    _tree(remote)
    name = "model.bin"
    assert storage.file_digest(os.path.join(local, name)) == storage.file_digest(
        storage.join(remote, name)
    )
    # Small chunks: the same digest as one read.
    assert storage.file_digest(storage.join(remote, name), chunk_bytes=1000) == (
        storage.file_digest(os.path.join(local, name))
    )
    assert storage.tree_digest(local) == storage.tree_digest(remote)
    storage.write_atomic(storage.join(remote, "sub", "config.json"), '{"d": 64}')
    assert storage.tree_digest(local) != storage.tree_digest(remote)


def test_join_dirname_basename_of_uris():
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/gs/x")
    assert storage.join("gs://b", "run", "metrics.jsonl") == "gs://b/run/metrics.jsonl"
    assert storage.join("gs://b/run/", "x") == "gs://b/run/x"
    assert storage.join("/tmp/w", "x") == os.path.join("/tmp/w", "x")
    with pytest.raises(ValueError, match="part '/x' is absolute"):
        storage.join("gs://b/run", "/x")
    assert storage.dirname("gs://b/run/checkpoints") == "gs://b/run"
    assert storage.dirname("gs://b/run") == "gs://b"
    assert storage.dirname("gs://b") == "gs://b"  # never 'gs:'
    assert storage.dirname("/tmp/w/x") == "/tmp/w"
    assert storage.basename("gs://b/run/checkpoints/") == "checkpoints"
    assert storage.basename("/tmp/w/x.json") == "x.json"


def test_makedirs_on_gcs_creates_no_bucket(gcs_server):
    missing = "thack-no-such-bucket"
    storage.makedirs(f"gs://{missing}/run")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"{gcs_server.url}/storage/v1/b/{missing}", timeout=10)


def test_listings_show_objects_written_by_another_client(gcs_server, gcs_bucket):
    """A listing is never served from gcsfs's cache: objects that tensorstore or another
    process wrote (here: a plain HTTP upload) show up at the next call."""
    folder = gcs_bucket + "/ckpt"
    storage.write_atomic(folder + "/1/done", "1")
    assert storage.listdir(folder) == ["1"]
    bucket = gcs_bucket.removeprefix("gs://")
    request = urllib.request.Request(
        f"{gcs_server.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name=ckpt/2/done",
        data=b"2",
        headers={"Content-Type": "application/octet-stream"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()
    assert storage.listdir(folder) == ["1", "2"]
    assert storage.isdir(folder + "/2") and storage.exists(folder + "/2/done")


def test_subprocesses_inherit_the_emulator_environment(gcs_bucket):
    path = gcs_bucket + "/from_parent.txt"
    storage.write_atomic(path, "written by the test process")
    code = (
        "from thack_jax.core import storage; import sys; "
        f"print(storage.read_text({path!r})); storage.write_atomic({path!r} + '.child', 'ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "written by the test process"
    assert storage.read_text(path + ".child") == "ok"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    path = str(tmp_path / "manifest.json")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f"manifest.json.tmp.{int(dead.stdout)}"  # that process is gone
    stale.write_text("half")
    alive = tmp_path / f"manifest.json.tmp.{os.getpid()}.x"  # not a temporary name
    alive.write_text("other")
    other = tmp_path / "other.json.tmp.1"  # another file's: left alone
    other.write_text("x")
    storage.write_json(path, {"a": 1})
    assert storage.read_json(path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", alive.name, other.name]
    )
    assert storage.is_temporary(stale.name) and not storage.is_temporary("manifest.json")

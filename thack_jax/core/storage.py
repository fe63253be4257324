"""Workdir I/O for local paths and gs:// (and other etils.epath schemes), in one place.

Every artifact of a workdir (experiment.json, COMPLETE markers, metrics, per-prompt values,
offline stores, guard files, reports, plots, exported models) is read and written through
these functions, so that `--workdir=gs://bucket/run` lands in the bucket instead of in a
local folder named `gs:`. Paths stay strings throughout the package; a local path keeps
`os.path` semantics, a URI (`gs://...`) goes through `etils.epath`.

Remote paths use epath's fsspec backend (gcsfs for gs://), never TensorFlow's gfile: TF
may only be imported by `thack_jax/data/`, and gcsfs honours `STORAGE_EMULATOR_HOST`,
which is how the tests point the package at a local GCS server (tests/_gcs.py). gcsfs's
listings cache is turned off: objects are also written by other processes (trainer and
watcher) and by tensorstore (orbax's array data), which a cached listing would not show.

Folders do not exist on GCS (an object name may contain '/'): `makedirs` is a no-op there
and `isdir` is True only while some object lies under the prefix.

Atomicity: `write_atomic` writes local files to a temporary name in the same folder,
fsyncs it, renames it over the target and fsyncs the folder, so a reader (or a rerun after
SIGKILL) sees the old file or the new one, never a prefix. A GCS object upload is atomic
by itself (an object appears whole when its upload finishes), so remote writes are one
upload.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shutil

# epath picks TF's gfile for gs:// when TF is installed unless told otherwise (see above).
os.environ.setdefault("EPATH_USE_TF", "false")


def _configure_fsspec() -> None:
    """Every gcsfs instance created from now on lists GCS afresh (see the module doc)."""
    try:
        from fsspec.config import conf
    except ImportError:  # local paths need no fsspec
        return
    conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_configure_fsspec()

_URI_MARK = "://"


def is_remote(path: str) -> bool:
    """True for a URI (gs://bucket/x, s3://...), False for a local path."""
    return _URI_MARK in str(path)


# The remote schemes a workdir may use: the checkpoints go through TensorStore and the
# other files through gcsfs, and both are installed for gs:// only.
WORKDIR_SCHEMES = ("gs",)


def check_scheme(path: str) -> None:
    """Refuses a URI whose scheme the workdir cannot use (s3://, gcs://, a typo), or a
    gs:// URI without a bucket, before anything is written."""
    if not is_remote(path):
        return
    scheme, rest = str(path).split(_URI_MARK, 1)
    if scheme not in WORKDIR_SCHEMES:
        raise ValueError(
            f"workdir {path!r}: scheme {scheme!r} is not supported (a local path, or "
            f"{', '.join(s + _URI_MARK for s in WORKDIR_SCHEMES)})"
        )
    if not rest.split("/", 1)[0]:
        raise ValueError(f"workdir {path!r} names no bucket (gs://BUCKET/path)")


def _epath(path: str):
    from etils import epath  # lazy: the local path needs none of it

    return epath.Path(str(path))


def join(*parts: str) -> str:
    """os.path.join for local paths; '/'-joining for URIs (os.path would break them).
    An absolute later part would drop the URI's scheme and bucket: a ValueError."""
    first, rest = str(parts[0]), [str(p) for p in parts[1:]]
    if not is_remote(first):
        return os.path.join(first, *rest)
    for part in rest:
        if part.startswith("/") or is_remote(part):
            raise ValueError(f"storage.join({first!r}, ...): part {part!r} is absolute")
    return posixpath.join(first, *rest)


def dirname(path: str) -> str:
    """os.path.dirname; for a URI the bucket root is its own parent ('gs://b' -> 'gs://b',
    never 'gs:')."""
    if not is_remote(path):
        return os.path.dirname(path)
    scheme, rest = str(path).split(_URI_MARK, 1)
    head = posixpath.dirname(rest)
    return f"{scheme}{_URI_MARK}{head or rest.rstrip('/')}"


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    """Creates `path` and its parents. A no-op for a URI: GCS folders are name prefixes,
    and gcsfs would create a missing *bucket* (a typo in a workdir must not do that)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Sorted entry names of a folder ([] when it does not exist)."""
    if not isdir(path):
        return []
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def remove(path: str) -> None:
    """Deletes a file (missing is fine)."""
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.unlink()
    elif os.path.exists(path):
        os.remove(path)


def rmtree(path: str) -> None:
    """Deletes a folder and everything under it (missing is fine)."""
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def move(src: str, dst: str) -> None:
    """Moves a file or a folder tree to `dst` (whose parent is created). Remote: within
    one scheme, object by object (GCS has no folder rename), so a crash in the middle
    leaves part of the tree at each name."""
    if is_remote(src) != is_remote(dst):
        raise ValueError(f"storage.move: {src} and {dst} must both be local or both remote")
    if not is_remote(src):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.move(src, dst)
        return
    from etils.epath import backend

    fs = backend.fsspec_backend.fs(src)  # the filesystem epath uses for this URI
    # Server-side copies, then the deletes (gcsfs's mv tries a per-object moveTo first,
    # which GCS emulators reject with a logged error before it falls back to the same).
    fs.copy(str(src), str(dst), recursive=True)
    fs.rm(str(src), recursive=True)


def open_file(path: str, mode: str = "r"):
    """A file object (text or binary by `mode`). Remote: 'r', 'rb', 'w', 'wb' only (a GCS
    object cannot be appended to: use write_atomic with the whole content)."""
    if is_remote(path):
        if mode not in ("r", "rb", "w", "wb"):
            raise ValueError(f"{path}: mode {mode!r} is not supported on remote storage")
        return _epath(path).open(mode)
    return open(path, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str):
    """The parsed JSON of `path`; ValueError naming the file when it is not valid JSON."""
    data = read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from e


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes `data` to `path` so that readers see the old content or all of the new."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if is_remote(path):
        with _epath(path).open("wb") as f:
            f.write(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)
    _remove_stale_temporaries(path)


TEMPORARY_SUFFIX = re.compile(r"\.tmp\.(\d+)$")


def is_temporary(name: str) -> bool:
    """True for the temporary name of a write_atomic (`<name>.tmp.<pid>`)."""
    return TEMPORARY_SUFFIX.search(name) is not None


def _remove_stale_temporaries(path: str) -> None:
    """Deletes `<path>.tmp.<pid>` files of processes that no longer run: a writer killed
    between its write and its rename leaves one, which its rerun (another pid) would never
    overwrite."""
    folder, base = os.path.split(os.path.abspath(path))
    for name in os.listdir(folder):
        match = TEMPORARY_SUFFIX.search(name)
        if not match or name[: match.start()] != base:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass


def _fsync_dir(folder: str) -> None:
    """Makes a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, value) -> None:
    """Atomically writes `value` as indented, key-sorted JSON."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def save_npy(path: str, array) -> None:
    """Atomically writes one array as .npy (never pickled)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_atomic(path, buf.getvalue())


def load_npy(path: str):
    """One .npy array (pickles refused); ValueError naming the file when it is damaged."""
    import numpy as np

    data = read_bytes(path)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e}); the file is damaged") from e


def file_digest(path: str, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open_file(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def tree_digest(path: str) -> str:
    """sha256 over the names and bytes of every file under a folder (or of one file), so a
    stage fingerprint changes when a file it consumed was changed or replaced."""
    if not isdir(path):
        return file_digest(path)
    h = hashlib.sha256()
    for name in listdir(path):
        child = join(path, name)
        h.update(f"{name}\0{tree_digest(child)}\n".encode())
    return h.hexdigest()

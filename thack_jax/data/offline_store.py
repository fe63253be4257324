"""The offline dataset: completions generated once by a named model, stored on disk (numpy only).

Directory layout (the same for a local and a remote directory once complete):
  manifest.json  spec, array shapes/dtypes, fill progress, sha256 checksums when complete
  inputs.npy     int32 [N * c, Lx]: prompt i repeated c times (rows i*c .. i*c + c - 1)
  targets.npy    int32 [N * c, Ly]: completion j of prompt i in row i*c + j (prompt-major)

Local directory: the arrays are .npy files opened with `np.lib.format.open_memmap` (no
pickle). The manifest is replaced atomically (`storage.write_atomic`) after each chunk is
flushed, so a killed generation resumes at the first unfinished chunk.

Remote directory (gs://..., `storage.is_remote`): an object can be neither memory-mapped
nor written in part, so the fill keeps the arrays in host memory and writes
  * at creation: inputs.npy (whole) and the manifest;
  * per finished chunk k: the object chunks/targets.<k:06d>.npy (int32 [rows of chunk k,
    Ly]), then the manifest with chunks_done = k + 1 (so a rerun resumes at the first
    unfinished chunk, reading chunks 0..k back);
  * at the end: targets.npy (whole), the manifest (complete, checksums), and then it deletes
    the chunk objects (leftovers of a kill during that are deleted by the next
    `create_or_open`).
An opened remote store holds both arrays in memory, 4 * N * c * (Lx + Ly) bytes (0.92 GB
for 200,000 x 1 x (1024 + 128)); a remote store above REMOTE_MAX_BYTES (8 GiB) is refused:
use a local directory. Remote objects have one writer (`writer=True`, process 0 of a
multi-process run); the other processes compute the same chunks and keep them in memory.

Resumed arrays equal an uninterrupted fill when `generate_fn` is a deterministic function
of (prompts, chunk_index), e.g. with its random key folded from the chunk index.

Integrity: `open` and `create_or_open` recompute the sha256 checksums of a complete store
by default (the sft and regimes paths open stores this way) and refuse it
(`StoreIntegrityError`, naming the file and the array) when its rows or the manifest's
checksums changed; a damaged manifest or .npy file raises ValueError naming the file.
Cost of the verification (one read of both arrays and sha256), measured on a 2-core box
shared with other jobs (load average 3.7-4.4), files in the page cache: the default
experiment's store (256 x 1 x (12 + 12) int32) 0.3 ms; 200,000 x 1 x (1024 + 128) int32
(0.92 GB) 1.1-1.2 s, against < 6 ms to open it unverified. sha256 is ~0.7 s of that; the
rest is reading; a remote store pays the hashing on top of its download.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np

from thack_jax.core import storage
from thack_jax.data.offline_format import (
    ARRAYS,
    CHUNKS_DIR,
    FORMAT_VERSION,
    MANIFEST,
    OfflineSpec,
    StoreIntegrityError,
    StoreMismatchError,
    array_checksum,
    check_array,
    check_manifest,
    prompts_checksum,
    read_remote,
    spec_differences,
)
from thack_jax.data.offline_iterator import OfflineIterator as OfflineIterator  # re-export

REMOTE_MAX_BYTES = 8 << 30


def _check_remote_size(spec: OfflineSpec) -> None:
    size = 4 * spec.num_examples * (spec.max_input_length + spec.max_target_length)
    if size > REMOTE_MAX_BYTES:
        raise ValueError(
            f"a remote offline store of {spec.num_examples} rows x ({spec.max_input_length} + "
            f"{spec.max_target_length}) int32 takes {size / 2**30:.1f} GiB of host memory, "
            f"over the {REMOTE_MAX_BYTES / 2**30:g} GiB limit of remote stores: use a local "
            "directory"
        )


class OfflineStore:
    """A directory holding one offline dataset; create with `create_or_open` or `open`.

    inputs [N*c, Lx] and targets [N*c, Ly] are int32 memmaps (local) or in-memory arrays
    (remote); read-only once complete. `writer` (remote stores only): whether this process
    writes the store's objects (process 0 of a multi-process run); local stores are written
    by every process that fills them.
    """

    def __init__(self, directory: str, manifest: dict, *, writer: bool = True, arrays=None):
        self.directory = directory
        self._manifest = check_manifest(self._path(MANIFEST), manifest)
        self.spec = OfflineSpec.from_dict(manifest["spec"])
        self.remote, self.writer = storage.is_remote(directory), bool(writer)
        if self.remote:
            _check_remote_size(self.spec)
            self.inputs, self.targets = arrays if arrays is not None else self._load_remote()
            if self.is_complete:
                self.inputs.flags.writeable = self.targets.flags.writeable = False
        else:
            mode = "r" if manifest["complete"] else "r+"
            self.inputs = self._open_array("inputs", mode)
            self.targets = self._open_array("targets", mode)

    def _path(self, *names: str) -> str:
        return storage.join(self.directory, *names)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        directory: str,
        spec: OfflineSpec,
        prompts: np.ndarray | None = None,
        *,
        verify_checksums: bool = True,
        writer: bool = True,
    ) -> OfflineStore:
        """Opens the store in `directory` if it was made for `spec`, else creates it.

        Args:
          spec: the requested dataset; an existing manifest must match it field by field.
          prompts: int32 [num_prompts, max_input_length]; required to create, checked against
            `spec.prompts_checksum` whenever given.
          verify_checksums: recompute a complete store's checksums (see the module doc).
          writer: see the class doc (remote stores only).

        Raises:
          StoreMismatchError: the existing store differs (names each field, stored vs
            requested). An existing store is never overwritten.
          StoreIntegrityError: a complete store's arrays differ from its checksums.
        """
        if prompts is not None:
            prompts = cls._check_prompts(spec, prompts)
        if storage.exists(storage.join(directory, MANIFEST)):
            store = cls.open(directory, verify_checksums=False, writer=writer)
            diffs = spec_differences(store.spec.to_dict(), spec.to_dict())
            if diffs:
                raise StoreMismatchError(
                    f"offline store {directory} was made for a different spec: " + "; ".join(diffs)
                )
            if store.is_complete and verify_checksums:
                store.verify()
            if store.is_complete and store.remote and store.writer:
                store._remove_chunks()  # leftovers of a fill killed while deleting them
            return store
        if prompts is None:
            raise ValueError(f"creating the offline store {directory} needs prompts")
        return cls._create(directory, spec, prompts, writer)

    @classmethod
    def _create(cls, directory: str, spec: OfflineSpec, prompts: np.ndarray, writer: bool):
        remote = storage.is_remote(directory)
        if remote:
            _check_remote_size(spec)
        if writer or not remote:
            storage.makedirs(directory)
            leftovers = {f"{a}.npy" for a in ARRAYS}
            foreign = [
                f
                for f in storage.listdir(directory)
                if f not in leftovers and not f.startswith(f"{MANIFEST}.tmp")
            ]
            if foreign:
                # Only leftovers of an interrupted creation (no manifest yet) may be replaced.
                raise FileExistsError(
                    f"{directory} has no {MANIFEST} but holds other files {sorted(foreign)}; "
                    "use an empty directory"
                )
        n, c = spec.num_examples, spec.completions_per_prompt
        shapes = {"inputs": (n, spec.max_input_length), "targets": (n, spec.max_target_length)}
        arrays = None
        if remote:
            arrays = (np.repeat(prompts, c, axis=0), np.zeros(shapes["targets"], np.int32))
            if writer:
                storage.save_npy(storage.join(directory, "inputs.npy"), arrays[0])
        else:
            for name, shape in shapes.items():
                arr = np.lib.format.open_memmap(
                    storage.join(directory, f"{name}.npy"), mode="w+", dtype=np.int32, shape=shape
                )
                if name == "inputs":
                    arr[:] = np.repeat(prompts, c, axis=0)
                arr.flush()
                del arr
        manifest = {
            "format_version": FORMAT_VERSION,
            "spec": spec.to_dict(),
            "arrays": {k: {"shape": list(v), "dtype": "int32"} for k, v in shapes.items()},
            "chunk_size": None,
            "num_chunks": None,
            "chunks_done": 0,
            "complete": False,
            "checksums": None,
        }
        store = cls(directory, manifest, writer=writer, arrays=arrays)
        store._write_manifest()
        return store

    @classmethod
    def open(
        cls, directory: str, verify_checksums: bool = True, *, writer: bool = True
    ) -> OfflineStore:
        """Opens an existing store, checking its manifest and array shapes and, by default,
        a complete store's checksums (StoreIntegrityError when they differ)."""
        path = storage.join(directory, MANIFEST)
        if not storage.exists(path):
            raise FileNotFoundError(f"no offline store in {directory} ({MANIFEST} missing)")
        store = cls(directory, storage.read_json(path), writer=writer)
        if verify_checksums and store.is_complete:
            store.verify()
        return store

    def _open_array(self, name: str, mode: str) -> np.memmap:
        path = self._path(f"{name}.npy")
        if not storage.exists(path):
            raise FileNotFoundError(f"offline store array missing: {path}")
        try:
            arr = np.lib.format.open_memmap(path, mode=mode)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e}); the file is damaged") from e
        return check_array(path, arr, self._manifest["arrays"][name])

    def _load_remote(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) read into memory; an incomplete store's targets are zeros but
        for the finished chunks, read from their objects."""
        arrays = self._manifest["arrays"]
        inputs = read_remote(self._path("inputs.npy"), arrays["inputs"])
        if self.is_complete:
            return inputs, read_remote(self._path("targets.npy"), arrays["targets"])
        targets = np.zeros(arrays["targets"]["shape"], np.int32)
        for k in range(self.chunks_done):
            lo, hi = self._chunk_rows(k, self._manifest["chunk_size"])
            meta = {"shape": [hi - lo, targets.shape[1]], "dtype": "int32"}
            targets[lo:hi] = read_remote(self._chunk_path(k), meta)
        return inputs, targets

    @staticmethod
    def _check_prompts(spec: OfflineSpec, prompts: np.ndarray) -> np.ndarray:
        prompts = np.asarray(prompts)
        expected = (spec.num_prompts, spec.max_input_length)
        if prompts.shape != expected or not np.issubdtype(prompts.dtype, np.integer):
            raise ValueError(
                f"prompts must be integer {expected}, got {prompts.dtype} {prompts.shape}"
            )
        prompts = prompts.astype(np.int32)
        got = prompts_checksum(prompts)
        if got != spec.prompts_checksum:
            raise StoreMismatchError(
                f"prompts_checksum: spec {spec.prompts_checksum!r} vs given prompts {got!r}"
            )
        return prompts

    # -- state ----------------------------------------------------------------------------
    @property
    def is_complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def chunks_done(self) -> int:
        return int(self._manifest["chunks_done"])

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))  # a copy

    @property
    def prompts(self) -> np.ndarray:
        """The unique prompts [num_prompts, Lx] (every c-th row of `inputs`)."""
        return np.asarray(self.inputs[:: self.spec.completions_per_prompt])

    def __len__(self) -> int:
        return self.spec.num_examples

    def verify(self) -> None:
        """Recomputes the sha256 checksums of a complete store; StoreIntegrityError naming
        the file and the array when one differs from the manifest."""
        if not self.is_complete:
            raise ValueError(f"offline store {self.directory} is not complete")
        for name in ARRAYS:
            got = array_checksum(getattr(self, name))
            want = self._manifest["checksums"][name]
            if got != want:
                raise StoreIntegrityError(
                    f"{self._path(f'{name}.npy')}: the {name} array's sha256 {got} differs "
                    f"from {want} in {self._path(MANIFEST)}: the array or the manifest "
                    f"changed after generation; delete {self.directory} to regenerate it"
                )

    # -- writing --------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        if self.remote and not self.writer:
            return
        text = json.dumps(self._manifest, indent=1, sort_keys=True)
        storage.write_atomic(self._path(MANIFEST), text)

    def _chunk_path(self, k: int) -> str:
        return self._path(CHUNKS_DIR, f"targets.{k:06d}.npy")

    def _chunk_rows(self, k: int, chunk_size: int) -> tuple[int, int]:
        """Rows [lo, hi) of inputs/targets that chunk k fills."""
        c, n = self.spec.completions_per_prompt, self.spec.num_prompts
        return k * chunk_size * c, min((k + 1) * chunk_size, n) * c

    def _remove_chunks(self) -> None:
        if storage.exists(self._path(CHUNKS_DIR)):
            storage.rmtree(self._path(CHUNKS_DIR))

    def fill(
        self,
        generate_fn: Callable[[np.ndarray, int], np.ndarray],
        chunk_size: int,
        progress: Callable[[dict], None] | None = None,
    ) -> None:
        """Generates the missing completions chunk by chunk (resumable).

        Args:
          generate_fn: (prompts int32 [b, Lx], chunk_index) -> completions int32
            [b * c, Ly], prompt-major. b = chunk_size except for the last chunk.
          chunk_size: prompts per chunk; must equal the chunk size of an earlier partial fill.
          progress: called after each chunk with {'chunk', 'num_chunks', 'chunks_per_s',
            'eta_s'}; default prints a line at most every 10 s and at the end.
        """
        if self.is_complete:
            return
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        stored = self._manifest["chunk_size"]
        if stored is not None and self.chunks_done > 0 and stored != chunk_size:
            raise StoreMismatchError(
                f"chunk_size: stored {stored} vs requested {chunk_size} "
                f"({self.chunks_done} chunks of {self.directory} already generated)"
            )
        spec, c = self.spec, self.spec.completions_per_prompt
        num_chunks = -(-spec.num_prompts // chunk_size)
        self._manifest.update(chunk_size=chunk_size, num_chunks=num_chunks)
        progress = progress or _PrintProgress()
        start_time, start_chunk = time.monotonic(), self.chunks_done
        for k in range(self.chunks_done, num_chunks):
            lo, hi = self._chunk_rows(k, chunk_size)
            out = np.asarray(generate_fn(np.asarray(self.inputs[lo:hi:c]), k))
            expected = (hi - lo, spec.max_target_length)
            if out.shape != expected or not np.issubdtype(out.dtype, np.integer):
                raise ValueError(
                    f"generate_fn returned {out.dtype} {out.shape} for chunk {k}, "
                    f"expected integer {expected} ([prompts * completions_per_prompt, Ly])"
                )
            self.targets[lo:hi] = out.astype(np.int32)
            if not self.remote:
                self.targets.flush()
            elif self.writer:
                storage.save_npy(self._chunk_path(k), self.targets[lo:hi])
            self._manifest["chunks_done"] = k + 1
            self._write_manifest()
            rate = (k + 1 - start_chunk) / max(time.monotonic() - start_time, 1e-9)
            progress(
                {
                    "chunk": k + 1,
                    "num_chunks": num_chunks,
                    "chunks_per_s": rate,
                    "eta_s": (num_chunks - k - 1) / rate,
                }
            )
        self._finish()

    def _finish(self) -> None:
        """Records the checksums and completion (remote: after writing targets.npy)."""
        self._manifest["checksums"] = {n: array_checksum(getattr(self, n)) for n in ARRAYS}
        if self.remote and self.writer:
            storage.save_npy(self._path("targets.npy"), self.targets)
        self._manifest["complete"] = True
        self._write_manifest()
        if self.remote:
            if self.writer:
                self._remove_chunks()
            self.inputs.flags.writeable = self.targets.flags.writeable = False
            return
        del self.inputs, self.targets  # reopen read-only
        self.inputs = self._open_array("inputs", "r")
        self.targets = self._open_array("targets", "r")


def progress_callback(progress):
    """The `OfflineStore.fill` progress argument of a `progress` option: True -> None (the
    store's default line with chunks/s and ETA every 10 s), False / None -> silent, or the
    callable itself."""
    if progress is True:
        return None
    if progress is False or progress is None:
        return lambda _: None
    return progress


class _PrintProgress:
    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last = every_s, time.monotonic()

    def __call__(self, p: dict) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or p["chunk"] == p["num_chunks"]:
            self.last = now
            print(
                f"offline store: chunk {p['chunk']}/{p['num_chunks']} "
                f"({p['chunks_per_s']:.2f} chunks/s, ETA {p['eta_s']:.0f} s)",
                flush=True,
            )

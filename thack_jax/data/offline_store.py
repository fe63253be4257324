"""The offline dataset: completions generated once by a named model, stored on disk (numpy only).

Directory layout:
  manifest.json  spec, array shapes/dtypes, fill progress, sha256 checksums when complete
  inputs.npy     int32 [N * c, Lx]: prompt i repeated c times (rows i*c .. i*c + c - 1)
  targets.npy    int32 [N * c, Ly]: completion j of prompt i in row i*c + j (prompt-major)

Arrays are .npy files opened with `np.lib.format.open_memmap` (no pickle). The manifest is
replaced atomically (temporary file + os.replace) after each chunk is flushed, so a killed
generation resumes at the first unfinished chunk. Resumed arrays equal an uninterrupted fill
when `generate_fn` is a deterministic function of (prompts, chunk_index), e.g. with its
random key folded from the chunk index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator

import numpy as np

from thack_jax.core import checks

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_ARRAYS = ("inputs", "targets")


class StoreMismatchError(ValueError):
    """An existing store was made for a different spec (or chunking) than requested."""


@dataclasses.dataclass(frozen=True)
class OfflineSpec:
    """What an offline dataset is: its prompts, sizes, vocabulary and generating model."""

    num_prompts: int
    completions_per_prompt: int
    max_input_length: int
    max_target_length: int
    vocab_fingerprint: str
    generating_model: str  # e.g. 'teacher-<params checksum>'
    seed: int
    prompts_checksum: str

    def __post_init__(self):
        sizes = ("num_prompts", "completions_per_prompt", "max_input_length", "max_target_length")
        for f in sizes:
            checks.integer(self, f, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OfflineSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(
                f"OfflineSpec keys differ: missing {sorted(names - set(d))}, "
                f"unknown {sorted(set(d) - names)}"
            )
        return cls(**d)

    @property
    def num_examples(self) -> int:
        return self.num_prompts * self.completions_per_prompt


def array_checksum(array: np.ndarray, block_rows: int = 65536) -> str:
    """sha256 of shape, dtype and the little-endian C-order bytes (read in row blocks)."""
    h = hashlib.sha256(f"{array.shape}|{np.dtype(array.dtype).str}".encode())
    for start in range(0, max(array.shape[0], 1), block_rows):
        h.update(np.ascontiguousarray(array[start : start + block_rows]).tobytes())
    return h.hexdigest()


def prompts_checksum(prompts: np.ndarray) -> str:
    """Checksum of a prompt array [N, Lx] (as int32) for `OfflineSpec.prompts_checksum`."""
    return array_checksum(np.asarray(prompts, dtype=np.int32))


def _write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _spec_differences(stored: dict, requested: dict) -> list[str]:
    keys = sorted(set(stored) | set(requested))
    return [
        f"{k}: stored {stored.get(k)!r} vs requested {requested.get(k)!r}"
        for k in keys
        if stored.get(k) != requested.get(k)
    ]


class OfflineStore:
    """A directory holding one offline dataset; create with `create_or_open` or `open`."""

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self._manifest = manifest
        self.spec = OfflineSpec.from_dict(manifest["spec"])
        mode = "r" if manifest["complete"] else "r+"
        self.inputs = self._open_array("inputs", mode)
        self.targets = self._open_array("targets", mode)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls, directory: str, spec: OfflineSpec, prompts: np.ndarray | None = None
    ) -> OfflineStore:
        """Opens the store in `directory` if it was made for `spec`, else creates it.

        Args:
          spec: the requested dataset; an existing manifest must match it field by field.
          prompts: int32 [num_prompts, max_input_length]; required to create, checked against
            `spec.prompts_checksum` whenever given.

        Raises:
          StoreMismatchError: the existing store differs (names each field, stored vs
            requested). An existing store is never overwritten.
        """
        if prompts is not None:
            prompts = cls._check_prompts(spec, prompts)
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path):
            store = cls.open(directory, verify_checksums=False)
            diffs = _spec_differences(store.spec.to_dict(), spec.to_dict())
            if diffs:
                raise StoreMismatchError(
                    f"offline store {directory} was made for a different spec: " + "; ".join(diffs)
                )
            return store
        if prompts is None:
            raise ValueError(f"creating the offline store {directory} needs prompts")
        os.makedirs(directory, exist_ok=True)
        foreign = set(os.listdir(directory)) - {f"{a}.npy" for a in _ARRAYS} - {f"{MANIFEST}.tmp"}
        if foreign:
            # Only leftovers of an interrupted creation (no manifest yet) may be replaced.
            raise FileExistsError(
                f"{directory} has no {MANIFEST} but holds other files {sorted(foreign)}; "
                "use an empty directory"
            )
        n, c = spec.num_examples, spec.completions_per_prompt
        shapes = {"inputs": (n, spec.max_input_length), "targets": (n, spec.max_target_length)}
        for name, shape in shapes.items():
            arr = np.lib.format.open_memmap(
                os.path.join(directory, f"{name}.npy"), mode="w+", dtype=np.int32, shape=shape
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
        _write_json_atomic(path, manifest)
        return cls(directory, manifest)

    @classmethod
    def open(cls, directory: str, verify_checksums: bool = False) -> OfflineStore:
        """Opens an existing store, checking array shapes (and checksums if complete+asked)."""
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no offline store in {directory} ({MANIFEST} missing)")
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {manifest.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}"
            )
        store = cls(directory, manifest)
        if verify_checksums and store.is_complete:
            store.verify()
        return store

    def _open_array(self, name: str, mode: str) -> np.memmap:
        path = os.path.join(self.directory, f"{name}.npy")
        if not os.path.exists(path):
            raise FileNotFoundError(f"offline store array missing: {path}")
        arr = np.lib.format.open_memmap(path, mode=mode)
        meta = self._manifest["arrays"][name]
        if list(arr.shape) != meta["shape"] or arr.dtype != np.dtype(meta["dtype"]):
            raise ValueError(
                f"{path}: shape {arr.shape} dtype {arr.dtype}, manifest says "
                f"{tuple(meta['shape'])} {meta['dtype']}"
            )
        return arr

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
        """Recomputes the sha256 checksums of a complete store; raises ValueError on change."""
        if not self.is_complete:
            raise ValueError(f"offline store {self.directory} is not complete")
        for name in _ARRAYS:
            got = array_checksum(getattr(self, name))
            want = self._manifest["checksums"][name]
            if got != want:
                raise ValueError(
                    f"{self.directory}/{name}.npy checksum {got} differs from the manifest "
                    f"{want}: the file changed after generation"
                )

    # -- generation -----------------------------------------------------------------------
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
            lo, hi = k * chunk_size, min((k + 1) * chunk_size, spec.num_prompts)
            out = np.asarray(generate_fn(np.asarray(self.inputs[lo * c : hi * c : c]), k))
            expected = ((hi - lo) * c, spec.max_target_length)
            if out.shape != expected or not np.issubdtype(out.dtype, np.integer):
                raise ValueError(
                    f"generate_fn returned {out.dtype} {out.shape} for chunk {k}, "
                    f"expected integer {expected} ([prompts * completions_per_prompt, Ly])"
                )
            self.targets[lo * c : hi * c] = out.astype(np.int32)
            self.targets.flush()
            self._manifest["chunks_done"] = k + 1
            _write_json_atomic(os.path.join(self.directory, MANIFEST), self._manifest)
            rate = (k + 1 - start_chunk) / max(time.monotonic() - start_time, 1e-9)
            progress(
                {
                    "chunk": k + 1,
                    "num_chunks": num_chunks,
                    "chunks_per_s": rate,
                    "eta_s": (num_chunks - k - 1) / rate,
                }
            )
        self._manifest["checksums"] = {n: array_checksum(getattr(self, n)) for n in _ARRAYS}
        self._manifest["complete"] = True
        _write_json_atomic(os.path.join(self.directory, MANIFEST), self._manifest)
        del self.inputs, self.targets  # reopen read-only
        self.inputs = self._open_array("inputs", "r")
        self.targets = self._open_array("targets", "r")


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


class OfflineIterator:
    """Shuffled batches {'inputs' [B, Lx], 'targets' [B, Ly]} (int32 numpy) of a complete store.

    Epoch e visits the rows in the order `np.random.default_rng([seed, e]).permutation(M)`
    (M = N * c), in batches of `batch_size`; the last partial batch of an epoch is dropped
    so shapes stay static. After `num_epochs` epochs iteration stops (StopIteration);
    `num_epochs=None` repeats forever. `state_dict()` / `load_state_dict()` resume exactly.
    """

    def __init__(self, store: OfflineStore, batch_size: int, seed: int, num_epochs=None):
        if not store.is_complete:
            raise ValueError(f"offline store {store.directory} is not complete; fill it first")
        if batch_size <= 0 or batch_size > len(store):
            raise ValueError(
                f"batch_size must be in [1, {len(store)}] (store rows), got {batch_size}"
            )
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self.store, self.batch_size, self.seed = store, int(batch_size), int(seed)
        self.num_epochs = num_epochs
        self.batches_per_epoch = len(store) // self.batch_size
        self.epoch, self.index = 0, 0  # index: next batch within the epoch
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.store)), epoch
        return self._perm

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        b = self.batch_size
        rows = self._permutation(self.epoch)[self.index * b : (self.index + 1) * b]
        order = np.argsort(rows)  # read the memmap in increasing row order
        batch = {}
        for name in _ARRAYS:
            data = np.empty((b, getattr(self.store, name).shape[1]), np.int32)
            data[order] = getattr(self.store, name)[rows[order]]
            batch[name] = data
        self.index += 1
        return batch

    @property
    def exhausted(self) -> bool:
        return self.num_epochs is not None and (
            self.epoch >= self.num_epochs
            or (self.epoch == self.num_epochs - 1 and self.index >= self.batches_per_epoch)
        )

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(
                f"iterator state {state} out of range (batches_per_epoch {self.batches_per_epoch})"
            )
        self.epoch, self.index = epoch, index

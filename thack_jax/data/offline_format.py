"""The on-disk format of an offline store: its spec, manifest checks, checksums and errors.

`offline_store.py` (the `OfflineStore` that creates, fills and opens a store) describes the
directory layout; this module holds what reading it checks: the manifest's keys, format
version and sha256 fields (`check_manifest`), each array's shape and dtype against the
manifest (`check_array`, `read_remote` for a remote object), and the checksum of an array
(`array_checksum`, `prompts_checksum`). numpy only; never pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

from thack_jax.core import checks, storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ARRAYS = ("inputs", "targets")
CHUNKS_DIR = "chunks"  # remote stores only, during the fill
_MANIFEST_KEYS = (
    "spec",
    "arrays",
    "chunk_size",
    "num_chunks",
    "chunks_done",
    "complete",
    "checksums",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class StoreMismatchError(ValueError):
    """An existing store was made for a different spec (or chunking) than requested."""


class StoreIntegrityError(ValueError):
    """A complete store's arrays differ from its manifest's checksums (or it has none)."""


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
        h.update(np.ascontiguousarray(array[start : start + block_rows]).data)  # no copy
    return h.hexdigest()


def prompts_checksum(prompts: np.ndarray) -> str:
    """Checksum of a prompt array [N, Lx] (as int32) for `OfflineSpec.prompts_checksum`."""
    return array_checksum(np.asarray(prompts, dtype=np.int32))


def spec_differences(stored: dict, requested: dict) -> list[str]:
    """'<field>: stored <a> vs requested <b>' for each field of two spec dicts that differs."""
    keys = sorted(set(stored) | set(requested))
    return [
        f"{k}: stored {stored.get(k)!r} vs requested {requested.get(k)!r}"
        for k in keys
        if stored.get(k) != requested.get(k)
    ]


def check_manifest(path: str, manifest) -> dict:
    """The manifest read from `path`, or ValueError naming the file and what is wrong."""
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else manifest
        raise ValueError(f"{path}: format_version {got!r}, expected {FORMAT_VERSION}")
    arrays = manifest.get("arrays") if isinstance(manifest.get("arrays"), dict) else {}
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    missing += [f"arrays.{a}" for a in ARRAYS if not isinstance(arrays.get(a), dict)]
    if missing:
        raise ValueError(f"{path}: lacks {missing}; the manifest is damaged")
    try:
        OfflineSpec.from_dict(manifest["spec"])
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: bad spec ({e}); the manifest is damaged") from None
    sums = manifest["checksums"] if isinstance(manifest["checksums"], dict) else {}
    for name in ARRAYS if manifest["complete"] else ():
        if not isinstance(sums.get(name), str) or not _SHA256.fullmatch(sums[name]):
            raise StoreIntegrityError(
                f"{path}: the complete store has no valid sha256 of {name}.npy "
                f"({sums.get(name)!r}); the manifest was edited or damaged"
            )
    return manifest


def check_array(path: str, arr: np.ndarray, meta: dict) -> np.ndarray:
    """`arr` if its shape and dtype are the manifest's `meta` {'shape', 'dtype'}, else a
    ValueError naming `path`."""
    if list(arr.shape) != meta["shape"] or arr.dtype != np.dtype(meta["dtype"]):
        raise ValueError(
            f"{path}: shape {arr.shape} dtype {arr.dtype}, manifest says "
            f"{tuple(meta['shape'])} {meta['dtype']}"
        )
    return arr


def read_remote(path: str, meta: dict) -> np.ndarray:
    """A remote .npy object [meta's shape], read into memory."""
    if not storage.exists(path):
        raise FileNotFoundError(f"offline store array missing: {path}")
    return check_array(path, storage.load_npy(path), meta)

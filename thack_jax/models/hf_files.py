"""Hugging Face checkpoint files: the directory, safetensors (single or sharded), JSON.

Only safetensors files are read: PyTorch `.bin` files are pickles (loading one can run
code), so they are refused with a message saying how to convert them. Tensors come back
as numpy arrays in their stored dtype (BF16 as `ml_dtypes.bfloat16`); `SAFETENSORS_DTYPES`
are the dtypes an import accepts. Nothing here knows T5: names are the file's own.

Every file goes through `thack_jax.core.storage`, so a checkpoint directory may be local
or a URI (gs://...). A safetensors file is an 8-byte little-endian header length N, N bytes
of JSON header ({name: {dtype, shape, data_offsets}}), then the tensor data. The header is
parsed and checked here (lengths against the file size, offsets against dtype x shape), so a
truncated or damaged file fails at once with its path; each tensor is then one ranged read
(lazy on GCS too). `safetensors.numpy.load(bytes)` is not used for remote files because it
cannot decode BF16 (safetensors 0.8: KeyError 'BF16').

Bytes that are damaged inside the tensor data leave the format valid; `value_problem`
catches them in the values (random bytes read as floats are NaN/inf or huge, see there).
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import ml_dtypes
import numpy as np
import safetensors.numpy

from thack_jax.core import storage

SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Decoders of the accepted dtypes (safetensors stores little-endian).
_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# Bytes per value of every safetensors dtype, to check a header's offsets.
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2}
_ITEM_BYTES |= {"F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8}
_ITEM_BYTES |= {"F64": 8, "C64": 8}
# The safetensors library refuses larger headers; a larger length is a damaged file.
MAX_HEADER_BYTES = 100_000_000
# No trained weight comes near this; random bytes read as float32/bfloat16 exceed it in
# ~11% of values (exponent >= 227 of 255), so 2,000 random bytes are caught for certain.
MAX_ABS_WEIGHT = 1e30


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is not what was written: truncated, a damaged header, or
    weights that are not finite. `path` is the file (or checkpoint) at fault."""

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


class TensorInfo(NamedTuple):
    """Where one tensor is: its file, safetensors dtype, shape, first byte and byte count."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`. Raises ValueError naming the file for bytes that are not
    UTF-8 JSON or for a non-object."""
    path = os.fspath(path)
    raw = storage.read_bytes(path)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def is_file(path: str) -> bool:
    return storage.exists(path) and not storage.isdir(path)


def checkpoint_dir(path: str | os.PathLike) -> str:
    """`path` as a string. Raises FileNotFoundError / NotADirectoryError otherwise."""
    directory = os.fspath(path)
    if not storage.exists(directory):
        raise FileNotFoundError(f"checkpoint path {directory} does not exist")
    if not storage.isdir(directory):
        raise NotADirectoryError(
            f"checkpoint path {directory} is a file; pass the directory holding config.json "
            "and model.safetensors"
        )
    return directory


def _entry(path: str, name: str, entry, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against the data size."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not isinstance(dtype, str) or not all(
            type(x) is int and x >= 0 for x in (*shape, begin, end)
        ):
            raise TypeError
    except (TypeError, KeyError, ValueError) as e:
        raise DamagedCheckpointError(
            path, f"damaged safetensors header: entry {name!r} is {entry!r:.200}"
        ) from e
    size = math.prod(shape) * _ITEM_BYTES.get(dtype, 0)
    if dtype in _ITEM_BYTES and end - begin != size:
        raise DamagedCheckpointError(
            path,
            f"damaged safetensors header: {name} ({dtype} {list(shape)}) needs {size} bytes "
            f"but its data_offsets [{begin}, {end}] span {end - begin}",
        )
    if end > data_bytes:
        raise DamagedCheckpointError(
            path,
            f"truncated: {name} ends at data byte {end} but the file holds only {data_bytes} "
            "bytes of tensor data",
        )
    return dtype, shape, begin, end


def read_header(path: str) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo of one safetensors file, from its header alone.

    Raises:
      DamagedCheckpointError: the file is too short, its header length or JSON is damaged,
        or a tensor's bytes do not fit its dtype, shape or the file (truncated).
    """
    with storage.open_file(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        if size < 8:
            raise DamagedCheckpointError(path, f"truncated: {size} bytes, no safetensors header")
        length = int.from_bytes(f.read(8), "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise DamagedCheckpointError(
                path,
                f"damaged or truncated: the header length field says {length} bytes but the "
                f"file has {size} bytes",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpointError(path, f"damaged safetensors header: not JSON ({e})") from e
    if not isinstance(header, dict):
        raise DamagedCheckpointError(path, "damaged safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(path, name, entry, size - 8 - length)
        out[name] = TensorInfo(path, dtype, shape, 8 + length + begin, end - begin)
    return out


def tensor_index(directory: str) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo, from model.safetensors or the sharded index and its shards
    (headers only). Raises FileNotFoundError (no weights, a missing shard), ValueError (a
    bad index, only .bin pickles) or DamagedCheckpointError, each naming the file."""
    single = storage.join(directory, WEIGHTS_FILE)
    index = storage.join(directory, INDEX_FILE)
    if is_file(single):
        return read_header(single)
    if is_file(index):
        return _sharded_index(directory, index)
    pickles = [n for n in storage.listdir(directory) if n.endswith(".bin")]
    if pickles:
        raise ValueError(
            f"{directory} holds {pickles} but no model.safetensors: PyTorch .bin checkpoints "
            "are pickles and are not supported. Convert once with transformers: "
            "T5ForConditionalGeneration.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)"
        )
    raise FileNotFoundError(
        f"{directory} has no model.safetensors or model.safetensors.index.json "
        f"(found {storage.listdir(directory)})"
    )


def _sharded_index(directory: str, index: str) -> dict[str, TensorInfo]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' object")
    headers = {}
    for name, shard in weight_map.items():
        # A shard name must be a plain file name: the index may not point elsewhere.
        if (
            not isinstance(shard, str)
            or os.path.basename(shard) != shard
            or shard in ("", ".", "..")
        ):
            raise ValueError(f"{index} maps {name!r} to {shard!r}, not a file name")
        if shard not in headers:
            path = storage.join(directory, shard)
            if not is_file(path):
                raise FileNotFoundError(f"{index} lists shard {shard} but {path} is missing")
            headers[shard] = read_header(path)
    missing = sorted(n for n, shard in weight_map.items() if n not in headers[shard])
    if missing:
        raise ValueError(f"{index} lists tensors its shards lack: {missing}")
    return {name: headers[shard][name] for name, shard in weight_map.items()}


def read_tensors(index: dict[str, TensorInfo], names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors (stored dtype, writable), each file opened once, one read each."""
    out = {}
    for file in sorted({index[n].file for n in names}):
        with storage.open_file(file, "rb") as f:
            for name in names:
                info = index[name]
                if info.file != file:
                    continue
                if info.dtype not in _NUMPY_DTYPES:
                    raise ValueError(f"{file}: {name} has dtype {info.dtype}, not a float")
                f.seek(info.start)
                buffer = bytearray(info.nbytes)
                if f.readinto(buffer) != info.nbytes:
                    raise DamagedCheckpointError(file, f"truncated while reading {name}")
                array = np.frombuffer(buffer, _NUMPY_DTYPES[info.dtype])
                out[name] = array.reshape(info.shape)
    return out


def value_problem(array: np.ndarray) -> str | None:
    """None when every value of a float array is finite with |x| < MAX_ABS_WEIGHT, else
    what is wrong, e.g. '3 of 4096 values are NaN/inf (first at flat index 17)'.

    One pass: the bits without the sign order floats by magnitude (NaN and inf above every
    finite value), so one max of them answers both questions; counts only on failure.
    """
    array = np.asarray(array)
    if array.size == 0:
        return None
    unsigned = np.dtype(f"u{array.dtype.itemsize}")
    no_sign = unsigned.type(np.iinfo(unsigned).max >> 1)
    limit = np.asarray(min(MAX_ABS_WEIGHT, float(np.finfo(array.dtype).max)), array.dtype)
    inf_bits = np.asarray(np.inf, array.dtype).view(unsigned)
    magnitude = array.reshape(-1).view(unsigned) & no_sign
    if magnitude.max() < limit.view(unsigned):
        return None
    nonfinite = int(np.count_nonzero(magnitude >= inf_bits))
    huge = int(np.count_nonzero(magnitude >= limit.view(unsigned))) - nonfinite
    first = int(np.flatnonzero(magnitude >= limit.view(unsigned))[0])
    parts = [f"{nonfinite} of {array.size} values are NaN/inf"] if nonfinite else []
    if huge:
        parts.append(f"{huge} of {array.size} have |x| >= {float(limit):.3g}")
    return f"{' and '.join(parts)} (first at flat index {first})"


def check_values(directory: str, arrays: dict[str, np.ndarray], label) -> None:
    """Raises DamagedCheckpointError listing every tensor with NaN/inf or implausibly large
    values (`label(name)`: how the message names it, e.g. with its file): damaged bytes
    inside the tensor data leave the format valid, and such weights would make every later
    number NaN or silently 0."""
    problems = []
    for name, array in sorted(arrays.items()):
        if (problem := value_problem(array)) is not None:
            problems.append(f"{label(name)}: {problem}")
    if problems:
        lines = "\n  - ".join(problems)
        raise DamagedCheckpointError(
            directory,
            f"{len(problems)} tensor(s) hold non-finite or implausible values (a damaged file "
            f"or a diverged model):\n  - {lines}",
        )


def write_checkpoint(directory: str, config_json: dict, tensors: dict[str, np.ndarray]) -> None:
    """Writes config.json + model.safetensors into `directory` (created), replacing both,
    each atomically (the safetensors bytes are built in memory first).

    Raises:
      FileExistsError: the directory already holds a sharded checkpoint.
    """
    if storage.exists(storage.join(directory, INDEX_FILE)):
        raise FileExistsError(
            f"{directory} already holds a sharded checkpoint; use a new directory"
        )
    storage.makedirs(directory)
    storage.write_json(storage.join(directory, "config.json"), config_json)
    # transformers refuses safetensors files without this metadata.
    data = safetensors.numpy.save(tensors, metadata={"format": "pt"})
    storage.write_atomic(storage.join(directory, WEIGHTS_FILE), data)

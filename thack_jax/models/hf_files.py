"""Hugging Face checkpoint files: the directory, safetensors (single or sharded), JSON.

Only safetensors files are read: PyTorch `.bin` files are pickles (loading one can run
code), so they are refused with a message saying how to convert them. Tensors come back
as numpy arrays in their stored dtype (BF16 as `ml_dtypes.bfloat16`); `SAFETENSORS_DTYPES`
are the dtypes an import accepts. Nothing here knows T5: names are the file's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import safe_open

SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    """The JSON object in `path`. Raises ValueError for invalid JSON or a non-object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path. Raises FileNotFoundError / NotADirectoryError otherwise."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint path {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"checkpoint path {directory} is a file; pass the directory holding config.json "
            "and model.safetensors"
        )
    return directory


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors or the sharded index."""
    single = directory / WEIGHTS_FILE
    index = directory / INDEX_FILE
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        files = {}
        for name, shard in weight_map.items():
            # A shard name must be a plain file name: the index may not point elsewhere.
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise ValueError(f"{index} maps {name!r} to {shard!r}, not a file name")
            if not (directory / shard).is_file():
                raise FileNotFoundError(
                    f"{index} lists shard {shard} but {directory / shard} is missing"
                )
            files[name] = directory / shard
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    if pickles:
        raise ValueError(
            f"{directory} holds {pickles} but no model.safetensors: PyTorch .bin checkpoints "
            "are pickles and are not supported. Convert once with transformers: "
            "T5ForConditionalGeneration.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)"
        )
    listing = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"{directory} has no model.safetensors or model.safetensors.index.json (found {listing})"
    )


def tensor_headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype string), reading only the file headers."""
    out = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if files.get(name) == path:
                    piece = f.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    missing = sorted(set(files) - set(out))
    if missing:
        raise ValueError(f"the safetensors index lists tensors its shards lack: {missing}")
    return out


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors (stored dtype), each file opened once."""
    out = {}
    for path in sorted({files[n] for n in names}):
        with safe_open(path, framework="numpy") as f:
            for name in names:
                if files[name] == path:
                    out[name] = f.get_tensor(name)
    return out


def write_checkpoint(directory: Path, config_json: dict, tensors: dict[str, np.ndarray]) -> None:
    """Writes config.json + model.safetensors into `directory` (created), replacing both.

    Raises:
      FileExistsError: the directory already holds a sharded checkpoint.
    """
    if (directory / INDEX_FILE).exists():
        raise FileExistsError(
            f"{directory} already holds a sharded checkpoint; use a new directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "config.json", "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
    # transformers refuses safetensors files without this metadata.
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})

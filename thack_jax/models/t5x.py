"""T5X checkpoints (a msgpack `checkpoint` file + tensorstore arrays) to our parameters.

Layout written by t5x's `Checkpointer.save` (checkpoint format version 3):

  checkpoint_<step>/
    checkpoint                                   msgpack: {"version": 3, "optimizer":
                                                   {"target": <params>, "state": {"step",
                                                   "param_states"}}}
    target.encoder.layers_0.attention.query.kernel/   zarr array (.zarray + chunks)
    ...

Each `target` leaf in the msgpack is either the array itself (small, unpartitioned
arrays are stored inline) or the JSON of a `tensorstore.Spec` whose kvstore path is
relative to the checkpoint directory (`{"driver": "zarr", "kvstore": {"driver": "file",
"path": "target.encoder...kernel/"}, "metadata": {...}}`). Orbax-era t5x writes the
string "PLACEHOLDER://<name>" instead, with the array in the directory `<name>`. The file
is read with `flax.serialization.msgpack_restore` (msgpack, never pickle). Optimizer
state is ignored.

Our parameter names are t5x's example-network names, so the mapping is the identity;
t5x also stores attention kernels 2-D, [D, H*Dk], like ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import flax.serialization
import numpy as np
import tensorstore as ts

from thack_jax.models.config import T5Config
from thack_jax.models.hf_files import DamagedCheckpointError, value_problem
from thack_jax.models.mapping import flatten, numpy_dtype, unflatten, validate

PLACEHOLDER = "PLACEHOLDER://"
ARRAY_DRIVERS = ("zarr", "zarr3")
# t5x rewrites gcs / gfile kvstores to local files the same way when reading locally.
FILE_KVSTORES = ("file", "gfile", "gcs")
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _is_spec(value: dict) -> bool:
    return "driver" in value


def _checkpoint_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"T5X checkpoint path {path} does not exist")
    if path.is_file():
        return path
    if (path / "checkpoint").is_file():
        return path / "checkpoint"
    steps = sorted(p.name for p in path.glob("checkpoint_*") if (p / "checkpoint").is_file())
    if steps:
        raise FileNotFoundError(
            f"{path} is a T5X model directory, not a checkpoint: pass one of its step "
            f"directories {steps}"
        )
    raise FileNotFoundError(f"{path} has no msgpack file named 'checkpoint'")


def _read_contents(file: Path) -> dict:
    raw = file.read_bytes()
    if raw.startswith(b"model_checkpoint_path"):
        raise ValueError(f"{file} is a TensorFlow checkpoint index, not a T5X msgpack checkpoint")
    try:
        contents = flax.serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"{file} is not a msgpack T5X checkpoint: {e}") from e
    if not isinstance(contents, dict):
        raise ValueError(f"{file} holds a {type(contents).__name__}, expected a msgpack map")
    return contents


def _params_tree(contents: dict, file: Path) -> dict:
    """The parameter tree: optimizer.target (t5x, legacy flax) or params (flax TrainState)."""
    version = contents.get("version", 0)
    if version == 1 or not isinstance(version, int):
        raise ValueError(f"{file} has checkpoint format version {version!r}; expected 0, 2 or 3")
    state = contents if version == 0 else contents.get("optimizer")
    if not isinstance(state, dict):
        raise ValueError(f"{file} (version {version}) has no 'optimizer' map")
    for key in ("target", "params"):
        tree = state.get(key)
        if isinstance(tree, dict):
            # Some trees wrap the variables in a 'params' collection.
            if set(tree) == {"params"} and isinstance(tree["params"], dict):
                tree = tree["params"]
            return tree
    raise ValueError(f"{file} has no 'target' or 'params' tree; top-level keys {sorted(state)}")


def _local_spec(spec: dict, directory: Path, name: str) -> dict:
    """A t5x tensorstore spec with its relative kvstore path resolved under `directory`."""
    driver = spec.get("driver")
    if driver not in ARRAY_DRIVERS:
        raise ValueError(
            f"{name}: tensorstore driver {driver!r} is not supported ({ARRAY_DRIVERS})"
        )
    kvstore = spec.get("kvstore")
    if isinstance(kvstore, dict) and "path" in kvstore:
        relative, kv_driver = kvstore["path"], kvstore.get("driver", "file")
    elif "path" in spec:  # tensorstore < 0.1.14 specs
        relative = spec["path"]
        kv_driver = kvstore.get("driver", "file") if isinstance(kvstore, dict) else "file"
    else:
        raise ValueError(f"{name}: tensorstore spec has no kvstore path: {spec}")
    if kv_driver not in FILE_KVSTORES:
        raise ValueError(f"{name}: kvstore driver {kv_driver!r} is not supported ({FILE_KVSTORES})")
    root = directory.resolve()
    full = (root / relative).resolve()
    # t5x writes paths relative to the checkpoint; refuse any that lead elsewhere.
    if Path(relative).is_absolute() or root not in full.parents:
        raise ValueError(f"{name}: array path {relative!r} is outside the checkpoint {directory}")
    return {"driver": driver, "kvstore": {"driver": "file", "path": str(full) + "/"}}


def _placeholder_spec(leaf: str, directory: Path, name: str) -> dict:
    array_name = leaf[len(PLACEHOLDER) :]
    if (directory / "manifest.ocdbt").exists():
        kvstore = {"driver": "ocdbt", "base": f"file://{directory.resolve()}/", "path": array_name}
        return {"driver": "zarr", "kvstore": kvstore}
    driver = "zarr3" if (directory / array_name / "zarr.json").exists() else "zarr"
    return _local_spec({"driver": driver, "kvstore": {"path": array_name}}, directory, name)


def _open(leaf, directory: Path, name: str):
    """Returns an inline numpy array or an opened tensorstore (data not read yet)."""
    if isinstance(leaf, dict):
        spec = _local_spec(leaf, directory, name)
    elif isinstance(leaf, str) and leaf.startswith(PLACEHOLDER):
        spec = _placeholder_spec(leaf, directory, name)
    elif isinstance(leaf, (np.ndarray, np.generic, int, float)) and not isinstance(leaf, bool):
        return np.asarray(leaf)
    else:
        raise ValueError(f"{name}: unsupported leaf of type {type(leaf).__name__}: {leaf!r:.80}")
    try:
        return ts.open(spec, open=True, read=True).result()
    except ValueError as e:
        path = spec["kvstore"]["path"]
        raise ValueError(f"{name}: cannot open the tensorstore array at {path}: {e}") from e


def load_t5x_checkpoint(
    path: str | os.PathLike, config: T5Config, dtype: str | None = None
) -> dict:
    """Loads the parameters of a T5X checkpoint of t5x's example T5 network.

    Args:
      path: the step directory (`.../checkpoint_1000000`) or its `checkpoint` file.
      config: the model's config (T5X keeps it in gin files, not in the checkpoint).
      dtype: parameter dtype; default config.param_dtype.

    Returns:
      Our nested parameter dict of numpy arrays (e.g. encoder/layers_0/attention/query/kernel
      [D, H*Dk]), cast to `dtype`.

    Raises:
      FileNotFoundError: no such path, or no `checkpoint` file.
      CheckpointMismatchError (a ValueError): every missing, unexpected, mis-shaped,
        unreadable or non-float array at once, and the config fields the weights contradict.
      DamagedCheckpointError (a ValueError): arrays with NaN/inf or |x| >= 1e30, each named
        with where it is stored and how many values are bad.
      ValueError: not a msgpack T5X checkpoint (e.g. a TensorFlow one), no 'target' tree.
    """
    target = numpy_dtype(dtype or config.param_dtype)
    file = _checkpoint_file(path)
    directory = file.parent
    tree = _params_tree(_read_contents(file), file)
    arrays, problems = {}, []
    for name, leaf in flatten(tree, is_leaf=_is_spec).items():
        try:
            arrays[name] = _open(leaf, directory, name)
        except ValueError as e:
            problems.append(str(e))
            continue
        stored = arrays[name].dtype
        stored = stored.numpy_dtype if isinstance(stored, ts.dtype) else stored
        if np.dtype(stored).name not in FLOAT_DTYPES:
            problems.append(f"{name}: unsupported dtype {np.dtype(stored).name} ({FLOAT_DTYPES})")
    if any(n.startswith(("encoder/layers/", "decoder/layers/")) for n in arrays):
        problems.append("the checkpoint stacks its layers (scan_layers): not supported")
    found = {name: tuple(a.shape) for name, a in arrays.items()}
    validate(config, found, str(file), lambda p: (p, False), extra_problems=problems)
    flat, damaged = {}, []
    for name, array in arrays.items():
        value = _read(array, name, file)
        # Checked as stored, before the cast: damaged chunks or a diverged model.
        if (problem := value_problem(value)) is not None:
            damaged.append(f"{name} ({_where(array, file)}): {problem}")
        flat[name] = np.asarray(value, dtype=target)
    if damaged:
        lines = "\n  - ".join(damaged)
        raise DamagedCheckpointError(
            str(directory),
            f"{len(damaged)} array(s) hold non-finite or implausible values (a damaged "
            f"checkpoint or a diverged model):\n  - {lines}",
        )
    return unflatten(flat)


def _where(array, file: Path) -> str:
    """Where an array's values are stored, for messages."""
    if isinstance(array, np.ndarray):
        return f"inline in {file}"
    return f"array at {array.kvstore.path}" if array.kvstore is not None else "tensorstore array"


def _read(array, name: str, file: Path) -> np.ndarray:
    """The values of an inline array or an opened tensorstore; a chunk that cannot be read
    (truncated, damaged compression) raises ValueError naming the array and its path."""
    if isinstance(array, np.ndarray):
        return array
    try:
        return np.asarray(array.read().result())
    except ValueError as e:  # tensorstore reports I/O and decoding errors as ValueError
        raise ValueError(f"{name}: cannot read the {_where(array, file)}: {e}") from e

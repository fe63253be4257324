"""Checkpoints with orbax: periodic saves, keep-last-N, sharded restore with fallback.

Layout: `<directory>/<step>/state` (the TrainState pytree, OCDBT/tensorstore) and
`<directory>/<step>/source` (the batch source's JSON position). orbax writes a step into a
temporary directory and renames it when complete, so a step directory that exists under its
plain name is finalized; `list_finalized_steps` never returns a step still being written.

On gs:// orbax cannot rename a folder: it writes a step under its plain name and marks it
finalized with a `commit_success.txt` written last, and a step folder without it is the
unfinished one. `directory` may be a local path or a gs:// URI (orbax and tensorstore
write the bucket directly; the listing and the quarantine go through core.storage).

Restore (`Checkpointer.restore`) takes the newest step that reads back, warning about and
moving aside (to `<directory>_corrupt/`) every newer one that does not (half-written or
corrupted files), so that training can later save those steps again. A checkpoint whose
array shapes or dtypes differ from the target is an error (`CheckpointMismatchError`,
listing every mismatching path) and nothing is moved or overwritten.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

from thack_jax.core import storage

logger = logging.getLogger(__name__)

STATE = "state"
SOURCE = "source"
# Arrays whose per-replica slice is smaller than this are saved whole by one replica:
# slicing them for replica-parallel writes costs one XLA compilation per shape and buys
# nothing for small arrays.
_MIN_REPLICA_SLICE_BYTES = 1 << 20


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not match the target's paths, shapes or dtypes."""


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none could be read."""


def _type_registry():
    array = type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES
    )
    scalar = type_handlers.ScalarHandler()
    return type_handlers.create_type_handler_registry(
        (jax.Array, array),
        (np.ndarray, type_handlers.NumpyHandler()),
        (int, scalar),
        (float, scalar),
        (np.number, scalar),
    )


def _item_handlers(with_source: bool = True) -> dict:
    handlers = {STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_registry())}
    if with_source:
        handlers[SOURCE] = ocp.JsonCheckpointHandler()
    return handlers


def abstract_target(shapes, shardings):
    """Zips a tree of shapes (arrays / ShapeDtypeStruct) with a tree of shardings into a
    tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (a restore target)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _restore_args(target):
    return jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        target,
    )


def _absolute(directory: str) -> str:
    """A local path made absolute (orbax wants one); a URI as it is (abspath would turn
    'gs://b/x' into '<cwd>/gs:/b/x')."""
    return directory if storage.is_remote(directory) else os.path.abspath(directory)


def list_finalized_steps(directory: str) -> list[int]:
    """Steps in `directory` that orbax has committed, ascending. Safe to call from another
    process while training writes: a step being written is never listed."""
    if not storage.isdir(directory):
        return []
    return sorted(ocp.step.checkpoint_steps(directory))


all_steps = list_finalized_steps


def latest_step(directory: str) -> int | None:
    """The newest finalized step in `directory`, or None."""
    steps = list_finalized_steps(directory)
    return steps[-1] if steps else None


def _unfinished_paths(directory: str) -> list[str]:
    """Step directories orbax left unfinished (temporary names of interrupted saves)."""
    return [
        storage.join(directory, name)
        for name in storage.listdir(directory)
        if ocp.step.is_tmp_checkpoint(storage.join(directory, name))
    ]


def _flat_by_name(tree) -> dict[str, Any]:
    """{orbax parameter name ('params.encoder...kernel'): leaf}."""
    names = ocp.tree.get_param_names(tree, include_empty_nodes=False)
    return dict(zip(jax.tree.leaves(names), jax.tree.leaves(tree), strict=True))


def check_matches(metadata_tree, target, where: str, partial: bool = False) -> None:
    """Raises CheckpointMismatchError listing every path whose shape or dtype differs
    between the saved arrays (`metadata_tree`, orbax metadata) and `target`, and every
    path present in one but not the other (`partial`: extra saved paths are allowed)."""
    saved = {leaf.name: leaf for leaf in jax.tree.leaves(metadata_tree) if hasattr(leaf, "name")}
    wanted = _flat_by_name(target)
    problems = []
    for name, want in sorted(wanted.items()):
        if name not in saved:
            problems.append(f"  {name}: missing from the checkpoint")
            continue
        got = saved[name]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(
                f"  {name}: expected {np.dtype(want.dtype).name}{list(want.shape)}, found "
                f"{np.dtype(got.dtype).name}{list(got.shape)}"
            )
    if not partial:
        problems += [
            f"  {name}: in the checkpoint but not expected"
            for name in sorted(saved)
            if name not in wanted
        ]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the model/optimizer being restored "
            f"({len(problems)} path(s)); nothing was overwritten:\n" + "\n".join(problems)
        )


class Checkpointer:
    """Saves and restores `(TrainState, source position)` pairs under `directory`.

    Saves are asynchronous (the arrays are copied off the device before `save` returns, so
    the state may be donated right after); `wait_until_finished` blocks until written.
    The newest `max_to_keep` steps are kept.
    """

    def __init__(self, directory: str, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = _absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_item_handlers()
        )

    def all_steps(self) -> list[int]:
        return list_finalized_steps(self.directory)

    def latest_step(self) -> int | None:
        return latest_step(self.directory)

    def save(self, step: int, state, source_state: dict | None = None) -> bool:
        """Starts saving `state` (a pytree of jax.Arrays) and the JSON `source_state` at
        `step`. Returns False (and saves nothing) when `step` is already saved."""
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{STATE: ocp.args.PyTreeSave(state), SOURCE: ocp.args.JsonSave(source_state or {})}
        )
        return self._manager.save(step, args=args, force=True)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def _restore_step(self, step: int, target):
        metadata = self._manager.item_metadata(step)[STATE]
        if metadata is None:
            raise FileNotFoundError(f"no '{STATE}' item metadata in step {step}")
        check_matches(metadata.tree, target, storage.join(self.directory, str(step)))
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.PyTreeRestore(target, restore_args=_restore_args(target)),
                SOURCE: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(step, args=args)
        return restored[STATE], dict(restored[SOURCE] or {})

    def restore(self, target) -> tuple[Any, dict, int] | None:
        """Restores the newest readable step into `target` (a tree of ShapeDtypeStruct with
        shardings, see `abstract_target`). Returns (state, source_state, step), or None
        when there is no checkpoint.

        Half-written steps (an interrupted save) are deleted; newer finalized steps that do
        not read back are logged (warning) and moved to `<directory>_corrupt/`. Raises
        CheckpointMismatchError on wrong shapes or dtypes and NoUsableCheckpointError when no
        step reads back.
        """
        # An unfinished save holds nothing a restore could use (its step is also in no
        # finalized listing): delete it rather than keep a step-sized copy forever.
        unfinished = _unfinished_paths(self.directory)
        for path in unfinished:
            logger.warning("deleting half-written checkpoint %s (an interrupted save)", path)
        if jax.process_index() == 0:
            for path in unfinished:
                storage.rmtree(path)
        bad: list[str] = []  # finalized steps that do not read back: kept aside for a look
        result = None
        for step in reversed(self.all_steps()):
            path = storage.join(self.directory, str(step))
            try:
                state, source = self._restore_step(step, target)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "corrupted"
                logger.warning(
                    "checkpoint %s is corrupted or incomplete (%s: %s); falling back to the "
                    "previous one",
                    path,
                    type(e).__name__,
                    str(e)[:500],
                )
                bad.append(path)
                continue
            result = (state, source, step)
            break
        if result is None and self.all_steps():
            raise NoUsableCheckpointError(
                f"none of the checkpoints in {self.directory} could be read: "
                f"{[storage.basename(p) for p in bad]}"
            )
        self._move_aside(bad)
        return result

    def _move_aside(self, paths: list[str]) -> None:
        if not paths or jax.process_index() != 0:
            return
        quarantine = self.directory.rstrip("/") + "_corrupt"
        storage.makedirs(quarantine)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in paths:
            dest = storage.join(quarantine, f"{storage.basename(path)}.{stamp}")
            logger.warning("moving bad checkpoint %s to %s", path, dest)
            storage.move(path, dest)
        self._manager.reload()


def restore_params(directory: str, step: int, target_shapes, shardings=None):
    """Reads only the student parameters of checkpoint `step` (e.g. in the evaluator).

    target_shapes: the params tree of arrays / ShapeDtypeStruct (e.g.
    `models.param_shapes(config)`); shardings: the same tree of shardings (None: the first
    device). Raises CheckpointMismatchError on wrong shapes or dtypes, FileNotFoundError
    when the step is not finalized (or was deleted, e.g. by keep-last-N, while being read).
    """
    if step not in list_finalized_steps(directory):
        raise FileNotFoundError(
            f"checkpoint step {step} is not finalized in {directory}; finalized steps: "
            f"{list_finalized_steps(directory)}"
        )
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, target_shapes)
    target = {"params": abstract_target(target_shapes, shardings)}
    manager = ocp.CheckpointManager(
        _absolute(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers=_item_handlers(with_source=False),
    )
    try:
        metadata = manager.item_metadata(step)[STATE]
        check_matches(metadata.tree, target, storage.join(directory, str(step)), partial=True)
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.PyTreeRestore(
                    target, restore_args=_restore_args(target), partial_restore=True
                )
            }
        )
        return manager.restore(step, args=args)[STATE]["params"]
    except CheckpointMismatchError:
        raise
    except Exception as e:
        if step not in list_finalized_steps(directory):  # removed by keep-last-N meanwhile
            raise FileNotFoundError(
                f"checkpoint step {step} in {directory} was deleted while being read"
            ) from e
        raise
    finally:
        manager.close()

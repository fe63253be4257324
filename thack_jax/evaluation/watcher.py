"""The checkpoint watcher: evaluates each finalized checkpoint of a training workdir once.

`watch(workdir, evaluator)` is the separate-process mode of the evaluator (used by
`launch/eval.py`): it polls `workdir/checkpoints`, restores the student's params of every
step orbax has finalized, calls `evaluator.evaluate(params)` (an `evaluation.Evaluator`,
or anything with `student_config`, `param_shardings(config)` and `evaluate(params)`), and
records the result so that a restarted watcher neither skips nor repeats a step. See
docs/evaluation.md. `workdir` may be a gs:// URI (all I/O goes through core.storage; the
metrics file is then uploaded whole after each evaluated step).
"""

from __future__ import annotations

import logging
import time

import jax

from thack_jax import models
from thack_jax.core import storage
from thack_jax.evaluation.evaluator import Evaluator
from thack_jax.training import checkpoints
from thack_jax.training.metrics_io import MetricsWriter, read_metrics

logger = logging.getLogger(__name__)

EVAL_STATE_FILE = "eval_state.json"
EVAL_METRICS_FILE = "eval_metrics.jsonl"


def _read_state(path: str) -> list[int]:
    if not storage.exists(path):
        return []
    state = storage.read_json(path)  # ValueError naming the file when damaged
    try:
        steps = state["evaluated_steps"]
        return sorted(int(s) for s in steps)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an eval state file ({e}); expected evaluated_steps") from e


def _write_state(path: str, steps) -> None:
    """Atomic: a crash leaves either the old or the new file, never a partial one."""
    storage.write_json(path, {"evaluated_steps": sorted(int(s) for s in steps)})


def _open_metrics(workdir: str) -> tuple[MetricsWriter, set[int]]:
    """The eval metrics writer, after dropping a half-written last line; steps already there."""
    writer = MetricsWriter(workdir, tensorboard=False, filename=EVAL_METRICS_FILE)
    if not storage.exists(writer.path):
        return writer, set()
    steps = {row["step"] for row in read_metrics(writer.path)}
    writer.truncate_after(max(steps, default=-1))
    return writer, steps


def watch(
    workdir: str,
    evaluator: Evaluator,
    ckpt_subdir: str = "checkpoints",
    poll_seconds: float = 30.0,
    timeout: float | None = None,
    stop_after_step: int | None = None,
) -> list[int]:
    """Evaluates every finalized checkpoint of `workdir/ckpt_subdir` exactly once, in order.

    Protocol (restartable): per step, evaluate -> append one line to
    `workdir/eval_metrics.jsonl` (fsynced; remote: the object rewritten) -> add the step
    to `workdir/eval_state.json` (atomic replace). On start, steps found in either file
    count as evaluated (a crash between the two writes does not evaluate a step twice) and
    a half-written metrics line is dropped. Only steps orbax has finalized are read; one
    being written is picked up at a later poll. One watcher per workdir.

    Returns the sorted evaluated steps when a step >= `stop_after_step` has been evaluated,
    or after `timeout` seconds without a new checkpoint (None: wait forever).
    Raises FileNotFoundError when it times out and the directory does not exist or holds no
    checkpoint.
    """
    ckpt_dir = storage.join(workdir, ckpt_subdir)
    state_path = storage.join(workdir, EVAL_STATE_FILE)
    writer, logged = _open_metrics(workdir)
    done = set(_read_state(state_path)) | logged
    is_writer = jax.process_index() == 0
    if is_writer:
        _write_state(state_path, done)
    shapes = models.param_shapes(evaluator.student_config)
    shardings = evaluator.param_shardings(evaluator.student_config)
    last_progress = time.monotonic()
    said_waiting = False
    while True:
        steps = checkpoints.list_finalized_steps(ckpt_dir)
        if not steps and not said_waiting:
            where = "does not exist yet" if not storage.isdir(ckpt_dir) else "has no checkpoint yet"
            logger.warning("waiting: checkpoint directory %s %s", ckpt_dir, where)
            said_waiting = True
        todo = [s for s in steps if s not in done]
        if stop_after_step is not None:
            todo = [s for s in todo if s <= stop_after_step]
        for step in todo:
            start = time.monotonic()
            try:
                params = checkpoints.restore_params(ckpt_dir, step, shapes, shardings)
            except FileNotFoundError:
                if step in checkpoints.list_finalized_steps(ckpt_dir):
                    raise
                # Deleted by the trainer's keep-last-N before we got to it: nothing to read.
                logger.warning("checkpoint step %d was deleted before it was evaluated", step)
                continue
            metrics = evaluator.evaluate(params)
            done.add(step)
            if is_writer:  # the metrics line first: see the protocol above
                writer.write(step, metrics)
                writer.flush()  # a remote metrics file is written here, before the state
                _write_state(state_path, done)
            logger.info("evaluated step %d in %.1fs", step, time.monotonic() - start)
            last_progress = time.monotonic()
        if stop_after_step is not None and any(s >= stop_after_step for s in done):
            return sorted(done)
        if timeout is not None and time.monotonic() - last_progress > timeout:
            if not steps and not done:
                where = "does not exist" if not storage.isdir(ckpt_dir) else "holds no checkpoint"
                raise FileNotFoundError(
                    f"checkpoint directory {ckpt_dir} {where} (waited {timeout:.0f}s)"
                )
            return sorted(done)
        time.sleep(poll_seconds)

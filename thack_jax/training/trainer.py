"""The training loop: `train` runs the jitted step of train_step.py over a batch source.

`train` resumes from the newest good checkpoint, writes one metrics line per step,
evaluates, runs stop hooks, saves periodically and on SIGTERM / SIGINT (core/interrupt.py),
and refuses to go on (or save) after a non-finite loss. It dispatches each update before
reading the previous update's metrics, so the host prepares batches while the device
computes. Its arguments
are the frozen values of loop_config.py (re-exported here): `Student`, `LoopConfig`,
`Teacher`, `Hooks`. Batches come from a `BatchSource` (`ArraySource` here, the
distillation regimes of data/, built by `regimes.make_source`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from thack_jax import models
from thack_jax.core import interrupt, storage
from thack_jax.parallel import distributed, partitioning
from thack_jax.training import checkpoints
from thack_jax.training.loop_config import Hooks, LoopConfig, Student, Teacher
from thack_jax.training.metrics_io import MetricsWriter, Progress
from thack_jax.training.train_state import (
    TrainState,
    abstract_state,
    create_train_state,
    single_device_shardings,
    state_shardings,
)
from thack_jax.training.train_step import make_train_step

__all__ = [
    "ArraySource",
    "BatchSource",
    "Hooks",
    "LoopConfig",
    "NonFiniteLossError",
    "Student",
    "Teacher",
    "TrainResult",
    "train",
]

logger = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Where training batches come from (offline store, online sampler, mixtures, arrays).

    `next_batch` returns this process's rows of the batch for `step` (the number of updates
    done so far) as host or device arrays: {'inputs' [B, Lx] int32, 'targets' [B, Ly]
    int32, optional 'teacher_logprobs' [B, Ly, V] float32}. Online sources sample with
    `student_params` (the current student). `state_dict` is the JSON-serialisable position
    saved with every checkpoint; `load_state_dict` restores it, so that a resumed run sees
    exactly the batches an uninterrupted run would.
    """

    def next_batch(self, step: int, student_params) -> dict[str, np.ndarray | jax.Array]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ArraySource:
    """Batches of fixed arrays in shuffled epochs (a new permutation per epoch), resumable.

    inputs [N, Lx], targets [N, Ly] int32; batch_size is the global batch (the last
    N % batch_size examples of each epoch's permutation are skipped). With several
    processes each returns its own contiguous share of the global batch's rows.
    """

    def __init__(self, inputs, targets, batch_size: int, seed: int = 0):
        self.inputs = np.asarray(inputs, np.int32)
        self.targets = np.asarray(targets, np.int32)
        n = self.inputs.shape[0]
        if self.targets.shape[0] != n:
            raise ValueError(f"inputs has {n} rows but targets has {self.targets.shape[0]}")
        if not 0 < batch_size <= n:
            raise ValueError(
                f"batch_size must be in [1, {n}] (the number of rows), got {batch_size}"
            )
        if batch_size % jax.process_count():
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the {jax.process_count()} processes"
            )
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.inputs)), self.epoch
        return self._perm

    def next_batch(self, step: int, student_params=None) -> dict[str, np.ndarray]:
        del step, student_params  # the position is the source's own state
        if self.index + self.batch_size > len(self.inputs):
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._permutation()[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        share = self.batch_size // jax.process_count()
        rows = rows[jax.process_index() * share : (jax.process_index() + 1) * share]
        return {"inputs": self.inputs[rows], "targets": self.targets[rows]}

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_examples": len(self.inputs),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_examples", "batch_size"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"ArraySource state has {key}={state[key]}, this source has "
                    f"{mine}; resuming would not replay the same batches"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) became NaN or Inf; that step's state was not saved."""

    def __init__(self, step: int, metrics: Mapping[str, float], last_checkpoint: int | None):
        self.step, self.metrics, self.last_checkpoint = step, dict(metrics), last_checkpoint
        what = "loss" if not np.isfinite(metrics.get("train/loss", np.nan)) else "gradient"
        super().__init__(
            f"non-finite {what} at step {step} (metrics {dict(metrics)}); the state of this "
            f"step was not saved; the last good checkpoint is step {last_checkpoint}"
        )


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    metrics_path: str
    stopped_early: bool  # by a stop hook or a signal
    interrupted: bool = False  # by SIGTERM / SIGINT: the caller must not call the run done


def place_batch(mesh, batch: Mapping) -> dict[str, jax.Array]:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    host = {k: v for k, v in batch.items() if not isinstance(v, jax.Array)}
    placed = partitioning.shard_batch(mesh, host) if host else {}
    for k, v in batch.items():
        if isinstance(v, jax.Array):
            placed[k] = jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim))
    return placed


def _check_params(params, shapes, what: str) -> None:
    """Clear error when a given params tree does not fit the config."""
    given = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
    problems = [f"  {k}: missing" for k in sorted(set(want) - set(given))]
    problems += [f"  {k}: unexpected" for k in sorted(set(given) - set(want))]
    problems += [
        f"  {k}: expected {np.dtype(want[k].dtype).name}{list(want[k].shape)}, got "
        f"{np.dtype(given[k].dtype).name}{list(np.shape(given[k]))}"
        for k in sorted(set(want) & set(given))
        if tuple(np.shape(given[k])) != tuple(want[k].shape)
        or np.dtype(given[k].dtype) != np.dtype(want[k].dtype)
    ]
    if problems:
        raise ValueError(f"{what} do not match the config:\n" + "\n".join(problems))


def _signalled() -> bool:
    """True once SIGTERM / SIGINT reached any process. Agreed by all of them (a tiny
    all-gather per step when there are several), since the save that follows is a
    collective: a host that stopped alone would leave the others waiting in it."""
    return distributed.any_process(interrupt.requested() is not None)


def _run_hooks(hooks, step: int, metrics: Mapping[str, float]) -> bool:
    """Calls every hook (none is skipped); True when any asks to stop."""
    return any([bool(hook(step, metrics)) for hook in hooks])


class _Steps:
    """What the loop does with a step's metrics once it reads them: the NaN stop, the
    metrics line and the progress line. Reading waits for the step to finish on the device,
    so the loop calls `read` for a step only after dispatching the next one (except at the
    steps that need their own state: evaluations, checkpoints, the end)."""

    def __init__(self, loop: LoopConfig, ckpt, writer: MetricsWriter, bar: Progress):
        self.loop, self.ckpt, self.writer, self.bar = loop, ckpt, writer, bar

    def read(self, step: int, device_metrics: Mapping[str, jax.Array]) -> dict[str, float]:
        """The metrics of update `step` as floats; NonFiniteLossError if not finite."""
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        # A non-finite gradient norm means non-finite parameters after the update.
        if not np.isfinite([metrics["train/loss"], metrics["train/grad_norm"]]).all():
            self.ckpt.wait_until_finished()  # keeps the last good checkpoint complete
            raise NonFiniteLossError(step, metrics, self.ckpt.latest_step())
        return metrics

    def log(self, step: int, metrics: Mapping[str, float], always: bool = False) -> None:
        if always or (self.loop.log_every > 0 and step % self.loop.log_every == 0):
            self.writer.write(step, metrics)
        self.bar.update(step, metrics)

    def finish(self, step: int, device_metrics: Mapping[str, jax.Array]) -> None:
        """Reads and logs a step that needs nothing else (no evaluation, no checkpoint)."""
        self.log(step, self.read(step, device_metrics))


def _initial_state(student: Student, source: BatchSource, ckpt, shardings, seed: int):
    """(state, resumed step or None): the newest good checkpoint (and the source's position
    saved with it), else a fresh state of `student.init_params`, placed by `shardings`."""
    shapes = abstract_state(student.config, student.optimizer)
    restored = ckpt.restore(checkpoints.abstract_target(shapes, shardings))
    if restored is not None:
        state, source_state, start = restored
        source.load_state_dict(source_state)
        logger.info("resumed from %s at step %d", ckpt.directory, start)
        return state, start
    _check_params(student.init_params, shapes.params, "Student.init_params")
    # One compiled program instead of one per optimizer-state leaf, placed sharded.
    init = jax.jit(
        lambda p: create_train_state(p, student.optimizer, jax.random.key(seed)),
        out_shardings=shardings,
    )
    return init(student.init_params), None


def place_teacher(teacher: Teacher | None, mesh):
    """The teacher's parameters on the devices (sharded with a mesh), or None."""
    if teacher is None:
        return None
    shapes = models.param_shapes(teacher.config)
    _check_params(teacher.params, shapes, "Teacher.params")
    if mesh is None:
        shardings = single_device_shardings(shapes)
    else:
        shardings = partitioning.param_shardings(mesh, models.param_axes(teacher.config), shapes)
    return jax.device_put(teacher.params, shardings)


def _check_arguments(student, source, loop, teacher, hooks) -> None:
    for name, value, kind in (
        ("student", student, Student),
        ("loop", loop, LoopConfig),
        ("hooks", hooks, Hooks),
    ):
        if not isinstance(value, kind):
            raise TypeError(f"train: {name} must be a trainer.{kind.__name__}, got {value!r}")
    if teacher is not None and not isinstance(teacher, Teacher):
        raise TypeError(f"train: teacher must be a trainer.Teacher or None, got {teacher!r}")
    if not callable(getattr(source, "next_batch", None)):
        raise TypeError(
            f"train: source must be a BatchSource (next_batch, state_dict, "
            f"load_state_dict), got {type(source).__name__}"
        )


def train(
    *,
    workdir: str,
    student: Student,
    source: BatchSource,
    loop: LoopConfig,
    teacher: Teacher | None = None,
    hooks: Hooks | None = None,
    mesh=None,
) -> TrainResult:
    """Trains until `loop.num_steps` updates are done, resuming from `workdir/checkpoints`.

    Metric lines (`workdir/metrics.jsonl`) are keyed by the number of updates done: step k
    holds the train metrics of update k, plus eval metrics when `hooks.eval_fn(k, params)`
    ran at k (the steps of `LoopConfig`, and step 0 before training, which gets its own
    line; `hooks=None`: no evaluations). `hooks.stop` (called after each eval) can stop the
    run early; so can SIGTERM / SIGINT (then also `interrupted=True`: the caller must not
    treat the run as finished). Either way a checkpoint of the current step is saved and the
    result has `stopped_early=True`. Checkpoints: every `loop.checkpoint_every` steps and at
    the end, newest `loop.keep_checkpoints` kept. Raises NonFiniteLossError naming the
    first update with a NaN/Inf loss or gradient norm; no checkpoint includes that update.

    Update t+1 is dispatched before the metrics of update t are read, so that the host
    prepares the next batch while the device computes; the loop waits for update t itself
    only at an evaluation, a checkpoint or the end, where it needs the state of t.
    """
    hooks = Hooks() if hooks is None else hooks
    _check_arguments(student, source, loop, teacher, hooks)
    storage.makedirs(workdir)
    shardings = state_shardings(mesh, student.config, student.optimizer)
    ckpt = checkpoints.Checkpointer(storage.join(workdir, "checkpoints"), loop.keep_checkpoints)
    writer = MetricsWriter(workdir)
    try:
        state, resumed = _initial_state(student, source, ckpt, shardings, loop.seed)
        start = resumed or 0
        writer.truncate_after(-1 if resumed is None else resumed)
        teacher_params = place_teacher(teacher, mesh)
        step_fn = make_train_step(
            student.config,
            student.optimizer,
            student.step_config,
            None if teacher is None else teacher.config,
            mesh,
            student.learning_rate_fn,
        )
        bar = Progress(loop.num_steps, start, enabled=loop.progress and jax.process_index() == 0)
        steps = _Steps(loop, ckpt, writer, bar)
        stopped = False
        with interrupt.handling():
            if start == 0 and hooks.eval_fn is not None:
                metrics = dict(hooks.eval_fn(0, state.params))
                writer.write(0, metrics)
                stopped = _run_hooks(hooks.stop, 0, metrics)
                if stopped:
                    ckpt.save(0, state, source.state_dict())
            done = start
            pending = None  # (step, device metrics) of the newest update, not yet read
            while done < loop.num_steps and not stopped:
                if pending is not None and _signalled():
                    # Update `done` is dispatched and its state not yet given to the next
                    # one: finish it and save it, as if the signal came after it.
                    steps.finish(*pending)
                    ckpt.save(done, state, source.state_dict())
                    stopped = True
                    break
                try:
                    batch = place_batch(mesh, source.next_batch(done, state.params))
                    state, device_metrics = step_fn(state, batch, teacher_params)
                except Exception:
                    if pending is not None:  # as before: the previous update is logged first
                        steps.finish(*pending)
                    raise
                done += 1
                if pending is not None:
                    steps.finish(*pending)  # waits for update done - 1 while done runs
                pending = (done, device_metrics)
                final = done == loop.num_steps
                evaluate = hooks.eval_fn is not None and loop.evaluates_at(done)
                if not (evaluate or final or done % loop.checkpoint_every == 0):
                    continue
                # This step's state is needed: read the step now, before the next one
                # takes (donates) the state.
                metrics, pending = steps.read(*pending), None
                if evaluate:
                    metrics.update(hooks.eval_fn(done, state.params))
                steps.log(done, metrics, always=evaluate or final)
                writer.flush()  # gs://: the metrics up to `done` land before its checkpoint
                stopped = (evaluate and _run_hooks(hooks.stop, done, metrics)) or _signalled()
                if final or stopped or done % loop.checkpoint_every == 0:
                    ckpt.save(done, state, source.state_dict())
            ckpt.wait_until_finished()
    finally:
        ckpt.close()
        writer.close()
    # A signal that came after the last update stopped nothing: the run is complete.
    interrupted = stopped and done < loop.num_steps and _signalled()
    return TrainResult(state, writer.path, stopped_early=stopped, interrupted=interrupted)

"""The training loop: `train` runs the jitted step of train_step.py over a batch source.

`train` resumes from the newest good checkpoint, writes one metrics line per step,
evaluates, runs stop hooks, saves periodically and on SIGTERM, and refuses to go on (or
save) after a non-finite loss. Batches come from a `BatchSource` (`ArraySource` here, the
distillation regimes of data/, built by `regimes.make_source`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from thack_jax import models
from thack_jax.models.config import T5Config
from thack_jax.parallel import partitioning
from thack_jax.training import checkpoints
from thack_jax.training.metrics_io import MetricsWriter, Progress
from thack_jax.training.train_state import (
    TrainState,
    abstract_state,
    create_train_state,
    single_device_shardings,
    state_shardings,
)
from thack_jax.training.train_step import StepConfig, make_train_step

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
    stopped_early: bool


def _place_batch(mesh, batch: Mapping) -> dict[str, jax.Array]:
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


def _run_hooks(hooks, step: int, metrics: Mapping[str, float]) -> bool:
    """Calls every hook (none is skipped); True when any asks to stop."""
    return any([bool(hook(step, metrics)) for hook in hooks])


class _StopSignal:
    """Sets a flag on SIGTERM (finish the step, save, exit); restores the old handler."""

    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        else:
            logger.warning("not in the main thread: SIGTERM will not checkpoint")
        return self

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: finishing this step, then checkpointing")
        self.received = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def train(
    *,
    workdir: str,
    student_config: T5Config,
    init_params,
    optimizer: optax.GradientTransformation,
    step_config: StepConfig,
    source: BatchSource,
    num_steps: int,
    teacher_config: T5Config | None = None,
    teacher_params=None,
    mesh=None,
    seed: int = 0,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 3,
    log_every: int = 1,
    eval_every: int = 0,
    eval_steps: Collection[int] = (),
    eval_fn: Callable[[int, Any], Mapping[str, float]] | None = None,
    hooks: Sequence[Callable[[int, Mapping[str, float]], bool]] = (),
    progress: bool = True,
    learning_rate_fn: Callable | None = None,
) -> TrainResult:
    """Trains until `num_steps` updates are done, resuming from `workdir/checkpoints`.

    Metric lines (`workdir/metrics.jsonl`) are keyed by the number of updates done: step k
    holds the train metrics of update k, plus eval metrics when `eval_fn(k, params)` ran at
    k (every `eval_every` steps, at each step in `eval_steps`, at the final step, and at
    step 0 before training, which gets its own line). `hooks(step, metrics) -> True`
    (called after each eval) stops the run early; so does SIGTERM. Either way a checkpoint
    of the current step is saved and the result has `stopped_early=True`. Checkpoints:
    every `checkpoint_every` steps and at the end, newest `keep_checkpoints` kept. Raises
    NonFiniteLossError on a NaN/Inf loss.
    """
    if num_steps < 0 or checkpoint_every < 1 or log_every < 0 or eval_every < 0:
        raise ValueError(
            f"need num_steps >= 0, checkpoint_every >= 1, log_every >= 0, "
            f"eval_every >= 0; got {num_steps}, {checkpoint_every}, {log_every}, "
            f"{eval_every}"
        )
    if step_config.objective == "distill" and (teacher_config is None) != (teacher_params is None):
        raise ValueError("pass both teacher_config and teacher_params, or neither")
    eval_steps = frozenset(int(s) for s in eval_steps)
    os.makedirs(workdir, exist_ok=True)
    shardings = state_shardings(mesh, student_config, optimizer)
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep_checkpoints)
    writer = MetricsWriter(workdir)
    try:
        shapes = abstract_state(student_config, optimizer)
        restored = ckpt.restore(checkpoints.abstract_target(shapes, shardings))
        if restored is not None:
            state, source_state, start = restored
            source.load_state_dict(source_state)
            logger.info("resumed from %s at step %d", ckpt.directory, start)
        else:
            _check_params(init_params, shapes.params, "init_params")
            # One compiled program instead of one per optimizer-state leaf, placed sharded.
            init = jax.jit(
                lambda p: create_train_state(p, optimizer, jax.random.key(seed)),
                out_shardings=shardings,
            )
            state = init(init_params)
            start = 0
        writer.truncate_after(start if restored is not None else -1)
        if teacher_params is not None:
            t_shapes = models.param_shapes(teacher_config)
            _check_params(teacher_params, t_shapes, "teacher_params")
            if mesh is None:
                t_sh = single_device_shardings(t_shapes)
            else:
                t_axes = models.param_axes(teacher_config)
                t_sh = partitioning.param_shardings(mesh, t_axes, t_shapes)
            teacher_params = jax.device_put(teacher_params, t_sh)
        step_fn = make_train_step(
            student_config, optimizer, step_config, teacher_config, mesh, learning_rate_fn
        )
        bar = Progress(num_steps, start, enabled=progress and jax.process_index() == 0)
        stopped = False
        with _StopSignal() as sigterm:
            if start == 0 and eval_fn is not None:
                metrics = dict(eval_fn(0, state.params))
                writer.write(0, metrics)
                stopped = _run_hooks(hooks, 0, metrics)
                if stopped:
                    ckpt.save(0, state, source.state_dict())
            done = start
            while done < num_steps and not stopped:
                batch = _place_batch(mesh, source.next_batch(done, state.params))
                state, metrics = step_fn(state, batch, teacher_params)
                done += 1
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                # A non-finite gradient norm means non-finite parameters after the update.
                if not np.isfinite([metrics["train/loss"], metrics["train/grad_norm"]]).all():
                    ckpt.wait_until_finished()  # keeps the last good checkpoint complete
                    raise NonFiniteLossError(done, metrics, ckpt.latest_step())
                final = done == num_steps
                evaluate = eval_fn is not None and (
                    final or done in eval_steps or (eval_every > 0 and done % eval_every == 0)
                )
                if evaluate:
                    metrics.update(eval_fn(done, state.params))
                if evaluate or final or (log_every > 0 and done % log_every == 0):
                    writer.write(done, metrics)
                bar.update(done, metrics)
                stopped = (evaluate and _run_hooks(hooks, done, metrics)) or sigterm.received
                if final or stopped or done % checkpoint_every == 0:
                    ckpt.save(done, state, source.state_dict())
            ckpt.wait_until_finished()
    finally:
        ckpt.close()
        writer.close()
    return TrainResult(state=state, metrics_path=writer.path, stopped_early=stopped)

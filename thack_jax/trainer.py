"""The distillation / SFT train step (jitted, sharded, state donated) and the training loop.

One step: the teacher's full-vocabulary log-probs (a frozen forward pass of `teacher_params`,
or `batch['teacher_logprobs']` given by the batch source) -> student forward/backward of a
token-level loss (losses.py) -> optax update. Losses are (sum, count) pairs, so the
gradient accumulated over microbatches and divided by the global token count equals the
gradient of one big batch.

The loop (`train`) resumes from the newest good checkpoint, writes one metrics line per
step, evaluates, runs stop hooks, saves periodically and on SIGTERM, and refuses to go on
(or save) after a non-finite loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from thack_jax import checkpoints, losses, models, partitioning
from thack_jax.metrics_io import MetricsWriter, Progress
from thack_jax.models.config import T5Config
from thack_jax.train_state import (
    TrainState,
    abstract_state,
    create_train_state,
    single_device_shardings,
    state_shardings,
)

logger = logging.getLogger(__name__)

OBJECTIVES = ("sft", "distill")
Batch = dict[str, Any]  # 'inputs' [B, Lx] int32, 'targets' [B, Ly] int32, opt. 'teacher_logprobs'


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What one train step computes (hashable, so it can key a jit cache).

    objective: 'sft' (cross-entropy on batch['targets']) or 'distill' (token-level `loss`
      from losses.LOSSES between teacher and student).
    loss_kwargs: options of the loss as (name, value) pairs (a dict is converted), e.g.
      (('beta', 0.1),) for 'jsd'.
    temperature: divides the teacher's and the student's logits inside the loss. Teacher
      log-probs given in the batch must already be tempered (the sampler's are).
    num_microbatches: the batch is split into this many microbatches whose gradients are
      accumulated (lax.scan) before one update.
    """

    objective: str = "distill"
    loss: str = "forward_kl"
    loss_kwargs: tuple = ()
    temperature: float = 1.0
    num_microbatches: int = 1

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {list(OBJECTIVES)}")
        kwargs = self.loss_kwargs
        if isinstance(kwargs, Mapping):
            kwargs = tuple(sorted(kwargs.items()))
            object.__setattr__(self, "loss_kwargs", kwargs)
        if "temperature" in dict(kwargs):
            raise ValueError("set the temperature with StepConfig.temperature, not loss_kwargs")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be an int >= 1, got {self.num_microbatches}")
        if self.objective == "distill":
            self.loss_fn()  # validates the loss name and options now, not at trace time

    def loss_fn(self) -> losses.LossFn:
        return losses.get_loss(self.loss, temperature=self.temperature, **dict(self.loss_kwargs))


def _check_batch(batch: Mapping, step_config: StepConfig, config: T5Config, has_teacher: bool):
    """Shape/dtype checks at trace time, with errors naming the key."""
    for key in ("inputs", "targets"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r}; keys: {sorted(batch)}")
        if batch[key].ndim != 2 or not jnp.issubdtype(batch[key].dtype, jnp.integer):
            raise ValueError(
                f"batch[{key!r}] must be [batch, length] int, got "
                f"{batch[key].dtype}{list(batch[key].shape)}"
            )
    b, ly = batch["targets"].shape
    if batch["inputs"].shape[0] != b:
        raise ValueError(f"batch sizes differ: inputs {batch['inputs'].shape}, targets {(b, ly)}")
    if b % step_config.num_microbatches:
        raise ValueError(
            f"batch size {b} is not divisible by num_microbatches {step_config.num_microbatches}"
        )
    if step_config.objective != "distill":
        return
    if "teacher_logprobs" in batch:
        want = (b, ly, config.vocab_size)
        if tuple(batch["teacher_logprobs"].shape) != want:
            raise ValueError(
                f"batch['teacher_logprobs'] shape {batch['teacher_logprobs'].shape}"
                f" != [batch, target length, student vocab] {want}"
            )
    elif not has_teacher:
        raise ValueError(
            "distillation needs teacher_config/teacher_params or batch['teacher_logprobs']"
        )


@functools.lru_cache(maxsize=16)
def make_train_step(
    student_config: T5Config,
    optimizer: optax.GradientTransformation,
    step_config: StepConfig,
    teacher_config: T5Config | None = None,
    mesh=None,
    learning_rate_fn: Callable | None = None,
):
    """Returns `step(state, batch, teacher_params) -> (state, metrics)`, jitted once.

    state: TrainState (donated); batch: {'inputs' [B, Lx] int32, 'targets' [B, Ly] int32,
    optional 'teacher_logprobs' [B, Ly, V] float32}; teacher_params: the frozen teacher's
    tree (None for SFT or when the batch carries teacher log-probs). With a `mesh` the state,
    batch and teacher follow the partitioning rules (in/out shardings); without one
    everything runs on the default device. metrics: 'train/loss' (per-token mean),
    'train/tokens', 'train/grad_norm' and, given `learning_rate_fn` (the optimizer's
    schedule), 'train/learning_rate' at this step.

    Results are cached on the (hashable) arguments, so repeated `train` calls in one
    process with the same optimizer object reuse one compiled step.
    """
    distill = step_config.objective == "distill"
    loss_fn = step_config.loss_fn() if distill else None
    if teacher_config is not None and teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(
            f"teacher vocab {teacher_config.vocab_size} != student vocab "
            f"{student_config.vocab_size}"
        )
    pad_id = student_config.pad_id

    def microbatch_loss(params, mb, teacher_params):
        """(loss_sum, num_tokens) of one microbatch."""
        targets = mb["targets"]
        mask = targets != pad_id
        logits = models.logits(student_config, params, mb["inputs"], targets)
        if not distill:
            return losses.cross_entropy(logits, targets, mask)
        if "teacher_logprobs" in mb:
            teacher = mb["teacher_logprobs"]
        else:
            t_logits = models.logits(teacher_config, teacher_params, mb["inputs"], targets)
            teacher = losses.log_softmax_with_temperature(t_logits, step_config.temperature)
        return loss_fn(jax.lax.stop_gradient(teacher), logits, mask)

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def accumulate(params, batch, teacher_params):
        """Summed loss, token count and summed (float32) gradients over microbatches."""
        m = step_config.num_microbatches
        if m == 1:
            (loss_sum, count), grads = grad_fn(params, batch, teacher_params)
            return loss_sum, count, grads
        # Microbatch j takes rows j, j + m, j + 2m, ...: each keeps a share of every
        # data-parallel shard, so no rows move between devices.
        split = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1), batch
        )
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(carry, mb):
            loss_acc, count_acc, grad_acc = carry
            (loss_sum, count), grads = grad_fn(params, mb, teacher_params)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
            return (loss_acc + loss_sum, count_acc + count, grad_acc), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, count, grads), _ = jax.lax.scan(body, init, split)
        return loss_sum, count, grads

    def step(state: TrainState, batch: Batch, teacher_params):
        _check_batch(batch, step_config, student_config, teacher_params is not None)
        rules = partitioning.flax_axis_rules(mesh) if mesh is not None else ()
        with _mesh_context(mesh), nn.logical_axis_rules(rules):
            loss_sum, count, grads = accumulate(state.params, batch, teacher_params)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": loss_sum / denom,
            "train/tokens": count,
            "train/grad_norm": optax.tree.norm(grads),
        }
        if learning_rate_fn is not None:
            metrics["train/learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    state_sh = state_shardings(mesh, student_config, optimizer)
    teacher_sh = None
    if teacher_config is not None:
        teacher_sh = partitioning.param_shardings(
            mesh, models.param_axes(teacher_config), models.param_shapes(teacher_config)
        )
    # One sharding for every batch array: rows over the data axes, other dims replicated.
    batch_sh = partitioning.batch_sharding(mesh, 1)
    rep = partitioning.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, teacher_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )


def _mesh_context(mesh):
    """Makes the mesh visible to flax's logical constraints while tracing under jit
    (`jax.set_mesh` may not be called inside jit; the abstract mesh may)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


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
    eval_fn: Callable[[int, Any], Mapping[str, float]] | None = None,
    hooks: Sequence[Callable[[int, Mapping[str, float]], bool]] = (),
    progress: bool = True,
    learning_rate_fn: Callable | None = None,
) -> TrainResult:
    """Trains until `num_steps` updates are done, resuming from `workdir/checkpoints`.

    Metric lines (`workdir/metrics.jsonl`) are keyed by the number of updates done: step k
    holds the train metrics of update k, plus eval metrics when `eval_fn(k, params)` ran at
    k (every `eval_every` steps, at the final step, and at step 0 before training, which
    gets its own line). `hooks(step, metrics) -> True` (called after each eval) stops the
    run early; so does SIGTERM. Either way a checkpoint of the current step is saved and
    the result has `stopped_early=True`. Checkpoints: every `checkpoint_every` steps and at
    the end, newest `keep_checkpoints` kept. Raises NonFiniteLossError on a NaN/Inf loss.
    """
    if num_steps < 0 or checkpoint_every < 1 or log_every < 0 or eval_every < 0:
        raise ValueError(
            f"need num_steps >= 0, checkpoint_every >= 1, log_every >= 0, "
            f"eval_every >= 0; got {num_steps}, {checkpoint_every}, {log_every}, "
            f"{eval_every}"
        )
    if step_config.objective == "distill" and (teacher_config is None) != (teacher_params is None):
        raise ValueError("pass both teacher_config and teacher_params, or neither")
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
                    final or (eval_every > 0 and done % eval_every == 0)
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

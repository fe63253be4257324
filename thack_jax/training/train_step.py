"""The distillation / SFT train step: jitted, sharded, state donated.

One step: the teacher's full-vocabulary log-probs (a frozen forward pass of `teacher_params`,
or `batch['teacher_logprobs']` given by the batch source) -> student forward/backward of a
token-level loss (losses.py) -> optax update. Losses are (sum, count) pairs, so the
gradient accumulated over microbatches and divided by the global token count equals the
gradient of one big batch. The loop that calls the step is trainer.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from thack_jax import models
from thack_jax.core import checks
from thack_jax.models.config import T5Config
from thack_jax.parallel import partitioning
from thack_jax.training import losses
from thack_jax.training.train_state import TrainState, state_shardings

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
      log-probs given in the batch must be log_softmax(teacher logits / temperature): the
      sampler's full log-probs qualify only when it sampled at this temperature without
      top-k / top-p (`SamplingConfig.gives_distillation_targets`; the online teacher source
      checks it).
    num_microbatches: the batch is split into this many microbatches whose gradients are
      accumulated (lax.scan) before one update.
    """

    objective: str = "distill"
    loss: str = "forward_kl"
    loss_kwargs: tuple = ()
    temperature: float = 1.0
    num_microbatches: int = 1

    def __post_init__(self):
        checks.choice(self, "objective", OBJECTIVES)
        kwargs = self.loss_kwargs
        if isinstance(kwargs, Mapping):
            kwargs = tuple(sorted(kwargs.items()))
            object.__setattr__(self, "loss_kwargs", kwargs)
        if "temperature" in dict(kwargs):
            raise ValueError("set the temperature with StepConfig.temperature, not loss_kwargs")
        checks.positive(self, "temperature")
        checks.integer(self, "num_microbatches", 1)
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
    batch and teacher follow the partitioning rules (in/out shardings) and the step runs
    under `partitioning.activate(mesh)` (a `partitioning.jit` function); without one
    everything runs on the default device. metrics: 'train/loss' (per-token mean),
    'train/tokens', 'train/grad_norm' and, given `learning_rate_fn` (the optimizer's
    schedule), 'train/learning_rate' at this step.

    Results are cached on the (hashable) arguments, so repeated `trainer.train` calls in
    one process with the same optimizer object reuse one compiled step.
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
        return partitioning.jit(step, None, donate_argnums=(0,))
    state_sh = state_shardings(mesh, student_config, optimizer)
    teacher_sh = None
    if teacher_config is not None:
        teacher_sh = partitioning.param_shardings(
            mesh, models.param_axes(teacher_config), models.param_shapes(teacher_config)
        )
    # One sharding for every batch array: rows over the data axes, other dims replicated.
    batch_sh = partitioning.batch_sharding(mesh, 1)
    rep = partitioning.replicated(mesh)
    # Called (and traced) under `partitioning.activate(mesh)`: the network's logical
    # constraints see the mesh and its axis rules.
    return partitioning.jit(
        step,
        mesh,
        in_shardings=(state_sh, batch_sh, teacher_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )

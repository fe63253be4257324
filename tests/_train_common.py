"""Shared setup of tests/training/ (test_train_step.py, test_trainer.py): a tiny config, one
optimizer object and two step configs, a toy data set, student and teacher parameters.

Compilations dominate the run time, so both test files share these objects
(`train_step.make_train_step` is cached on its arguments: the same optimizer object and
step config reuse one compiled step).
"""

import jax
import numpy as np
from _train_worker import fast_init_params, toy_data

from thack_jax import models
from thack_jax.training import losses, optim, train_step

CFG = models.get_config("tiny")
SCHEDULE = optim.make_schedule(1e-2, warmup_steps=2)
OPT = optim.make_optimizer(optim.OptimizerConfig("adamw", SCHEDULE))
SFT = train_step.StepConfig("sft")
DISTILL = train_step.StepConfig("distill", "forward_kl", temperature=2.0)
INPUTS, TARGETS = toy_data(CFG, num_examples=64)
STUDENT = fast_init_params(CFG, 0)
TEACHER = fast_init_params(CFG, 1)


def teacher_logprobs(batch, temperature):
    """The frozen teacher's tempered log-probs [B, Ly, V] of a batch (a writable copy)."""
    logits = jax.jit(models.logits, static_argnums=0)(
        CFG, TEACHER, batch["inputs"], batch["targets"]
    )
    return np.array(losses.log_softmax_with_temperature(logits, temperature))  # writable


def np_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]

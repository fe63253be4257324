"""Helpers for the trainer tests: fast parameter init, a toy data set, and a training worker.

Run as a script, it trains a tiny student (distillation from a frozen tiny teacher) in its
own process so that tests can SIGKILL / SIGTERM it and restart it:

    python tests/_train_worker.py --workdir DIR --num_steps 12 --checkpoint_every 3

It prints `RESULT {"step": ..., "stopped_early": ...}` on success.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported: the same 8 devices as the tests
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import time

import jax
import numpy as np

from thack_jax import models
from thack_jax.parallel import partitioning
from thack_jax.training import optim, train_step, trainer


def fast_init_params(config, seed: int) -> dict:
    """T5-like random parameters made with numpy (no XLA compilation; tests start fast).

    Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), relative-position tables ~ N(0, 0.1),
    layer-norm scales = 1.
    """
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = jax.tree_util.keystr(path)
        dtype = np.dtype(leaf.dtype)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, dtype)
        if name.endswith("['embedding']"):
            std = 1.0
        elif name.endswith("['rel_embedding']"):
            std = 0.1
        else:
            std = leaf.shape[0] ** -0.5
        return (std * rng.standard_normal(leaf.shape)).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, models.param_shapes(config))


def toy_data(config, num_examples: int = 64, input_len: int = 8, target_len: int = 8, seed=0):
    """A learnable toy task: targets = the first tokens of the input reversed, EOS, pads.

    Returns inputs [N, input_len], targets [N, target_len] int32 (pad 0, EOS 1).
    """
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, config.vocab_size, (num_examples, input_len)).astype(np.int32)
    lengths = rng.integers(2, target_len, num_examples)
    targets = np.zeros((num_examples, target_len), np.int32)
    for i, n in enumerate(lengths):
        targets[i, : n - 1] = inputs[i, : n - 1][::-1]
        targets[i, n - 1] = config.eos_id
    return inputs, targets


class SlowSource(trainer.ArraySource):
    """An ArraySource that sleeps before each batch (so a test can kill mid-run)."""

    def __init__(self, *args, sleep: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sleep = sleep

    def next_batch(self, step, student_params=None):
        time.sleep(self.sleep)
        return super().next_batch(step, student_params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_steps", type=int, default=12)
    parser.add_argument("--checkpoint_every", type=int, default=3)
    parser.add_argument("--step_sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("THACK_TEST_COMPILATION_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["THACK_TEST_COMPILATION_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    config = models.get_config("tiny")
    inputs, targets = toy_data(config)
    schedule = optim.make_schedule(3e-3, warmup_steps=2)
    student = trainer.Student(
        config,
        fast_init_params(config, 0),
        optim.make_optimizer(
            optim.OptimizerConfig("adafactor", schedule, multiply_by_parameter_scale=False)
        ),
        train_step.StepConfig("distill", "forward_kl"),
        learning_rate_fn=schedule,
    )
    result = trainer.train(
        workdir=args.workdir,
        student=student,
        source=SlowSource(inputs, targets, batch_size=8, seed=1, sleep=args.step_sleep),
        loop=trainer.LoopConfig(
            args.num_steps,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=2,
            progress=False,
        ),
        teacher=trainer.Teacher(config, fast_init_params(config, 1)),
        mesh=partitioning.make_mesh({"data": 4, "model": 2}),
    )
    summary = {"step": int(result.state.step), "stopped_early": result.stopped_early}
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

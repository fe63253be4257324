"""Multi-process training on CPU: 2 processes x 4 virtual devices == 1 process x 8 devices.

Each worker (the script below, run by `test_distributed.run_processes`) trains a tiny
student by distillation from a frozen tiny teacher, feeding only its own rows of every
global batch (`ArraySource` share -> `partitioning.shard_batch` ->
`jax.make_array_from_process_local_data`). The 1-process x 8-device run of the same script
is the reference: same initial parameters, same global batches, same meshes.

Checked: (a) the step-level path (`train_step.make_train_step`) on a `{'data': -1}` mesh and a
`{'data': 4, 'model': 2}` mesh (parameters sharded across the two processes), with two
microbatches; (b) the full loop `trainer.train` (orbax multi-host save, metrics written by
process 0 only), then a second `train` call that resumes from the multi-host checkpoint.

Tolerance: float32 with `highest` matmul precision; the only difference between the runs is
the order of the cross-device reductions (gloo all-reduce vs. in-process), so parameters
agree to ~1e-7 and the test allows max |diff| <= 1e-5.
"""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
from test_distributed import parse_result, run_processes

ATOL = 1e-5
STEP_MESHES = ("data", "data_model")  # {'data': -1}, {'data': 4, 'model': 2}

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from thack_jax.parallel import distributed
    distributed.initialize(initialization_timeout=60)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, "tests")  # cwd is the repository root
    from _train_worker import fast_init_params, toy_data
    from jax.experimental import multihost_utils
    from thack_jax.training import metrics_io
    from thack_jax import models
    from thack_jax.training import optim
    from thack_jax.parallel import partitioning
    from thack_jax.training import train_step
    from thack_jax.training import trainer
    from thack_jax.training.train_state import create_train_state, state_shardings

    import logging
    messages = []  # the trainer's log lines ("resumed from ... at step N")

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("thack_jax.training.trainer").addHandler(Keep())
    logging.getLogger("thack_jax.training.trainer").setLevel(logging.INFO)

    out, mode = os.environ["MH_OUT"], os.environ["MH_MODE"]
    rank, nproc = jax.process_index(), jax.process_count()
    config = models.get_config("tiny")
    inputs, targets = toy_data(config, num_examples=64)
    student, teacher = fast_init_params(config, 0), fast_init_params(config, 1)
    schedule = optim.make_schedule(3e-3, warmup_steps=2)
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", schedule, clip_norm=1.0))
    step_config = train_step.StepConfig("distill", "forward_kl", num_microbatches=2)
    meshes = {"data": {"data": -1}, "data_model": {"data": 4, "model": 2}}
    result = {"rank": rank, "process_count": nproc, "device_count": jax.device_count()}

    def flat(tree):
        tree = multihost_utils.process_allgather(tree, tiled=True)  # global numpy arrays
        return {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    if mode == "step":
        for name, shape in meshes.items():
            mesh = partitioning.make_mesh(shape)
            init = jax.jit(lambda p: create_train_state(p, opt, jax.random.key(0)),
                           out_shardings=state_shardings(mesh, config, opt))
            state = init(student)
            t_sh = partitioning.param_shardings(
                mesh, models.param_axes(config), models.param_shapes(config))
            teacher_dev = jax.device_put(teacher, t_sh)
            step_fn = train_step.make_train_step(config, opt, step_config, config, mesh, schedule)
            source = trainer.ArraySource(inputs, targets, batch_size=16, seed=1)
            losses, batches = [], []
            for i in range(4):
                local = source.next_batch(i)
                assert local["inputs"].shape == (16 // nproc, inputs.shape[1])
                batch = partitioning.shard_batch(mesh, local)
                assert batch["inputs"].shape == (16, inputs.shape[1])
                batches.append(flat(batch)["['inputs']"])
                state, metrics = step_fn(state, batch, teacher_dev)
                losses.append(float(metrics["train/loss"]))
            params = flat(state.params)
            if rank == 0:
                np.savez(os.path.join(out, f"step_{name}_{nproc}p.npz"),
                         losses=np.array(losses), batches=np.stack(batches), **params)
            result[name] = losses
    else:
        mesh = partitioning.make_mesh({"data": -1})
        workdir = os.path.join(out, f"train_{nproc}p")
        kwargs = dict(workdir=workdir, mesh=mesh,
                      student=trainer.Student(config, student, opt, step_config,
                                              learning_rate_fn=schedule),
                      teacher=trainer.Teacher(config, teacher))

        def loop(num_steps):
            return trainer.LoopConfig(num_steps, checkpoint_every=2, keep_checkpoints=2,
                                      progress=False)

        first = trainer.train(
            source=trainer.ArraySource(inputs, targets, batch_size=16, seed=1),
            loop=loop(4), **kwargs)
        distributed.barrier("first train call done")
        # A new source: its position comes back from the checkpoint of step 4.
        second = trainer.train(
            source=trainer.ArraySource(inputs, targets, batch_size=16, seed=1),
            loop=loop(6), **kwargs)
        params = flat(second.state.params)
        if rank == 0:
            np.savez(os.path.join(out, f"train_{nproc}p.npz"), **params)
        result.update(first_step=int(first.state.step), final_step=int(second.state.step),
                      metrics_path=second.metrics_path,
                      metrics_exists=os.path.exists(second.metrics_path),
                      resumed=[m for m in messages if m.startswith("resumed from")])
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def _run(tmp_path, mode: str, num_processes: int) -> list[dict]:
    devices = 8 // num_processes
    completed = run_processes(
        _WORKER,
        num_processes=num_processes,
        devices_per_process=devices,
        timeout_s=300,
        extra_env={"MH_OUT": str(tmp_path), "MH_MODE": mode},
    )
    results = [parse_result(c) for c in completed]
    for rank, res in enumerate(results):
        assert (res["rank"], res["process_count"], res["device_count"]) == (rank, num_processes, 8)
    return results


def _load(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _max_param_diff(a: dict, b: dict) -> float:
    params = sorted(k for k in a if k.startswith("["))
    assert params and params == sorted(k for k in b if k.startswith("["))
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in params)


@pytest.mark.slow
def test_train_step_two_processes_matches_one(tmp_path):
    multi = _run(tmp_path, "step", 2)
    single = _run(tmp_path, "step", 1)
    for name in STEP_MESHES:
        two = _load(tmp_path / f"step_{name}_2p.npz")
        one = _load(tmp_path / f"step_{name}_1p.npz")
        # Each process fed its half; the global batches are the single process's batches.
        np.testing.assert_array_equal(two["batches"], one["batches"])
        # Both processes saw the same (replicated) losses.
        assert multi[0][name] == multi[1][name]
        np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=ATOL)
        diff = _max_param_diff(two, one)
        print(f"mesh {name}: max |param diff| 2 processes vs 1 = {diff:.2e}")
        assert diff <= ATOL, name
        assert one["losses"][-1] < one["losses"][0]  # it trained
    assert single[0]["data"] == pytest.approx(single[0]["data_model"], abs=ATOL)


@pytest.mark.slow
def test_full_train_loop_two_processes_matches_one(tmp_path):
    multi = _run(tmp_path, "train", 2)
    _run(tmp_path, "train", 1)
    for res in multi:
        assert (res["first_step"], res["final_step"]) == (4, 6)
        # The second call restored the multi-host checkpoint of step 4 on every process.
        assert len(res["resumed"]) == 1 and res["resumed"][0].endswith("at step 4")
    assert multi[0]["metrics_exists"]
    two, one = _load(tmp_path / "train_2p.npz"), _load(tmp_path / "train_1p.npz")
    diff = _max_param_diff(two, one)
    print(f"train loop: max |param diff| 2 processes vs 1 = {diff:.2e}")
    assert diff <= ATOL
    # Process 0 wrote one metrics line per step (steps 1..6, the resumed run appended).
    with open(multi[0]["metrics_path"], encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # Orbax wrote the checkpoints of both processes into one directory (keep 2: steps 4, 6).
    ckpt_dir = os.path.join(tmp_path, "train_2p", "checkpoints")
    assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [4, 6]

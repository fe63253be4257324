"""Tests of thack_jax.training.trainer: the array batch source and the loop (resume, metrics,
evaluation, hooks, NaN, SIGTERM, SIGKILL). The step itself is tested in test_train_step.py;
shared setup is in _train_common.py.
"""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _train_common import (
    CFG,
    DISTILL,
    INPUTS,
    OPT,
    SCHEDULE,
    SFT,
    STUDENT,
    TARGETS,
    TEACHER,
    np_leaves,
    teacher_logprobs,
)
from _train_worker import fast_init_params

from thack_jax import models
from thack_jax.training import checkpoints, trainer
from thack_jax.training.metrics_io import read_metrics

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_train_worker.py")


# ------------------------------------------------------------------------------- source


def test_array_source_epochs_and_exact_resume():
    source = trainer.ArraySource(INPUTS[:20], TARGETS[:20], batch_size=8, seed=3)
    epoch0 = [source.next_batch(i)["inputs"] for i in range(2)]  # 16 of 20 rows, then new epoch
    first = source.next_batch(2)["inputs"]
    assert source.state_dict()["epoch"] == 1
    rows0 = {tuple(r) for b in epoch0 for r in b}
    assert len(rows0) == 16 and rows0 <= {tuple(r) for r in INPUTS[:20]}
    saved = json.loads(json.dumps(source.state_dict()))
    later = [source.next_batch(i)["inputs"] for i in range(3, 8)]
    resumed = trainer.ArraySource(INPUTS[:20], TARGETS[:20], batch_size=8, seed=3)
    resumed.load_state_dict(saved)
    for i, want in enumerate(later):
        np.testing.assert_array_equal(resumed.next_batch(i + 3)["inputs"], want)
    # Each epoch is a fresh permutation.
    assert not np.array_equal(first, epoch0[0])
    with pytest.raises(ValueError, match="seed=3, this source has 4"):
        trainer.ArraySource(INPUTS[:20], TARGETS[:20], 8, seed=4).load_state_dict(saved)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.ArraySource(INPUTS[:4], TARGETS[:4], batch_size=8)


# ----------------------------------------------------------------------------- the loop


def _train(workdir, num_steps, source=None, teacher=True, hooks=None, **loop):
    """The tiny distillation run; `loop` holds LoopConfig fields."""
    return trainer.train(
        workdir=str(workdir),
        student=trainer.Student(CFG, STUDENT, OPT, DISTILL, learning_rate_fn=SCHEDULE),
        source=source or trainer.ArraySource(INPUTS, TARGETS, batch_size=8, seed=0),
        loop=trainer.LoopConfig(num_steps, progress=False, **loop),
        teacher=trainer.Teacher(CFG, TEACHER) if teacher else None,
        hooks=hooks,
    )


def test_loop_resume_eval_and_corrupted_checkpoint(tmp_path, caplog):
    evals = []

    def eval_fn(step, params):
        evals.append(step)
        return {
            "eval/norm": float(
                np.linalg.norm(np.asarray(params["encoder"]["encoder_norm"]["scale"]))
            )
        }

    hooks = trainer.Hooks(eval_fn)
    result = _train(tmp_path, 4, hooks=hooks, checkpoint_every=2, eval_every=3)
    assert evals == [0, 3, 4] and not result.stopped_early
    assert checkpoints.all_steps(str(tmp_path / "checkpoints")) == [2, 4]
    # Corrupt the newest checkpoint: the next run resumes from step 2 and redoes 3..6.
    os.remove(str(tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt"))
    with caplog.at_level(logging.WARNING, logger="thack_jax.training.checkpoints"):
        result = _train(tmp_path, 6, hooks=hooks, checkpoint_every=2, eval_every=3)
    assert any("checkpoints/4" in r.getMessage() for r in caplog.records)
    assert evals == [0, 3, 4, 3, 6]
    assert int(result.state.step) == 6
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == list(range(7))  # each step exactly once
    assert "eval/norm" in rows[0] and "train/loss" not in rows[0]
    assert "eval/norm" in rows[3] and "eval/norm" not in rows[4]
    assert {"train/loss", "train/tokens", "train/grad_norm", "train/learning_rate"} <= set(rows[5])


def test_hook_stops_after_an_eval(tmp_path):
    calls = []

    def hook(step, metrics):
        calls.append(step)
        return step >= 2

    result = _train(
        tmp_path,
        10,
        hooks=trainer.Hooks(eval_fn=lambda s, p: {"eval/x": 1.0}, stop=(hook,)),
        checkpoint_every=5,
        eval_every=2,
    )
    assert result.stopped_early and int(result.state.step) == 2 and calls == [0, 2]
    assert checkpoints.latest_step(str(tmp_path / "checkpoints")) == 2


class _NaNAt(trainer.ArraySource):
    """Teacher log-probs in the batch, NaN in the batch of step `bad`."""

    def __init__(self, bad):
        super().__init__(INPUTS, TARGETS, batch_size=8, seed=0)
        self.bad = bad

    def next_batch(self, step, student_params=None):
        batch = super().next_batch(step, student_params)
        logprobs = teacher_logprobs(batch, DISTILL.temperature)
        if step == self.bad:
            logprobs[:] = np.nan
        return {**batch, "teacher_logprobs": logprobs}


@pytest.mark.parametrize(
    "bad, every, kept",
    [
        (2, 2, [2]),  # update 3 is read after update 4 (a checkpoint step) is dispatched
        (3, 2, [2]),  # update 4 is a checkpoint step: read before anything else
        (4, 2, [2, 4]),  # update 5 is read after update 6 (the final step) is dispatched
        (0, 3, []),  # update 1 is read after update 2 (a plain step) is dispatched
    ],
)
def test_non_finite_loss_names_the_first_bad_step_and_keeps_an_earlier_checkpoint(
    tmp_path, bad, every, kept
):
    first_bad = bad + 1  # the batch of step `bad` is the one of update bad + 1
    last = kept[-1] if kept else None
    with pytest.raises(
        trainer.NonFiniteLossError, match=f"non-finite loss at step {first_bad}"
    ) as info:
        _train(tmp_path, 6, source=_NaNAt(bad=bad), teacher=False, checkpoint_every=every)
    assert info.value.step == first_bad and info.value.last_checkpoint == last
    assert f"last good checkpoint is step {last}" in str(info.value)
    # No checkpoint of the bad update nor of the one dispatched after it; the kept one is
    # complete (restorable) and finite.
    directory = str(tmp_path / "checkpoints")
    assert checkpoints.all_steps(directory) == kept
    if kept:
        params = checkpoints.restore_params(directory, last, models.param_shapes(CFG))
        assert all(np.isfinite(leaf).all() for leaf in np_leaves(params))
    written = read_metrics(str(tmp_path)) if os.path.exists(tmp_path / "metrics.jsonl") else []
    assert [r["step"] for r in written] == list(range(1, first_bad))


def test_next_update_is_dispatched_before_the_metrics_are_read(tmp_path, monkeypatch):
    """Update t's metrics are fetched only after update t + 1 is dispatched, except at the
    steps that need their state (here the checkpoint step 3 and the final step 5)."""
    events, dispatched = [], {}  # dispatched: id(metrics dict) -> (update, the dict)
    real_make, real_get = trainer.make_train_step, jax.device_get

    def make_recording_step(*args):
        step_fn = real_make(*args)

        def step(state, batch, teacher_params):
            state, metrics = step_fn(state, batch, teacher_params)
            update = len(dispatched) + 1
            dispatched[id(metrics)] = (update, metrics)  # keeps the dict (and its id) alive
            events.append(f"dispatch {update}")
            return state, metrics

        return step

    def recording_get(tree):
        if id(tree) in dispatched:
            events.append(f"read {dispatched[id(tree)][0]}")
        return real_get(tree)

    monkeypatch.setattr(trainer, "make_train_step", make_recording_step)
    monkeypatch.setattr(jax, "device_get", recording_get)
    result = _train(tmp_path, 5, checkpoint_every=3)
    assert events == (
        ["dispatch 1", "dispatch 2", "read 1", "dispatch 3", "read 2", "read 3"]
        + ["dispatch 4", "dispatch 5", "read 4", "read 5"]
    )
    assert int(result.state.step) == 5
    assert [r["step"] for r in read_metrics(result.metrics_path)] == [1, 2, 3, 4, 5]


class _SigtermAt(trainer.ArraySource):
    """Sends this process SIGTERM while the batch of step `at` is being made."""

    def __init__(self, at):
        super().__init__(INPUTS, TARGETS, batch_size=8, seed=0)
        self.at = at

    def next_batch(self, step, student_params=None):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().next_batch(step, student_params)


def test_sigterm_saves_the_update_in_flight_and_stops(tmp_path):
    # The signal comes while update 4's batch is made: update 4 is finished, logged and
    # saved (as by the loop that read every step at once), nothing after it.
    result = _train(tmp_path, 10, source=_SigtermAt(3), checkpoint_every=100)
    assert result.stopped_early and int(result.state.step) == 4
    assert checkpoints.all_steps(str(tmp_path / "checkpoints")) == [4]
    assert [r["step"] for r in read_metrics(result.metrics_path)] == [1, 2, 3, 4]


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="LoopConfig.num_steps=-1 must be an integer >= 0"):
        trainer.LoopConfig(-1)
    with pytest.raises(ValueError, match="LoopConfig.checkpoint_every=0 must be an integer >= 1"):
        trainer.LoopConfig(5, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"LoopConfig.eval_steps\[...\]=-1 must be an int"):
        trainer.LoopConfig(5, eval_steps=(3, -1))
    with pytest.raises(TypeError, match="LoopConfig.log_every=1.5 must be an integer"):
        trainer.LoopConfig(5, log_every=1.5)
    assert trainer.LoopConfig(5, eval_steps=[4, 2]).eval_steps == frozenset({2, 4})
    with pytest.raises(ValueError, match="Hooks.stop is given but Hooks.eval_fn is None"):
        trainer.Hooks(stop=(lambda step, metrics: False,))
    with pytest.raises(TypeError, match=r"Hooks.stop\[0\] must be callable"):
        trainer.Hooks(eval_fn=lambda s, p: {}, stop=(3,))
    with pytest.raises(ValueError, match="Student.init_params is None"):
        trainer.Student(CFG, None, OPT, SFT)
    with pytest.raises(TypeError, match="Student.step_config='sft' must be of type StepConfig"):
        trainer.Student(CFG, STUDENT, OPT, "sft")
    with pytest.raises(TypeError, match="Teacher.config='tiny' must be of type T5Config"):
        trainer.Teacher("tiny", TEACHER)
    with pytest.raises(TypeError, match="train: loop must be a trainer.LoopConfig"):
        trainer.train(
            workdir="unused",
            student=trainer.Student(CFG, STUDENT, OPT, SFT),
            source=trainer.ArraySource(INPUTS, TARGETS, 8),
            loop={"num_steps": 1},
        )


def test_wrong_init_params_are_named(tmp_path):
    bad = fast_init_params(CFG.replace(d_ff=16), 0)
    with pytest.raises(ValueError, match=r"init_params do not match(.|\n)*wi_0.*float32\[32, 64\]"):
        trainer.train(
            workdir=str(tmp_path),
            student=trainer.Student(CFG, bad, OPT, SFT),
            source=trainer.ArraySource(INPUTS, TARGETS, 8),
            loop=trainer.LoopConfig(1, progress=False),
        )


# --------------------------------------------------------------- crashes (subprocesses)


def _start_worker(workdir, cache, *args):
    env = dict(os.environ, THACK_TEST_COMPILATION_CACHE=str(cache))
    return subprocess.Popen(
        [sys.executable, WORKER, "--workdir", str(workdir), "--num_steps", "12", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _wait_for_step(proc, workdir, step, timeout=600):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"worker exited early:\n{proc.stderr.read()[-3000:]}"
        if os.path.exists(path):
            steps = [r["step"] for r in read_metrics(path)]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"worker did not reach step {step}")


def _final_params(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return checkpoints.restore_params(directory, 12, models.param_shapes(CFG))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step worker run: its final parameters and the compile cache."""
    root = tmp_path_factory.mktemp("reference")
    cache = root / "compilation_cache"
    assert _finish(_start_worker(root / "run", cache)) == {"step": 12, "stopped_early": False}
    return np_leaves(_final_params(str(root / "run"))), cache


def _assert_bitwise(params, reference_leaves):
    for a, b in zip(np_leaves(params), reference_leaves, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)  # bitwise, not approximately


@pytest.mark.slow
def test_sigkill_then_restart_is_bitwise_identical(tmp_path, reference):
    ref_leaves, cache = reference
    kill_after = random.Random().randint(2, 10)
    proc = _start_worker(tmp_path, cache, "--step_sleep", "0.3")
    _wait_for_step(proc, str(tmp_path), kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _finish(_start_worker(tmp_path, cache)) == {"step": 12, "stopped_early": False}
    _assert_bitwise(_final_params(str(tmp_path)), ref_leaves)
    steps = [r["step"] for r in read_metrics(str(tmp_path))]
    assert steps == list(range(1, 13)), f"killed after step {kill_after}: {steps}"


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes(tmp_path, reference):
    ref_leaves, cache = reference
    proc = _start_worker(tmp_path, cache, "--step_sleep", "0.3", "--checkpoint_every", "100")
    _wait_for_step(proc, str(tmp_path), 4)
    proc.send_signal(signal.SIGTERM)
    result = _finish(proc)
    assert result["stopped_early"] and 4 <= result["step"] < 12
    assert checkpoints.latest_step(str(tmp_path / "checkpoints")) == result["step"]
    assert _finish(_start_worker(tmp_path, cache)) == {"step": 12, "stopped_early": False}
    _assert_bitwise(_final_params(str(tmp_path)), ref_leaves)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(1, 13))


def test_eval_steps_schedule(tmp_path):
    evals = []

    def eval_fn(step, params):
        evals.append(step)
        return {"eval/step": float(step)}

    # Listed steps and multiples of eval_every, plus step 0 and the final step; steps past
    # the end are ignored.
    _train(
        tmp_path,
        7,
        hooks=trainer.Hooks(eval_fn),
        checkpoint_every=10,
        eval_every=4,
        eval_steps=(1, 2, 5, 99),
    )
    assert evals == [0, 1, 2, 4, 5, 7]

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


def _train(workdir, num_steps, source=None, teacher=True, **kwargs):
    return trainer.train(
        workdir=str(workdir),
        student_config=CFG,
        init_params=STUDENT,
        optimizer=OPT,
        step_config=DISTILL,
        source=source or trainer.ArraySource(INPUTS, TARGETS, batch_size=8, seed=0),
        num_steps=num_steps,
        teacher_config=CFG if teacher else None,
        teacher_params=TEACHER if teacher else None,
        progress=False,
        learning_rate_fn=SCHEDULE,
        **kwargs,
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

    result = _train(tmp_path, 4, checkpoint_every=2, eval_every=3, eval_fn=eval_fn)
    assert evals == [0, 3, 4] and not result.stopped_early
    assert checkpoints.all_steps(str(tmp_path / "checkpoints")) == [2, 4]
    # Corrupt the newest checkpoint: the next run resumes from step 2 and redoes 3..6.
    os.remove(str(tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt"))
    with caplog.at_level(logging.WARNING, logger="thack_jax.training.checkpoints"):
        result = _train(tmp_path, 6, checkpoint_every=2, eval_every=3, eval_fn=eval_fn)
    assert any("checkpoints/4" in r.getMessage() for r in caplog.records)
    assert evals == [0, 3, 4, 3, 6]
    assert int(result.state.step) == 6
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == list(range(7))  # each step exactly once
    assert "eval/norm" in rows[0] and "train/loss" not in rows[0]
    assert "eval/norm" in rows[3] and "eval/norm" not in rows[4]
    assert {"train/loss", "train/tokens", "train/grad_norm", "train/learning_rate"} <= set(rows[5])


def test_sigterm_handler_sets_a_flag_and_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with trainer._StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not stop.received and time.time() < deadline:
            time.sleep(0.01)
        assert stop.received
    assert signal.getsignal(signal.SIGTERM) is before


def test_hook_stops_after_an_eval(tmp_path):
    calls = []

    def hook(step, metrics):
        calls.append(step)
        return step >= 2

    result = _train(
        tmp_path,
        10,
        checkpoint_every=5,
        eval_every=2,
        eval_fn=lambda s, p: {"eval/x": 1.0},
        hooks=(hook,),
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


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(trainer.NonFiniteLossError, match="non-finite loss at step 3") as info:
        _train(tmp_path, 6, source=_NaNAt(bad=2), teacher=False, checkpoint_every=2)
    assert info.value.step == 3 and info.value.last_checkpoint == 2
    assert "last good checkpoint is step 2" in str(info.value)
    assert checkpoints.all_steps(str(tmp_path / "checkpoints")) == [2]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]


def test_wrong_init_params_are_named(tmp_path):
    bad = fast_init_params(CFG.replace(d_ff=16), 0)
    with pytest.raises(ValueError, match=r"init_params do not match(.|\n)*wi_0.*float32\[32, 64\]"):
        trainer.train(
            workdir=str(tmp_path),
            student_config=CFG,
            init_params=bad,
            optimizer=OPT,
            step_config=SFT,
            source=trainer.ArraySource(INPUTS, TARGETS, 8),
            num_steps=1,
            progress=False,
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
        tmp_path, 7, checkpoint_every=10, eval_every=4, eval_steps=(1, 2, 5, 99), eval_fn=eval_fn
    )
    assert evals == [0, 1, 2, 4, 5, 7]

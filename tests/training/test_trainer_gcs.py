"""The training loop on a gs:// workdir of the local GCS server (tests/_gcs.py): metrics,
TensorBoard events and orbax checkpoints land in the bucket, a rerun resumes from them,
and nothing is written to a local folder named `gs:`. Shared setup: _train_common.py."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _train_common import CFG, DISTILL, INPUTS, OPT, SCHEDULE, STUDENT, TARGETS, TEACHER, np_leaves

from thack_jax.core import storage
from thack_jax.training import checkpoints, metrics_io, trainer
from thack_jax.training.metrics_io import read_metrics

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_train_worker.py")


def _train(workdir, num_steps, hooks):
    return trainer.train(
        workdir=workdir,
        student=trainer.Student(CFG, STUDENT, OPT, DISTILL, learning_rate_fn=SCHEDULE),
        source=trainer.ArraySource(INPUTS, TARGETS, batch_size=8, seed=0),
        loop=trainer.LoopConfig(num_steps, checkpoint_every=2, eval_every=3, progress=False),
        teacher=trainer.Teacher(CFG, TEACHER),
        hooks=hooks,
    )


def _eval_hooks(evals):
    def eval_fn(step, params):
        evals.append(step)
        return {
            "eval/norm": float(
                np.linalg.norm(np.asarray(params["decoder"]["decoder_norm"]["scale"]))
            )
        }

    return trainer.Hooks(eval_fn)


def test_training_on_gcs_writes_the_bucket_and_resumes(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = gcs_bucket + "/run"
    ckpt_dir = workdir + "/checkpoints"
    evals = []
    first = _train(workdir, 4, _eval_hooks(evals))
    assert first.metrics_path == workdir + "/metrics.jsonl"
    assert checkpoints.all_steps(ckpt_dir) == [2, 4]
    assert [r["step"] for r in read_metrics(workdir)] == list(range(5))
    tb_dir = storage.join(workdir, metrics_io.TENSORBOARD_DIR)
    assert len(storage.listdir(tb_dir)) == 1
    # The rerun resumes from the bucket's step 4: no evaluation at 0 or 3 again.
    resumed = _train(workdir, 6, _eval_hooks(evals))
    assert evals == [0, 3, 4, 6] and int(resumed.state.step) == 6
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(7))  # each step exactly once
    assert "eval/norm" in rows[6] and "train/loss" in rows[5]
    assert checkpoints.all_steps(ckpt_dir) == [2, 4, 6]
    assert len(storage.listdir(tb_dir)) == 2  # the resumed run's own event file
    # The same state as one uninterrupted local run.
    local = _train(str(tmp_path / "local"), 6, _eval_hooks([]))
    for a, b in zip(np_leaves(resumed.state), np_leaves(local.state), strict=True):
        assert np.array_equal(a, b)
    # Equal train metrics (the first run's final step 4 also has an evaluation).
    local_rows = read_metrics(str(tmp_path / "local"))
    assert [r.get("train/loss") for r in local_rows] == [r.get("train/loss") for r in rows]
    assert not os.path.exists(tmp_path / "gs:")


def _worker(workdir, cache, *args):
    """tests/_train_worker.py on `workdir` (6 steps, a checkpoint every 3); it inherits the
    emulator environment. `cache`: a compilation cache, so the rerun compiles nothing."""
    command = [sys.executable, WORKER, "--workdir", workdir, "--num_steps", "6", *args]
    env = dict(os.environ, THACK_TEST_COMPILATION_CACHE=str(cache))
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_sigkill_on_gcs_then_rerun_logs_each_step_once(gcs_bucket, tmp_path, monkeypatch):
    """A worker process killed after its first checkpoint in the bucket: the rerun (another
    process, the same gs:// workdir) resumes and each step is logged exactly once."""
    monkeypatch.chdir(tmp_path)
    workdir, cache = gcs_bucket + "/run", tmp_path / "compilation_cache"
    proc = _worker(workdir, cache, "--step_sleep", "0.5")
    deadline = time.time() + 120
    while (checkpoints.latest_step(workdir + "/checkpoints") or 0) < 3:
        assert proc.poll() is None, f"worker exited early:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the worker wrote no checkpoint in 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = _worker(workdir, cache)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert '"step": 6' in out
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 7))
    assert not os.path.exists(tmp_path / "gs:")

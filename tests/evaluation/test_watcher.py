"""Tests of thack_jax.evaluation.watcher: the checkpoint watcher's exactly-once protocol
(in-process, fast; launch/eval.py in subprocesses is tests/cli/test_eval_cli.py)."""

import json
import os

import numpy as np
import pytest
from test_divergences import EOS, V, random_params  # noqa: E402
from test_evaluator import make_evaluator, make_trio, prompts_  # noqa: E402

from thack_jax import models
from thack_jax.core import storage
from thack_jax.evaluation import watcher
from thack_jax.training import checkpoints
from thack_jax.training.metrics_io import read_metrics


@pytest.fixture(scope="module")
def trio():
    return make_trio()


class CountingEvaluator:
    """Stands in for Evaluator in watcher tests: records which params it was given."""

    def __init__(self, config, fail_on_call=None):
        self.student_config = config
        self.calls = []
        self.fail_on_call = fail_on_call

    def param_shardings(self, config):
        return None

    def evaluate(self, params):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt  # an interruption in the middle of an evaluation
        value = float(np.asarray(params["decoder"]["logits_dense"]["kernel"]).sum())
        self.calls.append(value)
        return {"proxy/forward_kl": value}


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory):
    """A workdir with student checkpoints at steps 10, 20, 30 (distinct params)."""
    workdir = tmp_path_factory.mktemp("run")
    config = models.get_config("tiny", vocab_size=V)
    sums = _save_steps(str(workdir / "checkpoints"), config)
    return workdir, config, sums


def _save_steps(directory: str, config) -> dict[int, float]:
    """Student checkpoints at steps 10, 20, 30 (distinct params) -> {step: a param sum}."""
    ckpt = checkpoints.Checkpointer(directory, max_to_keep=None, async_save=False)
    sums = {}
    for step in (10, 20, 30):
        params = random_params(config, step)
        ckpt.save(step, {"params": params})
        sums[step] = float(np.asarray(params["decoder"]["logits_dense"]["kernel"]).sum())
    ckpt.close()
    return sums


def fresh_workdir(tmp_path, saved_steps):
    """A copy of the saved workdir (checkpoints only) so tests do not share eval state."""
    import shutil

    src, config, sums = saved_steps
    dst = tmp_path / "run"
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst, config, sums


def logged_steps(workdir):
    return [row["step"] for row in read_metrics(str(workdir / watcher.EVAL_METRICS_FILE))]


def state_steps(workdir):
    with open(workdir / watcher.EVAL_STATE_FILE) as f:
        return json.load(f)["evaluated_steps"]


def test_watch_evaluates_each_step_once_across_interruptions(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    interrupted = CountingEvaluator(config, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        watcher.watch(str(workdir), interrupted, poll_seconds=0.01, timeout=0.2)
    assert logged_steps(workdir) == [10] and state_steps(workdir) == [10]
    # Restart: only the remaining steps, in order, each with its own params.
    ev = CountingEvaluator(config)
    done = watcher.watch(str(workdir), ev, poll_seconds=0.01, timeout=0.2)
    assert done == [10, 20, 30]
    assert ev.calls == [sums[20], sums[30]]
    assert logged_steps(workdir) == [10, 20, 30] and state_steps(workdir) == [10, 20, 30]
    rows = read_metrics(str(workdir / watcher.EVAL_METRICS_FILE))
    assert [r["proxy/forward_kl"] for r in rows] == [sums[10], sums[20], sums[30]]
    # A third run has nothing to do.
    again = CountingEvaluator(config)
    watcher.watch(str(workdir), again, poll_seconds=0.01, timeout=0.1)
    assert again.calls == []


def test_watch_recovers_from_a_crash_between_metrics_and_state(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    # Step 20's line was written but the state not updated; then a line cut short.
    with open(workdir / watcher.EVAL_METRICS_FILE, "w") as f:
        f.write('{"step": 10, "proxy/forward_kl": 1.0}\n{"step": 20, "proxy/forward_kl": 2.0}\n')
        f.write('{"step": 30, "proxy/for')
    with open(workdir / watcher.EVAL_STATE_FILE, "w") as f:
        json.dump({"evaluated_steps": [10]}, f)
    ev = CountingEvaluator(config)
    watcher.watch(str(workdir), ev, poll_seconds=0.01, timeout=0.1)
    assert ev.calls == [sums[30]]
    assert logged_steps(workdir) == [10, 20, 30] and state_steps(workdir) == [10, 20, 30]


def test_watch_waits_for_a_checkpoint_being_written(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    final = workdir / "checkpoints" / "30"
    partial = workdir / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
    final.rename(partial)  # what orbax shows while step 30 is being written
    ev = CountingEvaluator(config)
    assert watcher.watch(str(workdir), ev, poll_seconds=0.01, timeout=0.1) == [10, 20]
    partial.rename(final)  # the save finished
    done = watcher.watch(str(workdir), ev, poll_seconds=0.01, timeout=5, stop_after_step=30)
    assert done == [10, 20, 30] and ev.calls == [sums[10], sums[20], sums[30]]


def test_watch_stop_after_step_and_missing_checkpoints(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    ev = CountingEvaluator(config)
    # stop_after_step returns as soon as it is evaluated (no timeout needed).
    assert watcher.watch(str(workdir), ev, poll_seconds=0.01, stop_after_step=20) == [10, 20]
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        watcher.watch(str(empty), ev, poll_seconds=0.01, timeout=0.05)
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        watcher.watch(str(empty), ev, poll_seconds=0.01, timeout=0.05)


def test_watch_with_the_real_evaluator(tmp_path, saved_steps, trio):
    workdir, config, _ = fresh_workdir(tmp_path, saved_steps)
    ev = make_evaluator(trio, prompts_(4))
    assert watcher.watch(str(workdir), ev, poll_seconds=0.01, stop_after_step=20) == [10, 20]
    rows = read_metrics(str(workdir / watcher.EVAL_METRICS_FILE))
    params = checkpoints.restore_params(
        str(workdir / "checkpoints"), 20, models.param_shapes(config)
    )
    assert rows[1] == {"step": 20, **ev.evaluate(params)}
    assert EOS == config.eos_id


# ------------------------------------------------------------- gs:// (tests/_gcs.py)


@pytest.fixture
def gcs_run(gcs_bucket, tmp_path, monkeypatch):
    """A gs:// workdir with student checkpoints at steps 10, 20, 30, written by orbax into
    the local GCS server; the cwd is tmp_path, where no `gs:` folder may appear."""
    monkeypatch.chdir(tmp_path)
    workdir = gcs_bucket + "/run"
    config = models.get_config("tiny", vocab_size=V)
    sums = _save_steps(workdir + "/checkpoints", config)
    yield workdir, config, sums
    assert not os.path.exists(tmp_path / "gs:")


def _remote_logged(workdir):
    return [row["step"] for row in read_metrics(storage.join(workdir, watcher.EVAL_METRICS_FILE))]


def _remote_state(workdir):
    return storage.read_json(storage.join(workdir, watcher.EVAL_STATE_FILE))["evaluated_steps"]


def test_watch_on_gcs_evaluates_each_step_once_across_interruptions(gcs_run):
    workdir, config, sums = gcs_run
    interrupted = CountingEvaluator(config, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        watcher.watch(workdir, interrupted, poll_seconds=0.01, timeout=0.2)
    # Step 10's line is in the bucket (uploaded before the state), step 20 was never done.
    assert _remote_logged(workdir) == [10] and _remote_state(workdir) == [10]
    ev = CountingEvaluator(config)
    assert watcher.watch(workdir, ev, poll_seconds=0.01, timeout=0.2) == [10, 20, 30]
    assert ev.calls == [sums[20], sums[30]]  # each step's own params, read from the bucket
    assert _remote_logged(workdir) == [10, 20, 30] and _remote_state(workdir) == [10, 20, 30]
    rows = read_metrics(storage.join(workdir, watcher.EVAL_METRICS_FILE))
    assert [r["proxy/forward_kl"] for r in rows] == [sums[10], sums[20], sums[30]]


def test_watch_on_gcs_waits_for_an_unfinished_step(gcs_run):
    workdir, config, sums = gcs_run
    marker = workdir + "/checkpoints/30/commit_success.txt"
    content = storage.read_bytes(marker)
    storage.remove(marker)  # what step 30 looks like on GCS while orbax still writes it
    ev = CountingEvaluator(config)
    assert watcher.watch(workdir, ev, poll_seconds=0.01, timeout=0.1) == [10, 20]
    storage.write_atomic(marker, content)  # the save finished
    done = watcher.watch(workdir, ev, poll_seconds=0.01, timeout=5, stop_after_step=30)
    assert done == [10, 20, 30] and ev.calls == [sums[10], sums[20], sums[30]]


def test_watch_on_gcs_names_a_damaged_state_file(gcs_run):
    workdir, config, _ = gcs_run
    storage.write_atomic(storage.join(workdir, watcher.EVAL_STATE_FILE), '{"evaluated_st')
    with pytest.raises(ValueError, match=r"gs://.*/run/eval_state.json: not valid JSON"):
        watcher.watch(workdir, CountingEvaluator(config), poll_seconds=0.01, timeout=0.1)

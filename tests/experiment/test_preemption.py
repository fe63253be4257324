"""SIGTERM during an experiment: the step is checkpointed, nothing is marked complete, no
later stage runs, Interrupted is raised; the rerun resumes and ends equal to an
uninterrupted run (metrics and parameters, bitwise)."""

import os
import shutil
import signal

import jax
import numpy as np
import pytest
from _experiment_common import tiny_config

from thack_jax import models
from thack_jax.core import interrupt
from thack_jax.experiment import distillation, runner
from thack_jax.experiment.config import RunConfig, TrainConfig
from thack_jax.training import checkpoints
from thack_jax.training.metrics_io import read_metrics

RUNS = (
    RunConfig(name="offline", regime="offline", num_prompts=16),
    RunConfig(name="online_teacher", regime="online_teacher"),
)


def _config():
    distill = TrainConfig(num_steps=8, batch_size=8, warmup_steps=1, checkpoint_every=4)
    return tiny_config(runs=RUNS, distill=distill)


def _run_outputs(workdir, cfg):
    """Every run's metric rows and final parameters (as numpy leaves)."""
    out = {}
    shapes = models.param_shapes(cfg.model_config("student"))
    for run in cfg.runs:
        train = os.path.join(workdir, "runs", run.name, "train")
        params = checkpoints.restore_params(os.path.join(train, "checkpoints"), 8, shapes)
        leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
        out[run.name] = (read_metrics(os.path.join(train, "metrics.jsonl")), leaves)
    return out


def _sigterm_at(monkeypatch, run_name, at_step):
    """Makes the batch source of `run_name` send this process SIGTERM at step `at_step`."""
    real = distillation.distill_source

    def patched(ctx, run, teacher, student_config):
        source = real(ctx, run, teacher, student_config)
        if run.name == run_name:
            next_batch = source.next_batch

            def next_batch_with_signal(step, params):
                if step == at_step:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next_batch(step, params)

            source.next_batch = next_batch_with_signal
        return source

    monkeypatch.setattr(distillation, "distill_source", patched)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the whole experiment (shared by the tests of this file)."""
    workdir = str(tmp_path_factory.mktemp("reference") / "wd")
    runner.Experiment(_config(), workdir, progress=False).run()
    return workdir


@pytest.mark.slow
def test_sigterm_in_a_run_stops_the_experiment_and_the_rerun_matches(
    tmp_path, monkeypatch, reference
):
    cfg = _config()

    workdir = str(tmp_path / "wd")
    with monkeypatch.context() as m:
        _sigterm_at(m, "offline", at_step=2)
        with pytest.raises(interrupt.Interrupted) as info:
            runner.Experiment(cfg, workdir, progress=False).run()
    message = str(info.value)
    assert message.startswith("interrupted by SIGTERM during distillation run offline at step")
    assert message.endswith("of 8 (checkpoint saved); rerun the same command to resume")
    assert info.value.exit_code == 143
    offline = os.path.join(workdir, "runs", "offline")
    # The step being computed when the signal came (2 or 3) is saved; nothing is complete.
    saved = checkpoints.latest_step(os.path.join(offline, "train", "checkpoints"))
    assert saved in (2, 3), saved
    assert not os.path.exists(os.path.join(offline, "COMPLETE.json"))
    assert not os.path.exists(os.path.join(workdir, "runs", "online_teacher"))  # not started
    assert not os.path.exists(os.path.join(workdir, "report.md"))

    runner.Experiment(cfg, workdir, progress=False).run()
    assert os.path.exists(os.path.join(offline, "COMPLETE.json"))
    assert os.path.exists(os.path.join(workdir, "report.md"))
    got, want = _run_outputs(workdir, cfg), _run_outputs(reference, cfg)
    for name in want:
        assert got[name][0] == want[name][0], name  # every metric of every step, exactly
        for a, b in zip(got[name][1], want[name][1], strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name


@pytest.mark.slow
def test_a_changed_model_file_under_a_finished_stage_is_refused(tmp_path, reference):
    cfg = _config()
    workdir = str(tmp_path / "wd")
    shutil.copytree(reference, workdir)  # finished stages; then the runs are removed
    shutil.rmtree(os.path.join(workdir, "runs"))
    weights = os.path.join(workdir, "teacher", "model", "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-8:] = bytes(8)  # the last weights, zeroed: still a loadable, finite file
    with open(weights, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(runner.ChangedInputError, match=r"teacher/model/model\.safetensors was"):
        runner.Experiment(cfg, workdir, progress=False).run(stages=("distill",))
    assert not os.path.exists(os.path.join(workdir, "runs"))

"""Extending a finished distillation run: a larger distill.num_steps alone resumes it from
its last checkpoint (and gives what a run made straight to the new budget gives); a smaller
budget, a schedule that depends on num_steps, a guard that stopped the run, a checkpoint
elsewhere than the old final step, or another changed field are refused, saying why."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from _experiment_common import tiny_config

from thack_jax.experiment import markers, runner
from thack_jax.experiment.config import EvalConfig, RunConfig, TrainConfig
from thack_jax.models import hf
from thack_jax.training.metrics_io import read_metrics

N = 4  # the first budget; the extension doubles it
SHARED = {
    "oracle": ("oracle", "oracle_data", "teacher", "student_init"),
    "field": ("reference_data", "teacher", "student_init"),
}


def _config(mode: str, num_steps: int, runs: tuple, **distill):
    """A tiny experiment whose evaluations fall on multiples of 2 (no log points), so the
    schedules of N and 2N steps agree up to N; constant learning rate."""
    train = dict(num_steps=num_steps, batch_size=8, warmup_steps=1, checkpoint_every=100)
    overrides = dict(
        distill=TrainConfig(**{**train, **distill}),
        runs=runs,
        evaluation=EvalConfig(num_prompts=8, num_samples=2, every=2, batch_size=8),
    )
    if mode == "field":  # as test_field_mode.field_config
        overrides.update(
            mode="field", oracle_logit_scale=1.0, teacher_logit_scale=1.0, reference_examples=64
        )
    return tiny_config(**overrides)


OFFLINE = RunConfig(name="offline", regime="offline", num_prompts=16)
ONLINE = RunConfig(name="online_student", regime="online_student")


class _Recorder:
    """The real evaluator, recording the steps it evaluates (a resumed run evaluates only
    steps after the checkpoint it restored)."""

    def __init__(self, evaluator):
        self.evaluator, self.steps = evaluator, []

    def estimates(self, params, step=None):
        self.steps.append(step)
        return self.evaluator.estimates(params, step=step)


class _RecordingExperiment(runner.Experiment):
    def evaluator(self):
        self.recorder = _Recorder(super().evaluator())
        return self.recorder


@pytest.fixture(scope="module")
def shared_stages(tmp_path_factory):
    """{mode: a workdir whose shared stages are done} (built once; tests copy it)."""
    made = {}

    def get(mode):
        if mode not in made:
            workdir = str(tmp_path_factory.mktemp(f"shared_{mode}") / "wd")
            cfg = _config(mode, N, (OFFLINE,))
            runner.Experiment(cfg, workdir, progress=False).run(stages=SHARED[mode])
            made[mode] = workdir
        return made[mode]

    return get


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def _params(workdir: str, run: str):
    _, params = hf.load_hf_checkpoint(os.path.join(workdir, "runs", run, "export", "final"))
    return jax.tree.leaves(params)


def _read(workdir: str, run: str, name: str):
    path = os.path.join(workdir, "runs", run, name)
    return read_metrics(path) if name.endswith(".jsonl") else json.load(open(path))


def _extend_and_compare(mode, runs, shared_stages, tmp_path, capsys):
    """Runs N steps, extends to 2N, runs 2N straight; checks the extension against it."""
    base = shared_stages(mode)
    first, longer = _config(mode, N, runs), _config(mode, 2 * N, runs)
    extended = _copy(base, tmp_path / "extended")
    runner.Experiment(first, extended, progress=False).run(stages=("distill",))
    before = {r.name: _read(extended, r.name, "train/metrics.jsonl") for r in runs}
    capsys.readouterr()
    exp = _RecordingExperiment(longer, extended, progress=False)
    exp.run(stages=("distill",))
    printed = capsys.readouterr().out
    straight = _copy(base, tmp_path / "straight")
    runner.Experiment(longer, straight, progress=False).run(stages=("distill",))

    # Resumed at N, not at 0: the evaluator saw only the steps after N, of every run.
    assert exp.recorder.steps == [6, 8] * len(runs)
    for run in runs:
        line = f"[thack_jax] run {run.name} extended: {N} -> {2 * N} steps (resuming from step {N})"
        assert line in printed
        rows = _read(extended, run.name, "train/metrics.jsonl")
        assert rows[: len(before[run.name])] == before[run.name]  # past lines kept as they were
        evals = [r["step"] for r in rows if "proxy/forward_kl" in r]
        assert evals == [0, 2, 4, 6, 8], run.name  # each evaluation once
        assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 2 * N + 1))
        # Bitwise what the straight run gives: same batches, same updates, same evaluations.
        assert rows == _read(straight, run.name, "train/metrics.jsonl"), run.name
        for a, b in zip(_params(extended, run.name), _params(straight, run.name), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        marker = _read(extended, run.name, "COMPLETE.json")
        assert marker["fingerprint"] == _read(straight, run.name, "COMPLETE.json")["fingerprint"]
        assert marker["config"]["distill"]["num_steps"] == 2 * N
        assert marker["extended_from"] == [N]
        export = _read(extended, run.name, "export/export.json")
        assert export["final"]["step"] == 2 * N
        assert export["guard_best"] == _read(straight, run.name, "export/export.json")["guard_best"]
        snapshots = sorted(os.listdir(os.path.join(extended, "runs", run.name, "candidates")))
        assert snapshots == sorted(
            os.listdir(os.path.join(straight, "runs", run.name, "candidates"))
        )
        readme = open(os.path.join(extended, "runs", run.name, "export", "final", "README.md"))
        assert f"Steps: {2 * N} of {2 * N} training steps" in readme.read()
    assert "[thack_jax] stage distill done in " in printed  # a stage that ran: its wall time
    # Now complete at 2N: a rerun skips it, and every shared stage, each saying so.
    capsys.readouterr()
    stages = tuple(s for s in runner.stages_of(longer) if s != "report")
    runner.Experiment(longer, extended, progress=False).run(stages=stages)
    printed = capsys.readouterr().out
    assert f"run {runs[0].name} skipped (complete)" in printed
    for stage in stages:
        assert f"[thack_jax] stage {stage} skipped (complete)" in printed, stage
    assert " done in " not in printed
    return extended


@pytest.mark.slow
def test_oracle_run_extended_equals_a_straight_run(shared_stages, tmp_path, capsys):
    extended = _extend_and_compare("oracle", (OFFLINE, ONLINE), shared_stages, tmp_path, capsys)
    # (b) the budget shrank, (d) another field changed too: refused on the real run.
    with pytest.raises(runner.ExperimentMismatchError, match="num_steps.*the budget shrank"):
        runner.Experiment(_config("oracle", N, (OFFLINE,)), extended).run_is_complete(OFFLINE)
    other = _config("oracle", 4 * N, (OFFLINE,), learning_rate=1e-3)
    with pytest.raises(runner.ExperimentMismatchError) as info:
        runner.Experiment(other, extended).run_is_complete(OFFLINE)
    message = str(info.value)
    assert "differing fields" in message
    assert "distill.learning_rate: stored 0.0003, requested 0.001" in message
    assert f"distill.num_steps: stored {2 * N}, requested {4 * N}" in message


@pytest.mark.slow
def test_field_run_extended_equals_a_straight_run(shared_stages, tmp_path, capsys):
    extended = _extend_and_compare("field", (OFFLINE,), shared_stages, tmp_path, capsys)
    rows = _read(extended, "offline", "train/metrics.jsonl")
    assert all(np.isfinite(r["reference/cross_entropy"]) for r in rows if "proxy/js" in r)
    assert not any(k.startswith("golden/") for r in rows for k in r)
    # Without its checkpoints the run cannot continue from where it ended: refused.
    train = os.path.join(extended, "runs", "offline", "train")
    os.rename(os.path.join(train, "checkpoints"), os.path.join(train, "moved"))
    with pytest.raises(
        runner.ExperimentMismatchError, match="it has no checkpoint left to resume from"
    ):
        runner.Experiment(_config("field", 3 * N, (OFFLINE,)), extended).run_is_complete(OFFLINE)


# ------------------------------------------------------- the decision, on written markers


def _marker(directory, **distill):
    """Writes a run's COMPLETE.json as stage_distill does; returns the record's parts."""
    parts = {
        "run": OFFLINE,
        "distill": TrainConfig(**{"num_steps": N, "warmup_steps": 1, **distill}),
        "evaluation": EvalConfig(),
        "guard_mode": "log",
    }
    fp, config = markers.stage_config(parts, {"teacher": {"model.safetensors": "0" * 64}})
    markers.mark_complete(str(directory), fp, config, wall_seconds=2.5)
    return parts


def _request(parts, **distill):
    changed = {**parts, "distill": TrainConfig(**{**vars(parts["distill"]), **distill})}
    return markers.stage_config(changed, {"teacher": {"model.safetensors": "0" * 64}})


def _extension(directory, fp, config, last=N, stopped=None):
    return markers.extension(
        str(directory), fp, config, last_checkpoint=lambda: last, guard_stopped=lambda: stopped
    )


@pytest.mark.parametrize("schedule", ["constant", "rsqrt"])
def test_a_grown_budget_alone_extends(tmp_path, schedule):
    parts = _marker(tmp_path, schedule=schedule)
    fp, config = _request(parts, num_steps=2 * N)
    ext = _extension(tmp_path, fp, config)
    assert (ext.old_steps, ext.new_steps, ext.resume_step) == (N, 2 * N, N)
    assert ext.complete_info(1.0) == {"wall_seconds": 3.5, "extended_from": [N]}
    # An interrupted extension (checkpoint past N, the old marker still there) resumes too.
    assert _extension(tmp_path, fp, config, last=N + 2).resume_step == N + 2
    # The same budget is no extension: the run is complete.
    assert _extension(tmp_path, *_request(parts)) is None


def test_a_shrunk_budget_is_refused(tmp_path):
    parts = _marker(tmp_path)
    with pytest.raises(runner.ExperimentMismatchError) as info:
        _extension(tmp_path, *_request(parts, num_steps=N - 1))
    message = str(info.value)
    assert f"distill.num_steps changed (stored {N}, requested {N - 1})" in message
    assert "the budget shrank" in message and "COMPLETE.json" in message


def test_a_schedule_over_num_steps_is_refused(tmp_path):
    parts = _marker(tmp_path, schedule="cosine")
    with pytest.raises(runner.ExperimentMismatchError) as info:
        _extension(tmp_path, *_request(parts, num_steps=2 * N))
    message = str(info.value)
    assert "TrainConfig.schedule='cosine' depends on num_steps" in message
    assert "['constant', 'rsqrt']" in message


def test_a_checkpoint_elsewhere_or_a_guard_stop_is_refused(tmp_path):
    parts = _marker(tmp_path)
    fp, config = _request(parts, num_steps=2 * N)
    with pytest.raises(
        runner.ExperimentMismatchError,
        match="last checkpoint is at step 2, not at the old final step 4",
    ):
        _extension(tmp_path, fp, config, last=2)
    with pytest.raises(
        runner.ExperimentMismatchError, match="last checkpoint is at step 9, not at"
    ):
        _extension(tmp_path, fp, config, last=9)
    with pytest.raises(runner.ExperimentMismatchError, match="guard stopped it at step 3"):
        _extension(tmp_path, fp, config, stopped=3)


def test_another_changed_field_keeps_the_named_diff(tmp_path):
    parts = _marker(tmp_path)
    fp, config = _request(parts, num_steps=2 * N, learning_rate=1e-3)
    assert _extension(tmp_path, fp, config) is None  # not an extension: is_complete decides
    with pytest.raises(runner.ExperimentMismatchError) as info:
        markers.is_complete(str(tmp_path), fp, config)
    message = str(info.value)
    assert "differing fields" in message
    assert "distill.learning_rate: stored 0.0003, requested 0.001" in message
    assert f"distill.num_steps: stored {N}, requested {2 * N}" in message

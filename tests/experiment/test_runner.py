"""End to end: every stage and every regime for a few steps; caching; mismatch refusal; the
guard of a distillation run."""

import json
import os

import numpy as np
import pytest
from _experiment_common import tiny_config

from thack_jax.evaluation import divergences
from thack_jax.experiment import markers, runner
from thack_jax.experiment.config import EvalConfig, RunConfig, TrainConfig, fingerprint
from thack_jax.hacking import noise
from thack_jax.training.metrics_io import read_metrics


@pytest.mark.slow
def test_all_stages_and_regimes(tmp_path, capsys):
    workdir = str(tmp_path / "wd")
    cfg = tiny_config()
    runner.Experiment(cfg, workdir, progress=False).run()
    for stage in ("oracle", "oracle_data", "teacher", "student_init"):
        assert os.path.exists(os.path.join(workdir, stage, "COMPLETE.json")), stage
    for run in cfg.runs:
        rows = read_metrics(os.path.join(workdir, "runs", run.name, "train", "metrics.jsonl"))
        train_steps = [r["step"] for r in rows if "train/loss" in r]
        assert train_steps == list(range(1, 7)), run.name
        evals = [r["step"] for r in rows if "golden/forward_kl" in r]
        assert evals == [0, 3, 6], run.name
        assert all(r["proxy/forward_kl_stderr"] >= 0 for r in rows if "proxy/forward_kl" in r)
    report = open(os.path.join(workdir, "report.md")).read()
    assert "offline" in report and "online_student" in report
    assert os.listdir(os.path.join(workdir, "plots"))

    # A rerun skips every completed stage (nothing is retrained: metrics files unchanged).
    before = {
        r.name: os.path.getmtime(os.path.join(workdir, "runs", r.name, "COMPLETE.json"))
        for r in cfg.runs
    }
    capsys.readouterr()
    runner.Experiment(cfg, workdir, progress=False).run(stages=("distill",))
    printed = capsys.readouterr().out
    assert "[thack_jax] stage distill skipped (complete)" in printed
    assert all(f"run {r.name} skipped (complete)" in printed for r in cfg.runs)
    after = {
        r.name: os.path.getmtime(os.path.join(workdir, "runs", r.name, "COMPLETE.json"))
        for r in cfg.runs
    }
    assert before == after


def test_workdir_of_another_experiment_is_refused(tmp_path):
    workdir = str(tmp_path / "wd")
    runner.check_workdir(tiny_config(), workdir)
    with open(os.path.join(workdir, "experiment.json")) as f:
        assert json.load(f)["oracle_logit_scale"] == 3.0
    with pytest.raises(runner.ExperimentMismatchError, match="oracle_logit_scale"):
        runner.check_workdir(tiny_config(oracle_logit_scale=2.0), workdir)
    # Distillation settings are not shared stages: changing them is allowed.
    runner.check_workdir(tiny_config(distill=TrainConfig(num_steps=9)), workdir)


def test_a_changed_stage_config_names_its_fields(tmp_path):
    parts = {"teacher_sft": TrainConfig(num_steps=4), "teacher_logit_scale": 1.5}
    fp, config = markers.stage_config(parts, {"oracle_data": {"a.npy": "0" * 64}})
    markers.mark_complete(str(tmp_path), fp, config)
    assert markers.is_complete(str(tmp_path), fp, config)
    changed = {"teacher_sft": TrainConfig(num_steps=9), "teacher_logit_scale": 1.5}
    fp2, config2 = markers.stage_config(changed, {"oracle_data": {"a.npy": "0" * 64}})
    with pytest.raises(runner.ExperimentMismatchError) as info:
        markers.is_complete(str(tmp_path), fp2, config2)
    message = str(info.value)
    assert "teacher_sft.num_steps: stored 4, requested 9" in message
    assert "teacher_logit_scale" not in message
    # The fingerprint is the one of the values in order (as before the record existed).
    assert fp == fingerprint([*parts.values(), {"oracle_data": {"a.npy": "0" * 64}}])


def test_unknown_stage_and_run_are_named(tmp_path):
    exp = runner.Experiment(tiny_config(), str(tmp_path / "wd"), progress=False)
    with pytest.raises(ValueError, match="teacher_sft"):
        exp.run(stages=("teacher_sft",))
    with pytest.raises(ValueError, match="nope"):
        exp.run(stages=("distill",), runs=("nope",))


def test_duplicate_run_names_refused():
    with pytest.raises(ValueError, match="duplicate"):
        tiny_config(runs=(RunConfig(name="a"), RunConfig(name="a")))


class _ScriptedEvaluator:
    """Stands in for evaluation.Evaluator: a proxy that follows a power law until step 10,
    then plateaus (what the guard must catch), one value per scheduled evaluation."""

    def __init__(self, steps):
        self.steps = list(steps)

    def estimates(self, params, step=None):
        step = self.steps.pop(0)
        value = 10.0 * max(step, 1) ** -0.5 if step <= 10 else 10.0 * 10**-0.5
        per_prompt = value * np.array([0.5, 1.5])
        est = divergences.Estimate(value, 0.01 * value, value, 0.0, per_prompt, 2, per_prompt)
        return {"proxy/forward_kl": est}


@pytest.mark.slow
def test_guard_stops_a_hacking_run_and_marks_the_best_step(tmp_path):
    cfg = tiny_config(
        distill=TrainConfig(num_steps=40, batch_size=8, warmup_steps=2, checkpoint_every=100),
        runs=(RunConfig(name="offline", regime="offline", num_prompts=16),),
        evaluation=EvalConfig(num_prompts=8, num_samples=2, every=1, batch_size=8),
        guard_mode="stop",
    )
    exp = runner.Experiment(cfg, str(tmp_path / "wd"), progress=False)
    exp.run(stages=("oracle", "oracle_data", "teacher", "student_init"))
    evaluator = _ScriptedEvaluator(cfg.evaluation.steps(40))
    metrics_path = exp.stage_distill(cfg.runs[0], evaluator)
    rows = [r for r in read_metrics(metrics_path) if "proxy/forward_kl" in r]
    last = rows[-1]
    assert 10 < last["step"] < 40  # stopped early, after the plateau began
    assert last["guard/fired"] == 1.0 and last["guard/statistic"] > 2.8
    # Evaluations before the end of warmup (steps 0 and 1) are not fed to the guard.
    assert [r["step"] for r in rows if "guard/fired" not in r] == [0, 1]
    assert all(r["guard/fired"] == 0.0 for r in rows[2:-1])
    with open(os.path.join(os.path.dirname(os.path.dirname(metrics_path)), "guard.json")) as f:
        guard = json.load(f)
    assert guard["fired_at_eval_step"] == last["step"]
    assert 2 <= guard["best_step"] < last["step"]
    with open(
        os.path.join(os.path.dirname(os.path.dirname(metrics_path)), "guard_settings.json")
    ) as f:
        assert json.load(f)["min_step"] == 2
    # Per-prompt values of every evaluation, for noise.py.
    steps, values = noise.load_per_prompt(
        os.path.join(os.path.dirname(metrics_path), "per_prompt"), "proxy/forward_kl", 0
    )
    assert steps.tolist() == [r["step"] for r in rows]
    np.testing.assert_allclose(values.mean(axis=1), [r["proxy/forward_kl"] for r in rows])


class _Crash(Exception):
    pass


class _CrashingEvaluator(_ScriptedEvaluator):
    """A scripted evaluator that dies (like a killed process) at `crash_step`."""

    def __init__(self, steps, crash_step):
        super().__init__(steps)
        self.crash_step = crash_step

    def estimates(self, params, step=None):
        if self.steps[0] == self.crash_step:
            raise _Crash(f"killed at the evaluation of step {self.crash_step}")
        return super().estimates(params)


def _guard_run_config(**overrides):
    return tiny_config(
        distill=TrainConfig(num_steps=24, batch_size=8, warmup_steps=2, checkpoint_every=8),
        runs=(RunConfig(name="offline", regime="offline", num_prompts=16),),
        evaluation=EvalConfig(num_prompts=8, num_samples=2, every=1, batch_size=8),
        **overrides,
    )


@pytest.mark.slow
def test_guard_record_names_the_first_firing_step(tmp_path):
    """guard.json says when guard/fired became 1, not the last evaluation (mode 'log' keeps
    training after the guard fires)."""
    cfg = _guard_run_config(guard_mode="log")
    exp = runner.Experiment(cfg, str(tmp_path / "wd"), progress=False)
    exp.run(stages=("oracle", "oracle_data", "teacher", "student_init"))
    metrics_path = exp.stage_distill(cfg.runs[0], _ScriptedEvaluator(cfg.evaluation.steps(24)))
    rows = [r for r in read_metrics(metrics_path) if r.get("guard/fired") == 1.0]
    assert rows and rows[-1]["step"] == 24 and rows[0]["step"] < 24
    with open(os.path.join(os.path.dirname(os.path.dirname(metrics_path)), "guard.json")) as f:
        record = json.load(f)
    assert record["fired_at_eval_step"] == rows[0]["step"]
    assert record["last_eval_step"] == 24


@pytest.mark.slow
def test_first_resume_after_a_crash_between_checkpoints_finishes(tmp_path):
    """Killed after evaluations were logged past the last checkpoint (step 8), the first
    rerun restores step 8, repeats steps 9-10 and finishes; every step is logged once and
    the metrics equal an uninterrupted run's (the guard replays only evaluations <= 8)."""
    cfg = _guard_run_config(guard_mode="log")
    steps = cfg.evaluation.steps(24)
    clean = runner.Experiment(cfg, str(tmp_path / "clean"), progress=False)
    clean.run(stages=("oracle", "oracle_data", "teacher", "student_init"))
    expected = read_metrics(clean.stage_distill(cfg.runs[0], _ScriptedEvaluator(steps)))

    exp = runner.Experiment(cfg, str(tmp_path / "wd"), progress=False)
    exp.run(stages=("oracle", "oracle_data", "teacher", "student_init"))
    with pytest.raises(_Crash):
        exp.stage_distill(cfg.runs[0], _CrashingEvaluator(steps, crash_step=11))
    logged = [r["step"] for r in read_metrics(exp.path("runs", "offline", "train"))]
    assert logged[-1] == 10  # evaluations 9 and 10 were logged after the checkpoint at 8
    metrics_path = exp.stage_distill(cfg.runs[0], _ScriptedEvaluator([s for s in steps if s > 8]))
    rows = read_metrics(metrics_path)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    assert rows == expected

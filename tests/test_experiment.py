"""End to end: every stage and every regime for a few steps; caching; mismatch refusal."""

import json
import os

import pytest

from thack_jax import experiment
from thack_jax.experiment_config import (
    EvalConfig,
    ExperimentConfig,
    ModelSpec,
    RunConfig,
    TrainConfig,
)
from thack_jax.metrics_io import read_metrics

TINY = {"vocab_size": 64, "d_model": 16, "d_kv": 8, "num_heads": 2, "d_ff": 32}


def tiny_config(**overrides) -> ExperimentConfig:
    sft = TrainConfig(num_steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1)
    base = dict(
        name="test",
        max_input_length=12,
        max_target_length=6,
        oracle=ModelSpec(overrides=TINY, init_seed=0),
        teacher=ModelSpec(overrides=TINY, init_seed=1),
        student=ModelSpec(overrides=TINY, init_seed=2),
        oracle_logit_scale=3.0,
        teacher_logit_scale=1.5,
        oracle_data_prompts=64,
        teacher_sft=sft,
        student_sft=sft,
        distill=TrainConfig(num_steps=6, batch_size=8, warmup_steps=1, checkpoint_every=3),
        distill_prompt_pool=64,
        runs=(
            RunConfig(name="offline", regime="offline", num_prompts=16),
            RunConfig(name="online_teacher", regime="online_teacher"),
            RunConfig(name="online_student", regime="online_student"),
            RunConfig(name="mixed", regime="mixed", num_prompts=16, online_fraction=0.25),
        ),
        evaluation=EvalConfig(num_prompts=8, num_samples=2, every=3, batch_size=8),
    )
    return ExperimentConfig(**{**base, **overrides})


@pytest.mark.slow
def test_all_stages_and_regimes(tmp_path):
    workdir = str(tmp_path / "wd")
    cfg = tiny_config()
    experiment.Experiment(cfg, workdir, progress=False).run()
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
    experiment.Experiment(cfg, workdir, progress=False).run(stages=("distill",))
    after = {
        r.name: os.path.getmtime(os.path.join(workdir, "runs", r.name, "COMPLETE.json"))
        for r in cfg.runs
    }
    assert before == after


def test_workdir_of_another_experiment_is_refused(tmp_path):
    workdir = str(tmp_path / "wd")
    experiment.check_workdir(tiny_config(), workdir)
    with open(os.path.join(workdir, "experiment.json")) as f:
        assert json.load(f)["oracle_logit_scale"] == 3.0
    with pytest.raises(experiment.ExperimentMismatchError, match="oracle_logit_scale"):
        experiment.check_workdir(tiny_config(oracle_logit_scale=2.0), workdir)
    # Distillation settings are not shared stages: changing them is allowed.
    experiment.check_workdir(tiny_config(distill=TrainConfig(num_steps=9)), workdir)


def test_unknown_stage_and_run_are_named(tmp_path):
    exp = experiment.Experiment(tiny_config(), str(tmp_path / "wd"), progress=False)
    with pytest.raises(ValueError, match="teacher_sft"):
        exp.run(stages=("teacher_sft",))
    with pytest.raises(ValueError, match="nope"):
        exp.run(stages=("distill",), runs=("nope",))


def test_duplicate_run_names_refused():
    with pytest.raises(ValueError, match="duplicate"):
        tiny_config(runs=(RunConfig(name="a"), RunConfig(name="a")))

"""Field mode: an experiment without an oracle (a given or reference-trained teacher, the
task's references for SFT and for the reference metric), its refusals, and the oracle
mode's workdir files left as they were."""

import json
import os

import jax
import numpy as np
import pytest
from _experiment_common import TINY, tiny_config

from thack_jax import models
from thack_jax.experiment import runner
from thack_jax.experiment.config import ModelSpec, RunConfig, TrainConfig
from thack_jax.models import hf
from thack_jax.training.metrics_io import read_metrics


def field_config(**overrides):
    base = dict(
        mode="field",
        oracle_logit_scale=1.0,
        teacher_logit_scale=1.0,
        reference_examples=64,
        runs=(
            RunConfig(name="offline", regime="offline", num_prompts=16),
            RunConfig(name="online_student", regime="online_student"),
        ),
    )
    return tiny_config(**{**base, **overrides})


def test_field_mode_refuses_what_needs_an_oracle():
    with pytest.raises(ValueError, match=r"oracle_logit_scale=3\.0 needs mode='oracle'"):
        field_config(oracle_logit_scale=3.0)
    with pytest.raises(ValueError, match="oracle.checkpoint='/ckpt' is unused"):
        field_config(oracle=ModelSpec(overrides=TINY, checkpoint="/ckpt"))
    with pytest.raises(ValueError, match="needs a teacher"):
        field_config(teacher_sft=TrainConfig(num_steps=0))
    with pytest.raises(ValueError, match="ExperimentConfig.mode='fld' must be one of"):
        field_config(mode="fld")


def test_stage_selection_follows_the_mode():
    cfg = field_config()
    assert runner.stages_of(cfg) == (
        "reference_data",
        "teacher",
        "student_init",
        "distill",
        "report",
    )
    with pytest.raises(ValueError, match=r"\['oracle'\] do not exist in .*mode='field'"):
        runner.check_selection(cfg, ("oracle", "distill"))
    with pytest.raises(ValueError, match=r"\['reference_data'\] do not exist"):
        runner.check_selection(tiny_config(), ("reference_data",))
    runner.check_selection(cfg, None)


def test_oracle_mode_experiment_json_is_unchanged(tmp_path):
    """Oracle-mode workdirs made before field mode existed stay valid: the shared section
    holds neither `mode` nor `reference_examples`."""
    runner.check_workdir(tiny_config(), str(tmp_path))
    stored = json.load(open(tmp_path / "experiment.json"))
    assert "mode" not in stored and "reference_examples" not in stored
    runner.check_workdir(field_config(), str(tmp_path / "field"))
    stored = json.load(open(tmp_path / "field" / "experiment.json"))
    assert stored["mode"] == "field" and stored["reference_examples"] == 64


@pytest.mark.slow
def test_field_experiment_without_an_oracle(tmp_path):
    workdir = str(tmp_path / "wd")
    cfg = field_config()
    runner.Experiment(cfg, workdir, progress=False).run()
    assert not os.path.exists(os.path.join(workdir, "oracle"))
    assert not os.path.exists(os.path.join(workdir, "oracle_data"))
    for stage in ("reference_data", "teacher", "student_init"):
        assert os.path.exists(os.path.join(workdir, stage, "COMPLETE.json")), stage
    settings = json.load(open(os.path.join(workdir, "eval_settings.json")))
    assert settings["mode"] == "field" and settings["references"] == "eval_references.npy"
    references = np.load(os.path.join(workdir, "eval_references.npy"))
    assert references.shape == (cfg.evaluation.num_prompts, cfg.max_target_length)
    for run in cfg.runs:
        rows = read_metrics(os.path.join(workdir, "runs", run.name, "train", "metrics.jsonl"))
        evals = [r for r in rows if "proxy/forward_kl" in r]
        assert [r["step"] for r in evals] == [0, 3, 6], run.name
        assert not any(k.startswith("golden/") for r in rows for k in r), run.name
        for r in evals:
            assert np.isfinite(r["reference/cross_entropy"]) and r["reference/cross_entropy"] > 0
            assert (
                r["reference/teacher_cross_entropy"] == evals[0]["reference/teacher_cross_entropy"]
            )
        export = os.path.join(workdir, "runs", run.name, "export")
        for kept in ("final", "guard_best"):
            assert os.path.exists(os.path.join(export, kept, "model.safetensors")), (run, kept)
            assert os.path.exists(os.path.join(export, kept, "README.md")), (run, kept)
    report = open(os.path.join(workdir, "report.md")).read()
    assert "reference" in report


@pytest.mark.slow
def test_field_teacher_from_a_checkpoint_is_exported_as_loaded(tmp_path):
    """A teacher given as a checkpoint with 0 SFT steps is the teacher the run uses."""
    config = models.get_config("tiny", **TINY, max_input_length=12, max_target_length=6)
    params = jax.tree.map(np.asarray, models.init_params(config, jax.random.key(5)))
    hf.save_hf_checkpoint(str(tmp_path / "teacher_ckpt"), config, params)
    cfg = field_config(
        teacher=ModelSpec(overrides=TINY, checkpoint=str(tmp_path / "teacher_ckpt")),
        teacher_sft=TrainConfig(num_steps=0),
        runs=(RunConfig(name="online_teacher", regime="online_teacher"),),
    )
    workdir = str(tmp_path / "wd")
    runner.Experiment(cfg, workdir, progress=False).run(
        stages=("reference_data", "teacher", "student_init")
    )
    marker = json.load(open(os.path.join(workdir, "teacher", "COMPLETE.json")))
    assert marker["sft_examples"] == 0
    _, exported = hf.load_hf_checkpoint(os.path.join(workdir, "teacher", "model"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exported), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))

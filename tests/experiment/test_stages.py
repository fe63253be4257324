"""Tests of the stages' work: the stage context (task prompts, paths, vocabulary
fingerprint), the SFT settings per role and the guard settings file. The stages themselves
run end to end in tests/experiment/test_runner.py (through `Experiment`, which skips and marks
them)."""

import json
import os

import numpy as np
from _experiment_common import tiny_config

from thack_jax.data import synthetic
from thack_jax.experiment import distillation, stages


def test_stage_context_prompts_and_paths(tmp_path):
    cfg = tiny_config()
    ctx = stages.StageContext(cfg, str(tmp_path), mesh=None, progress=False)
    assert ctx.path("runs", "a") == os.path.join(str(tmp_path), "runs", "a")
    prompts = ctx.prompts("train", 4, seed=7)
    want = synthetic.synthetic_prompts(4, split="train", seed=7, max_length=12)
    np.testing.assert_array_equal(prompts, want)
    assert prompts.shape == (4, 12) and prompts.dtype == np.int32
    assert ctx.vocab_fingerprint() == "synthetic:64"


def test_sft_settings_per_role():
    cfg = tiny_config()
    teacher, student = stages.sft_settings(cfg, "teacher"), stages.sft_settings(cfg, "student")
    assert teacher == ("teacher", cfg.teacher, cfg.teacher_sft, cfg.teacher_sft_examples, 1.5)
    assert student == ("student_init", cfg.student, cfg.student_sft, cfg.student_sft_examples, 1.0)


def test_write_guard_settings(tmp_path):
    ctx = stages.StageContext(tiny_config(guard_mode="stop"), str(tmp_path), mesh=None)
    run_dir = str(tmp_path / "runs" / "r")
    distillation.write_guard_settings(ctx, run_dir)
    assert os.listdir(run_dir) == ["guard_settings.json"]  # no temporary file left
    with open(os.path.join(run_dir, "guard_settings.json")) as f:
        settings = json.load(f)
    assert settings["proxy_key"] == distillation.GUARD_KEY == "proxy/forward_kl"
    assert settings["min_step"] == 1 and settings["use_stderr"] is False

"""Shared setup of tests/experiment/ (test_runner.py, test_stages.py): a tiny experiment
configuration (three tiny T5s, every regime, a few steps)."""

from thack_jax.experiment.config import (
    EvalConfig,
    ExperimentConfig,
    ModelSpec,
    RunConfig,
    TrainConfig,
)

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

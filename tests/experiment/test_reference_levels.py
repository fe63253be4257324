"""The reference levels of an experiment (reference_levels.py): reference_levels.json after
the shared stages of a tiny experiment, each level against an independent computation, the
rerun check, and none in field mode."""

import json
import os

import jax
import numpy as np
import pytest
from _experiment_common import TINY, tiny_config

from thack_jax.decoding import sampling
from thack_jax.evaluation.evaluator import DIVERGENCES, STREAMS, Evaluator
from thack_jax.experiment import eval_setup, reference_levels, runner
from thack_jax.experiment.config import ExperimentMismatchError, ModelSpec, RunConfig

pytestmark = pytest.mark.slow  # the shared stages of a tiny experiment: about a minute

SHARED = ("oracle", "oracle_data", "teacher", "student_init")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(experiment, evaluator, levels record) after the shared stages; the teacher is wider
    than the student, so scoring it as the student needs its own config."""
    cfg = tiny_config(
        teacher=ModelSpec(overrides=dict(TINY, d_ff=48), init_seed=1),
        runs=(RunConfig(name="online_student", regime="online_student"),),
    )
    exp = runner.Experiment(cfg, str(tmp_path_factory.mktemp("wd")), progress=False)
    exp.run(stages=SHARED)
    evaluator = exp.evaluator()
    with open(os.path.join(exp.workdir, reference_levels.FILE)) as f:
        return exp, evaluator, json.load(f)


def test_levels_file_holds_finite_levels(built):
    _, _, record = built
    assert record["format"] == reference_levels.FORMAT
    for role in reference_levels.MODELS:
        assert set(record[role]) == set(DIVERGENCES)
        for div in DIVERGENCES:
            level = record[role][div]
            assert np.isfinite(level["value"]) and level["value"] > 0, (role, div)
            assert np.isfinite(level["stderr"]) and level["stderr"] >= 0, (role, div)
    assert np.isfinite(record["oracle_entropy"]["value"])
    assert record["oracle_entropy"]["value"] > 0


def test_teacher_level_is_an_independent_evaluation_of_the_teacher(built):
    exp, evaluator, record = built
    teacher = exp.load_model("teacher")
    assert teacher[0] != exp.cfg.model_config("student")  # a config of its own
    prompts, references = eval_setup.eval_data(exp)
    fresh = Evaluator(
        oracle=exp.load_model("oracle"),
        teacher=teacher,
        student_config=teacher[0],
        prompts=prompts,
        settings=eval_setup.settings_of(exp),
        mesh=exp.mesh,
        references=references,
    )
    metrics = fresh.evaluate(teacher[1])
    student = evaluator.evaluate(exp.load_model("student_init")[1])
    for div in DIVERGENCES:
        got = record["teacher"][div]
        assert got["value"] == pytest.approx(metrics[f"golden/{div}"], rel=1e-5)
        assert got["stderr"] == pytest.approx(metrics[f"golden/{div}_stderr"], rel=1e-4)
        assert record["student_init"][div]["value"] == pytest.approx(
            student[f"golden/{div}"], rel=1e-5
        )
    # The teacher and the initial student are different models: different levels.
    assert record["teacher"]["forward_kl"]["value"] != pytest.approx(
        record["student_init"]["forward_kl"]["value"], rel=1e-3
    )


def test_oracle_entropy_is_minus_the_mean_log_prob_of_its_samples(built):
    exp, evaluator, record = built
    tokens, mask = evaluator.reference_samples("oracle")
    # The sampler's own log-probs of the same draws (one batch: the evaluator's key, row 0).
    config, params = exp.load_model("oracle")
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(evaluator.seed), STREAMS["oracle"]), 0
    )
    prompts = eval_setup.eval_prompts(exp)
    assert prompts.shape[0] <= evaluator.batch_size
    drawn = sampling.sample(config, params, prompts, key, evaluator.sampling)
    np.testing.assert_array_equal(np.asarray(drawn.tokens), tokens)
    per_row = -np.where(mask, np.asarray(drawn.token_logprobs, np.float64), 0.0).sum(1)
    per_prompt = per_row.reshape(prompts.shape[0], evaluator.num_samples).mean(1)
    entropy = record["oracle_entropy"]
    assert entropy["value"] == pytest.approx(per_prompt.mean(), rel=1e-4)
    se = per_prompt.std(ddof=1) / np.sqrt(per_prompt.size)
    assert entropy["stderr"] == pytest.approx(se, rel=1e-3)
    assert entropy["per_token"] == pytest.approx(per_row.sum() / mask.sum(), rel=1e-4)


def test_rerun_reads_the_stored_levels_and_refuses_a_foreign_file(built):
    exp, _, record = built
    path = os.path.join(exp.workdir, reference_levels.FILE)
    marked = dict(record, teacher=dict(record["teacher"], js={"value": 0.5, "stderr": 0.1}))
    try:
        with open(path, "w") as f:
            json.dump(marked, f)
        # Read, not recomputed: a resume on other hardware is never refused over floats.
        assert reference_levels.ensure(exp, exp.evaluator())["teacher"]["js"]["value"] == 0.5
        with open(path, "w") as f:
            json.dump({"format": "something/else"}, f)
        with pytest.raises(ExperimentMismatchError, match="not a thack_jax.reference_levels"):
            exp.evaluator()
    finally:
        with open(path, "w") as f:
            json.dump(record, f)


def test_field_mode_writes_no_levels(built):
    exp, evaluator, _ = built

    class Field:
        cfg = type("C", (), {"mode": "field"})()

    assert reference_levels.ensure(Field(), evaluator) is None

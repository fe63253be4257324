"""Tests of thack_jax.evaluation: the Evaluator (exactness, determinism, sharding, bad input)
and the checkpoint watcher's exactly-once protocol (in-process, fast)."""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from thack_jax import checkpoints, evaluation, models, partitioning, sampling
from thack_jax.metrics_io import read_metrics

sys.path.insert(0, os.path.dirname(__file__))
from test_divergences import (  # noqa: E402
    EOS,
    LX,
    V,
    enumerate_responses,
    make_model,
    masked_scores,
    random_params,
)

L = 3


def mix_towards(model, seed, amount):
    other = make_model(seed)
    return model[0], jax.tree.map(lambda a, b: (1 - amount) * a + amount * b, model[1], other[1])


@pytest.fixture(scope="module")
def trio():
    oracle = make_model(0)
    teacher = mix_towards(oracle, 1, 0.25)
    student = mix_towards(oracle, 2, 0.35)
    return oracle, teacher, student


def prompts_(n, seed=0):
    return np.random.default_rng(seed).integers(2, V, size=(n, LX)).astype(np.int32)


def exact(p, q, prompts):
    """Exact forward KL(p||q), reverse KL(q||p), JS averaged over `prompts`, by enumeration."""
    targets, mask = enumerate_responses()
    k, s = prompts.shape[0], targets.shape[0]
    inputs = np.repeat(prompts, s, axis=0)
    t, m = np.tile(targets, (k, 1)), np.tile(mask, (k, 1))
    lp = masked_scores(p, inputs, t, m)[0].sum(1).reshape(k, s)
    lq = masked_scores(q, inputs, t, m)[0].sum(1).reshape(k, s)
    lm = np.logaddexp(lp, lq) - math.log(2)
    pp, pq = np.exp(lp), np.exp(lq)
    return {
        "forward_kl": (pp * (lp - lq)).sum(1).mean(),
        "reverse_kl": (pq * (lq - lp)).sum(1).mean(),
        "js": (0.5 * pp * (lp - lm) + 0.5 * pq * (lq - lm)).sum(1).mean(),
    }


def make_evaluator(trio, prompts, **kwargs):
    oracle, teacher, student = trio
    args = dict(num_samples=16, max_decode_len=L, seed=0, batch_size=4)
    args.update(kwargs)
    return evaluation.Evaluator(oracle, teacher, student[0], prompts, **args)


@pytest.mark.parametrize("estimator", ["rao_blackwell", "plain"])
def test_evaluate_matches_exact_divergences(trio, estimator):
    prompts = prompts_(8)
    ev = make_evaluator(trio, prompts, estimator=estimator)
    metrics = ev.evaluate(trio[2][1])
    expected_keys = {
        f"{prefix}/{div}{suffix}"
        for prefix in ("proxy", "golden")
        for div in ("forward_kl", "reverse_kl", "js")
        for suffix in ("", "_stderr", "_per_token", "_per_token_stderr")
    }
    assert set(metrics) == expected_keys
    for prefix, ref in (("golden", trio[0]), ("proxy", trio[1])):
        truth = exact(ref, trio[2], prompts)
        for div, value in truth.items():
            got, se = metrics[f"{prefix}/{div}"], metrics[f"{prefix}/{div}_stderr"]
            assert 0 < se < 0.5 * value, (prefix, div, got, se)
            assert abs(got - value) < 3.5 * se, (prefix, div, got, value, se)
            assert 0 < metrics[f"{prefix}/{div}_per_token"] < got  # mean length > 1


def test_deterministic_common_random_numbers_and_compiled_once(trio):
    prompts = prompts_(7)  # 7 prompts in batches of 4: the last batch is padded
    ev = make_evaluator(trio, prompts)
    tokens, mask = ev.reference_samples("teacher")
    assert tokens.shape == mask.shape == (7 * 16, L)
    traces = sampling.trace_count()
    first = ev.evaluate(trio[2][1])
    after_first = sampling.trace_count()
    assert after_first - traces <= 1  # the student's sampler, once for all batches
    second = ev.evaluate(trio[2][1])
    assert sampling.trace_count() == after_first
    assert first == second
    # The reference samples were drawn once and not redrawn.
    np.testing.assert_array_equal(ev.reference_samples("teacher")[0], tokens)
    # Same seed, new evaluator: same numbers; another seed: different.
    assert make_evaluator(trio, prompts).evaluate(trio[2][1]) == first
    other = make_evaluator(trio, prompts, seed=1)
    assert other.evaluate(trio[2][1])["golden/js"] != first["golden/js"]


def test_student_equal_to_teacher_has_zero_proxy(trio):
    oracle, teacher, _ = trio
    ev = make_evaluator(trio, prompts_(5))
    metrics = ev.evaluate(teacher[1])
    for div in ("forward_kl", "reverse_kl", "js"):
        assert abs(metrics[f"proxy/{div}"]) < 1e-5
        assert metrics[f"golden/{div}"] > 0.05


@pytest.mark.slow
def test_sharded_on_a_mesh_gives_the_same_numbers(trio):
    prompts = prompts_(8)
    plain = make_evaluator(trio, prompts).evaluate(trio[2][1])
    mesh = partitioning.make_mesh({"data": -1, "model": 1})
    sharded = make_evaluator(trio, prompts, mesh=mesh).evaluate(trio[2][1])
    for key, value in plain.items():
        assert sharded[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_bad_inputs(trio):
    oracle, teacher, student = trio
    prompts = np.array([[2, 3, 4], [3, 3, 3], [4, 2, 2], [2, 2, 2]], np.int32)
    other_vocab = models.get_config("tiny", vocab_size=V + 3)
    with pytest.raises(ValueError, match=rf"vocab_size {V + 3}.*{V}|vocab_size {V}.*{V + 3}"):
        evaluation.Evaluator(oracle, teacher, other_vocab, prompts, num_samples=1, max_decode_len=L)
    # Trailing pads do not hide a shared prompt.
    train = np.array([[4, 4, 4, 4, 4], [*prompts[2], 0, 0]], np.int32)
    with pytest.raises(ValueError, match="1 evaluation prompt.*eval row 2 = train row 1"):
        evaluation.Evaluator(
            oracle,
            teacher,
            student[0],
            prompts,
            num_samples=1,
            max_decode_len=L,
            train_prompts=train,
        )
    with pytest.raises(ValueError, match="estimator"):
        make_evaluator(trio, prompts, estimator="nope")
    with pytest.raises(ValueError, match=r"prompts must be \[num_prompts"):
        make_evaluator(trio, prompts[0])


# ------------------------------------------------------------------------------ the watcher


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
    ckpt = checkpoints.Checkpointer(
        str(workdir / "checkpoints"), max_to_keep=None, async_save=False
    )
    sums = {}
    for step in (10, 20, 30):
        params = random_params(config, step)
        ckpt.save(step, {"params": params})
        sums[step] = float(np.asarray(params["decoder"]["logits_dense"]["kernel"]).sum())
    ckpt.close()
    return workdir, config, sums


def fresh_workdir(tmp_path, saved_steps):
    """A copy of the saved workdir (checkpoints only) so tests do not share eval state."""
    import shutil

    src, config, sums = saved_steps
    dst = tmp_path / "run"
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst, config, sums


def logged_steps(workdir):
    return [row["step"] for row in read_metrics(str(workdir / evaluation.EVAL_METRICS_FILE))]


def state_steps(workdir):
    with open(workdir / evaluation.EVAL_STATE_FILE) as f:
        return json.load(f)["evaluated_steps"]


def test_watch_evaluates_each_step_once_across_interruptions(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    interrupted = CountingEvaluator(config, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        evaluation.watch(str(workdir), interrupted, poll_seconds=0.01, timeout=0.2)
    assert logged_steps(workdir) == [10] and state_steps(workdir) == [10]
    # Restart: only the remaining steps, in order, each with its own params.
    ev = CountingEvaluator(config)
    done = evaluation.watch(str(workdir), ev, poll_seconds=0.01, timeout=0.2)
    assert done == [10, 20, 30]
    assert ev.calls == [sums[20], sums[30]]
    assert logged_steps(workdir) == [10, 20, 30] and state_steps(workdir) == [10, 20, 30]
    rows = read_metrics(str(workdir / evaluation.EVAL_METRICS_FILE))
    assert [r["proxy/forward_kl"] for r in rows] == [sums[10], sums[20], sums[30]]
    # A third run has nothing to do.
    again = CountingEvaluator(config)
    evaluation.watch(str(workdir), again, poll_seconds=0.01, timeout=0.1)
    assert again.calls == []


def test_watch_recovers_from_a_crash_between_metrics_and_state(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    # Step 20's line was written but the state not updated; then a line cut short.
    with open(workdir / evaluation.EVAL_METRICS_FILE, "w") as f:
        f.write('{"step": 10, "proxy/forward_kl": 1.0}\n{"step": 20, "proxy/forward_kl": 2.0}\n')
        f.write('{"step": 30, "proxy/for')
    with open(workdir / evaluation.EVAL_STATE_FILE, "w") as f:
        json.dump({"evaluated_steps": [10]}, f)
    ev = CountingEvaluator(config)
    evaluation.watch(str(workdir), ev, poll_seconds=0.01, timeout=0.1)
    assert ev.calls == [sums[30]]
    assert logged_steps(workdir) == [10, 20, 30] and state_steps(workdir) == [10, 20, 30]


def test_watch_waits_for_a_checkpoint_being_written(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    final = workdir / "checkpoints" / "30"
    partial = workdir / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
    final.rename(partial)  # what orbax shows while step 30 is being written
    ev = CountingEvaluator(config)
    assert evaluation.watch(str(workdir), ev, poll_seconds=0.01, timeout=0.1) == [10, 20]
    partial.rename(final)  # the save finished
    done = evaluation.watch(str(workdir), ev, poll_seconds=0.01, timeout=5, stop_after_step=30)
    assert done == [10, 20, 30] and ev.calls == [sums[10], sums[20], sums[30]]


def test_watch_stop_after_step_and_missing_checkpoints(tmp_path, saved_steps):
    workdir, config, sums = fresh_workdir(tmp_path, saved_steps)
    ev = CountingEvaluator(config)
    # stop_after_step returns as soon as it is evaluated (no timeout needed).
    assert evaluation.watch(str(workdir), ev, poll_seconds=0.01, stop_after_step=20) == [10, 20]
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.watch(str(empty), ev, poll_seconds=0.01, timeout=0.05)
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        evaluation.watch(str(empty), ev, poll_seconds=0.01, timeout=0.05)


def test_watch_with_the_real_evaluator(tmp_path, saved_steps, trio):
    workdir, config, _ = fresh_workdir(tmp_path, saved_steps)
    ev = make_evaluator(trio, prompts_(4))
    assert evaluation.watch(str(workdir), ev, poll_seconds=0.01, stop_after_step=20) == [10, 20]
    rows = read_metrics(str(workdir / evaluation.EVAL_METRICS_FILE))
    params = checkpoints.restore_params(
        str(workdir / "checkpoints"), 20, models.param_shapes(config)
    )
    assert rows[1] == {"step": 20, **ev.evaluate(params)}
    assert EOS == config.eos_id

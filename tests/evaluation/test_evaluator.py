"""Tests of evaluation.evaluator: the Evaluator (exactness, determinism, sharding, bad input).
The checkpoint watcher is tests/evaluation/test_watcher.py."""

import dataclasses

import jax
import numpy as np
import pytest
from test_divergences import (  # noqa: E402
    LX,
    V,
    exact_divergences,
    make_model,
)

from thack_jax import models
from thack_jax.decoding import sampling
from thack_jax.evaluation import batch_scoring, evaluator
from thack_jax.parallel import partitioning

L = 3


def mix_towards(model, seed, amount):
    other = make_model(seed)
    return model[0], jax.tree.map(lambda a, b: (1 - amount) * a + amount * b, model[1], other[1])


def make_trio():
    """(oracle, teacher, student) models; also used by test_eval_watch.py."""
    oracle = make_model(0)
    teacher = mix_towards(oracle, 1, 0.25)
    student = mix_towards(oracle, 2, 0.35)
    return oracle, teacher, student


@pytest.fixture(scope="module")
def trio():
    return make_trio()


def prompts_(n, seed=0):
    return np.random.default_rng(seed).integers(2, V, size=(n, LX)).astype(np.int32)


def make_evaluator(trio, prompts, mesh=None, **kwargs):
    """An Evaluator of `trio`; kwargs override the EvalSettings (16 samples, batch 4)."""
    oracle, teacher, student = trio
    args = dict(num_samples=16, max_decode_len=L, seed=0, batch_size=4)
    args.update(kwargs)
    settings = evaluator.EvalSettings(**args)
    return evaluator.Evaluator(oracle, teacher, student[0], prompts, settings, mesh=mesh)


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
        truth = exact_divergences(ref, trio[2], prompts)
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


def test_a_checkpoint_on_a_mesh_does_not_retrace_the_parameter_shapes(trio, monkeypatch):
    """The shardings of the student's params are worked out once: `models.param_shapes`
    traces the model's init, which cost as much as the tiny default's evaluation itself."""
    mesh = partitioning.make_mesh({"data": -1, "model": 1})
    ev = make_evaluator(trio, prompts_(8), mesh=mesh)
    first = ev.evaluate(trio[2][1])
    calls = []
    shapes = models.param_shapes
    monkeypatch.setattr(models, "param_shapes", lambda c: calls.append(c) or shapes(c))
    assert ev.evaluate(trio[2][1]) == first
    assert calls == []


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
        evaluator.Evaluator(oracle, teacher, other_vocab, prompts, evaluator.EvalSettings(1, L))
    # Trailing pads do not hide a shared prompt.
    train = np.array([[4, 4, 4, 4, 4], [*prompts[2], 0, 0]], np.int32)
    with pytest.raises(ValueError, match="1 evaluation prompt.*eval row 2 = train row 1"):
        evaluator.Evaluator(
            oracle, teacher, student[0], prompts, evaluator.EvalSettings(1, L), train_prompts=train
        )
    with pytest.raises(ValueError, match="estimator"):
        make_evaluator(trio, prompts, estimator="nope")
    with pytest.raises(TypeError, match="settings must be an EvalSettings"):
        evaluator.Evaluator(oracle, teacher, student[0], prompts, {"num_samples": 1})
    with pytest.raises(ValueError, match=r"prompts must be \[num_prompts"):
        make_evaluator(trio, prompts[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), "EvalSettings.num_samples=0 must be an integer >= 1"),
        (dict(batch_size=2.5), "EvalSettings.batch_size=2.5 must be an integer >= 1"),
        (dict(max_decode_len=0), "EvalSettings.max_decode_len=0 must be an integer >= 1"),
        (dict(seed="0"), "EvalSettings.seed='0' must be an integer"),
        (dict(estimator="nope"), "EvalSettings.estimator='nope' must be one of"),
        (dict(reference_cache_mib=-1), "EvalSettings.reference_cache_mib=-1 must be an"),
    ],
)
def test_eval_settings_name_the_bad_field(kwargs, match):
    args = dict(num_samples=2, max_decode_len=L) | kwargs
    with pytest.raises(ValueError, match=match):
        evaluator.EvalSettings(**args)


def test_eval_settings_are_frozen_and_sample_untruncated():
    s = evaluator.EvalSettings(np.int64(3), L, seed=np.int32(5))
    assert s == evaluator.EvalSettings(3, L, seed=5) and type(s.num_samples) is int
    assert s.sampling.num_samples == 3 and s.sampling.max_decode_len == L
    assert s.sampling.temperature == 1.0 and not s.sampling.truncated
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]


def _poisoned(model, path="encoder/layers_0/attention/query/kernel", value=np.nan):
    """A copy of `model` with one parameter set to `value` (as damaged bytes would)."""
    params = jax.tree.map(np.array, model[1])
    node = params
    *parents, leaf = path.split("/")
    for key in parents:
        node = node[key]
    node[leaf].flat[3] = value
    return model[0], params


@pytest.mark.parametrize("estimator", ["rao_blackwell", "plain"])
def test_nan_poisoned_oracle_is_an_error_naming_metric_and_step(trio, estimator):
    oracle, teacher, student = trio
    ev = make_evaluator((_poisoned(oracle), teacher, student), prompts_(5), estimator=estimator)
    with pytest.raises(evaluator.DegenerateEvaluationError) as info:
        ev.evaluate(student[1], step=300)
    message = str(info.value)
    assert info.value.metric == "golden/forward_kl" and info.value.step == 300
    assert message.startswith("evaluation of golden/forward_kl at step 300: ")
    assert "likely cause: non-finite or degenerate weights" in message
    if estimator == "rao_blackwell":  # NaN log-probs of the sampler: every term drops to 0
        assert "exactly 0.0 +- 0.0 between the student and the oracle" in message
        assert "the oracle has 1 non-finite parameters" in message
    else:
        assert "non-finite per-sequence values" in message


def test_nan_poisoned_student_is_an_error(trio):
    oracle, teacher, student = trio
    ev = make_evaluator(trio, prompts_(5))
    with pytest.raises(evaluator.DegenerateEvaluationError, match="^evaluation of golden/"):
        ev.estimates(_poisoned(student, "decoder/logits_dense/kernel")[1])


def test_same_model_against_itself_is_not_an_error(trio):
    oracle, teacher, student = trio
    ev = make_evaluator((oracle, teacher, student), prompts_(5))
    metrics = ev.evaluate(jax.tree.map(np.copy, oracle[1]), step=1)  # equal, not the same object
    for div in ("forward_kl", "reverse_kl", "js"):
        assert abs(metrics[f"golden/{div}"]) < 1e-6
        assert metrics[f"proxy/{div}"] > 0.05


def _zero(token_kl_values, mask, prompt_ids):
    """A stand-in estimator that returns exactly 0 +- 0."""
    n = len(np.unique(prompt_ids))
    per = np.zeros(len(prompt_ids))
    return evaluator.divergences.Estimate(0.0, 0.0, 0.0, 0.0, per, n, np.zeros(n))


def test_exact_zero_is_an_error_only_between_models_that_differ(trio, monkeypatch):
    """Whatever makes it (here a stubbed estimator), 0 +- 0 for models that differ is refused;
    for equal parameters (the same model thrice, copied) it is the right answer."""
    monkeypatch.setattr(evaluator.divergences, "rao_blackwell_kl", _zero)
    oracle = trio[0]
    same = [(oracle[0], jax.tree.map(np.copy, oracle[1])) for _ in range(3)]
    metrics = make_evaluator(same, prompts_(5)).evaluate(oracle[1])
    assert metrics["golden/forward_kl"] == metrics["proxy/reverse_kl"] == 0.0
    ev = make_evaluator(trio, prompts_(5))
    with pytest.raises(
        evaluator.DegenerateEvaluationError,
        match=r"golden/forward_kl: exactly 0.0 \+- 0.0 .*\(all parameters are finite\)",
    ):
        ev.evaluate(trio[2][1])


# ----------------------------------------------------------------------------- batch size


def _old_per_batch_sample(self, config, params, stream):
    """The draws before per-row keys: batch b sampled with fold_in(key, b), rows from 0."""
    key = jax.random.fold_in(self._key, stream)
    out = []
    for b, inputs in enumerate(self._batches):
        inputs = self._put(inputs, ("batch", "length"))
        s = sampling.sample(
            config, params, inputs, jax.random.fold_in(key, b), self.sampling, mesh=self.mesh
        )
        out.append((np.asarray(s.tokens), np.asarray(s.mask)))
    return out


def _samples_and_estimates(trio, prompts, batch_size, mesh=None):
    ev = make_evaluator(trio, prompts, mesh=mesh, num_samples=4, batch_size=batch_size)
    student = ev._sample(ev.student_config, ev.place_params(*trio[2]), evaluator.STREAMS["student"])
    tokens = {role: ev.reference_samples(role)[0] for role in ("oracle", "teacher")}
    rows = len(prompts) * 4
    tokens["student"] = np.concatenate([t for t, _ in student])[:rows]
    return tokens, ev.estimates(trio[2][1])


@pytest.mark.parametrize("mesh", [None, pytest.param("mesh", marks=pytest.mark.slow)])
def test_samples_and_estimates_do_not_depend_on_the_batch_size(trio, mesh, monkeypatch):
    prompts = prompts_(7, seed=4)  # 7 prompts: batches of 3 and of 8 both pad
    mesh = None if mesh is None else partitioning.make_mesh({"data": -1, "model": 1})
    small = _samples_and_estimates(trio, prompts, 3, mesh)
    large = _samples_and_estimates(trio, prompts, 8, mesh)
    for role in small[0]:
        np.testing.assert_array_equal(small[0][role], large[0][role], err_msg=role)
    assert set(small[1]) == set(large[1])
    for key, est in small[1].items():
        other = large[1][key]
        for name in ("value", "stderr", "per_token", "per_token_stderr"):
            assert getattr(est, name) == pytest.approx(getattr(other, name), rel=1e-6), key
        np.testing.assert_allclose(est.per_prompt, other.per_prompt, rtol=1e-5, atol=1e-6)
    # The property fails with the old per-batch keys.
    monkeypatch.setattr(evaluator.Evaluator, "_sample", _old_per_batch_sample)
    old_small = _samples_and_estimates(trio, prompts, 3, mesh)
    old_large = _samples_and_estimates(trio, prompts, 8, mesh)
    assert not np.array_equal(old_small[0]["teacher"], old_large[0]["teacher"])
    assert old_small[1]["golden/js"].value != pytest.approx(old_large[1]["golden/js"].value)
    # One batch: the old draws, bitwise (the default evaluates 256 prompts in one batch).
    for role in large[0]:
        np.testing.assert_array_equal(old_large[0][role], large[0][role], err_msg=role)
    for key, est in large[1].items():
        assert old_large[1][key].value == est.value, key


def test_one_batch_draws_with_the_key_of_old_batch_0(trio):
    """Per stream one key, fold_in(fold_in(key(seed), stream), 0): with one batch (first_row
    0) the draws of the old per-batch scheme; sampling's first_row=0 keeps the old numbers
    (tests/decoding/test_sampling.py)."""
    prompts = prompts_(5)
    ev = make_evaluator(trio, prompts, num_samples=2, batch_size=8)
    for role, model in (("oracle", trio[0]), ("teacher", trio[1])):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), evaluator.STREAMS[role]), 0)
        padded = np.concatenate([prompts, np.repeat(prompts[:1], 3, 0)])
        want = sampling.sample(model[0], model[1], padded, key, ev.sampling).tokens
        np.testing.assert_array_equal(ev.reference_samples(role)[0], np.asarray(want)[:10])


@pytest.mark.parametrize("mesh", [None, pytest.param("mesh", marks=pytest.mark.slow)])
def test_cached_reference_passes_give_the_same_numbers_bitwise(trio, mesh, monkeypatch):
    """The reference models' encoder outputs and own log-probs, computed once, change what a
    checkpoint recomputes (5 decoder passes instead of 7), not a number; a budget that holds
    only the oracle's log-probs recomputes the teacher's; 0 caches nothing."""
    mesh = None if mesh is None else partitioning.make_mesh({"data": -1, "model": 1})
    prompts = prompts_(7)  # batches of 4: the last one padded
    decoded = []
    real_decode = batch_scoring._decode_logprobs
    monkeypatch.setattr(
        batch_scoring, "_decode_logprobs", lambda *a: decoded.append(1) or real_decode(*a)
    )
    # Counted as half a MiB per batch and model: 1 MiB holds one model's 2 batches.
    monkeypatch.setattr(batch_scoring, "fixed_bytes", lambda *a: 2**19)
    results = {}
    for mib in (2, 0, 1):
        batch_scoring.score_fn.cache_clear()  # trace again: count the decoder passes
        ev = make_evaluator(trio, prompts, mesh=mesh, reference_cache_mib=mib)
        decoded.clear()
        results[mib] = ev.estimates(trio[2][1])
        results[mib, "passes"] = len(decoded)
    assert (results[2, "passes"], results[0, "passes"]) == (5, 7)
    assert results[1, "passes"] == 6  # the oracle's own log-probs cached, the teacher's not
    for key, est in results[0].items():
        for other in (results[2][key], results[1][key]):
            assert (other.value, other.stderr, other.per_token) == (
                est.value,
                est.stderr,
                est.per_token,
            ), key
            np.testing.assert_array_equal(other.per_prompt, est.per_prompt, err_msg=key)


# ----------------------------------------------------------------------------- field mode


@pytest.mark.parametrize("mesh", [None, pytest.param("mesh", marks=pytest.mark.slow)])
def test_without_oracle_only_the_proxy_is_measured_with_the_same_values(trio, mesh, monkeypatch):
    mesh = None if mesh is None else partitioning.make_mesh({"data": -1, "model": 1})
    prompts = prompts_(6)
    with_oracle = make_evaluator(trio, prompts, mesh=mesh).evaluate(trio[2][1])
    calls = []
    real_sample = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    decoded = []
    real_decode = batch_scoring._decode_logprobs
    monkeypatch.setattr(
        batch_scoring,
        "_decode_logprobs",
        lambda *a: decoded.append(1) or real_decode(*a),
    )
    batch_scoring.score_fn.cache_clear()  # trace again: count the decoder passes
    batch_scoring.fixed_fn.cache_clear()
    oracle, teacher, student = trio
    settings = evaluator.EvalSettings(16, L, seed=0, batch_size=4)
    ev = evaluator.Evaluator(None, teacher, student[0], prompts, settings, mesh=mesh)
    assert len(calls) == 2 and ev.mode == "field"  # the teacher's 2 batches, no oracle's
    field = ev.evaluate(trio[2][1])
    # The student's 2 batches; 3 decoder passes per checkpoint + the teacher's own, once.
    assert len(calls) == 4 and len(decoded) == 4
    assert set(field) == {k for k in with_oracle if k.startswith("proxy/")}
    for key, value in field.items():
        assert value == pytest.approx(with_oracle[key], rel=1e-6, abs=1e-9), key
    with pytest.raises(ValueError, match="no samples of 'oracle'"):
        ev.reference_samples("oracle")

"""Tests of evaluation.references and the Evaluator's reference metrics: the positional mask,
the cross-entropy against a direct `scoring.score` computation (early EOS, a response cut at
Ly_ref, a pad id 0 inside a response), the oracle-sample identity with golden/forward_kl,
and the refusal of bad reference sets before anything is sampled."""

import jax
import numpy as np
import pytest
from test_divergences import V  # noqa: E402
from test_evaluator import _poisoned, make_trio, prompts_  # noqa: E402

from thack_jax.decoding import sampling, scoring
from thack_jax.evaluation import batch_scoring, evaluator, references
from thack_jax.parallel import partitioning

LY_REF = 5  # longer than the evaluator's max_decode_len (3): references are their own length

# Row 0: EOS at position 2; row 1: no EOS, cut at LY_REF; row 2: pad id 0 before its EOS
# (scored: the mask is positional); row 3: only EOS (an empty response, 1 scored token).
REFS = np.array(
    [
        [3, 4, 1, 0, 0],
        [2, 3, 4, 2, 3],
        [3, 0, 0, 1, 0],
        [1, 0, 0, 0, 0],
    ],
    np.int32,
)
LENGTHS = [3, 5, 4, 1]


@pytest.fixture(scope="module")
def trio():
    return make_trio()


def make_ev(trio, prompts, refs, *, oracle=True, mesh=None, **kwargs):
    args = dict(num_samples=4, max_decode_len=3, seed=0, batch_size=3) | kwargs
    return evaluator.Evaluator(
        trio[0] if oracle else None,
        trio[1],
        trio[2][0],
        prompts,
        evaluator.EvalSettings(**args),
        mesh=mesh,
        references=refs,
    )


_score = jax.jit(scoring.score, static_argnums=0)


def direct_nll(model, prompts, refs, mask):
    """-log q(ref | prompt) per row from scoring.score's full log-probs, the positions of
    `mask` [N, Ly_ref] scored."""
    full = np.asarray(_score(model[0], model[1], prompts, refs).full_logprobs, np.float64)
    rows, cols = np.nonzero(mask)
    return -np.bincount(rows, full[rows, cols, refs[rows, cols]], minlength=len(refs))


# Built by hand from LENGTHS (not with references.positional_mask).
MASK = np.arange(LY_REF)[None, :] < np.array(LENGTHS)[:, None]


# ----------------------------------------------------------------------------- host functions


def test_positional_mask_counts_up_to_the_first_eos_never_tokens_not_zero():
    np.testing.assert_array_equal(references.lengths_of(REFS), LENGTHS)
    mask = references.positional_mask(REFS)
    np.testing.assert_array_equal(mask.sum(1), LENGTHS)
    assert mask[2].tolist() == [True, True, True, True, False]
    assert not np.array_equal(mask, REFS != 0)  # row 2 is where `!= 0` would differ


def test_cross_entropy_is_the_mean_nll_with_prompt_level_errors():
    lp = -np.arange(1.0, 21.0).reshape(4, 5) / 10
    mask = references.positional_mask(REFS)
    est = references.cross_entropy(lp, mask)
    nll = np.array([-(lp[i, :n]).sum() for i, n in enumerate(LENGTHS)])
    np.testing.assert_allclose(est.per_prompt, nll)
    np.testing.assert_allclose(est.value, nll.mean())
    np.testing.assert_allclose(est.stderr, nll.std(ddof=1) / 2)
    np.testing.assert_allclose(est.per_token, nll.sum() / sum(LENGTHS))
    lp[1, 0] = np.nan
    with pytest.raises(
        references.divergences.NonFiniteValuesError, match=r"reference responses at rows \[1\]"
    ):
        references.cross_entropy(lp, mask)


@pytest.mark.parametrize(
    "refs, match",
    [
        (REFS.astype(np.float32), "references must be integer token ids.*float32"),
        (REFS[:3], r"shape \[num_prompts=4, Ly_ref >= 1\].*\(3, 5\)"),
        (REFS[0], r"shape \[num_prompts=4.*\(5,\)"),
        (np.zeros((4, 0), np.int32), r"\(4, 0\)"),
        (
            np.pad(REFS, ((0, 0), (0, 60))),
            r"Ly_ref=65 \(shape \(4, 65\)\).*oracle's max_target_length=64",
        ),
        (np.where(np.arange(4)[:, None] == 2, 0, REFS), "row 2 has no token at all"),
        (np.where(REFS == 4, V, REFS), rf"row 0 holds token ids outside \[0, {V}\)"),
        (REFS - 1, rf"row 0 holds token ids outside \[0, {V}\)"),
    ],
)
def test_bad_references_are_refused_before_anything_is_sampled(trio, refs, match, monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=match):
        make_ev(trio, prompts_(4), refs)
    assert not calls


# ----------------------------------------------------------------------------- evaluator

MESHES = [None, pytest.param("mesh", marks=pytest.mark.slow)]


def _mesh(spec):
    return None if spec is None else partitioning.make_mesh({"data": -1, "model": 1})


@pytest.mark.parametrize("mesh", MESHES)
def test_reference_cross_entropy_equals_a_direct_computation(trio, mesh):
    prompts = prompts_(4, seed=3)
    ev = make_ev(trio, prompts, REFS, mesh=_mesh(mesh))  # batch 3: the last batch padded
    estimates = ev.estimates(trio[2][1])
    metrics = evaluator.metrics_of(estimates)
    for role, model in (("", trio[2]), ("oracle_", trio[0]), ("teacher_", trio[1])):
        key = f"reference/{role}cross_entropy"
        nll = direct_nll(model, prompts, REFS, MASK)
        np.testing.assert_allclose(estimates[key].per_prompt, nll, rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(metrics[key], nll.mean(), rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(metrics[f"{key}_per_token"], nll.sum() / sum(LENGTHS), rtol=1e-5)
        assert metrics[f"{key}_stderr"] > 0 and metrics[f"{key}_per_token_stderr"] > 0
    # The `!= 0` mask would drop row 2's two pad ids inside its response: another number
    # for that row only.
    got = estimates["reference/cross_entropy"].per_prompt
    not_zero = direct_nll(trio[2], prompts, REFS, REFS != 0)
    np.testing.assert_allclose(np.delete(not_zero, 2), np.delete(got, 2), rtol=1e-5)
    assert abs(not_zero[2] - got[2]) > 0.1
    # The levels are computed once and returned at every call.
    again = ev.evaluate(trio[1][1])
    assert again["reference/teacher_cross_entropy"] == metrics["reference/teacher_cross_entropy"]
    assert again["reference/cross_entropy"] == pytest.approx(
        again["reference/teacher_cross_entropy"], rel=1e-5
    )  # the student's params are the teacher's


def test_sampled_references_may_be_all_pad_ids_and_are_scored_whole(trio):
    """A model sample of pad ids only (no EOS) is a full-length response (world 1 of the
    default: the oracle sampled one of 256): accepted with references_sampled, scored at
    every position, while a task's all-pad row stays refused as missing."""
    prompts = prompts_(4, seed=3)
    refs = np.where(np.arange(4)[:, None] == 2, 0, REFS)
    with pytest.raises(ValueError, match="row 2 has no token at all"):
        make_ev(trio, prompts, refs)
    ev = evaluator.Evaluator(
        trio[0],
        trio[1],
        trio[2][0],
        prompts,
        evaluator.EvalSettings(num_samples=4, max_decode_len=3, seed=0, batch_size=3),
        references=refs,
        references_sampled=True,
    )
    got = ev.estimates(trio[2][1])["reference/cross_entropy"].per_prompt
    mask = references.positional_mask(refs)
    assert mask[2].all()  # no EOS: the whole row is the response
    np.testing.assert_allclose(got, direct_nll(trio[2], prompts, refs, mask), rtol=1e-5)


def test_oracle_samples_as_references_give_golden_forward_kl(trio):
    """With the evaluator's own oracle samples (1 per prompt) as references, the student's
    minus the oracle's cross-entropy is the plain golden forward KL, sequence by sequence."""
    prompts = prompts_(6, seed=5)
    plain = make_ev(trio, prompts, None, num_samples=1, estimator="plain")
    tokens, mask = plain.reference_samples("oracle")
    assert (tokens != 0).any(axis=1).all()  # no empty sample (they would be refused)
    np.testing.assert_array_equal(references.positional_mask(tokens), mask)
    ev = make_ev(trio, prompts, tokens, num_samples=1, estimator="plain")
    metrics = ev.evaluate(trio[2][1])
    diff = metrics["reference/cross_entropy"] - metrics["reference/oracle_cross_entropy"]
    assert diff == pytest.approx(metrics["golden/forward_kl"], rel=1e-5, abs=1e-6)
    assert metrics["golden/forward_kl"] == plain.evaluate(trio[2][1])["golden/forward_kl"]


def test_non_finite_reference_levels_and_student_are_degenerate(trio, monkeypatch):
    prompts = prompts_(4)
    poisoned = _poisoned(trio[1], "decoder/logits_dense/kernel")
    with pytest.raises(
        evaluator.DegenerateEvaluationError,
        match="^evaluation of reference/teacher_cross_entropy: non-finite log-probs",
    ):
        make_ev((trio[0], poisoned, trio[2]), prompts, REFS, oracle=False)
    ev = make_ev(trio, prompts, REFS, oracle=False)
    # NaN only in the student's log-probs of the references (the proxy stays finite).
    real = batch_scoring._reference_logprobs
    monkeypatch.setattr(batch_scoring, "_reference_logprobs", lambda *a: real(*a) * jax.numpy.nan)
    batch_scoring.score_fn.cache_clear()
    with pytest.raises(
        evaluator.DegenerateEvaluationError,
        match=r"^evaluation of reference/cross_entropy at step 4: non-finite log-probs .*rows \[0",
    ):
        ev.estimates(trio[2][1], step=4)
    batch_scoring.score_fn.cache_clear()  # later tests compile the real function again


def test_field_mode_with_references_has_the_proxy_and_the_teacher_level(trio):
    ev = make_ev(trio, prompts_(4), REFS, oracle=False)
    assert ev.reference_roles == ("teacher",) and ev.mode == "field"
    keys = set(evaluator.metrics_of(ev.estimates(trio[2][1])))
    stems = {k.split("/")[0] for k in keys}
    assert stems == {"proxy", "reference"}
    assert {k for k in keys if k.startswith("reference/")} == {
        f"reference/{name}{suffix}"
        for name in ("cross_entropy", "teacher_cross_entropy")
        for suffix in ("", "_stderr", "_per_token", "_per_token_stderr")
    }

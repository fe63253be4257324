"""Tests of thack_jax.evaluation.divergences: unit properties and exactness against enumeration."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from thack_jax.decoding import sampling
from thack_jax.evaluation import coverage as cv
from thack_jax.evaluation import divergences as dv

V, L, LX, EOS = cv.V, cv.L, cv.LX, cv.EOS


# ------------------------------------------------------------------------------ unit properties


def test_token_kl_matches_numpy_and_handles_zero_probabilities():
    rng = np.random.default_rng(0)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(3, 4, 7)) * 2), axis=-1)
    lq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(3, 4, 7)) * 2), axis=-1)
    p = np.exp(np.asarray(lp, np.float64))
    want = (p * (np.asarray(lp) - np.asarray(lq))).sum(-1)
    np.testing.assert_allclose(dv.token_kl(lp, lq), want, rtol=1e-5, atol=1e-6)
    # p(v) = 0 where q(v) = 0 too: the entry contributes 0, not nan.
    lp0 = jnp.array([[0.0, -jnp.inf]])
    lq0 = jnp.array([[math.log(0.5), -jnp.inf]])
    np.testing.assert_allclose(dv.token_kl(lp0, lq0), [math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(dv.token_kl(lp, lp), 0.0, atol=1e-6)


def test_mixture_token_kl_uses_prefix_weighted_mixture():
    rng = np.random.default_rng(1)
    la = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 4))), axis=-1)
    lb = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 4))), axis=-1)
    a_tok = jnp.asarray(rng.normal(size=(2, 3)) - 1.0)
    b_tok = jnp.asarray(rng.normal(size=(2, 3)) - 1.0)
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
    got = np.asarray(dv.mixture_token_kl(la, lb, a_tok, b_tok, mask))
    for i, t in itertools.product(range(2), range(3)):
        if not mask[i, t]:
            assert got[i, t] == 0.0
            continue
        pa, pb = math.exp(float(a_tok[i, :t].sum())), math.exp(float(b_tok[i, :t].sum()))
        w = pa / (pa + pb)
        a, b = np.exp(np.asarray(la[i, t], np.float64)), np.exp(np.asarray(lb[i, t], np.float64))
        m = w * a + (1 - w) * b
        np.testing.assert_allclose(got[i, t], (a * np.log(a / m)).sum(), rtol=1e-4, atol=1e-6)


def test_stderr_is_over_prompt_means_and_per_token_is_a_ratio_of_sums():
    # 3 prompts x 2 samples; a within-prompt constant must not shrink the stderr.
    values = np.array([1.0, 1.0, 2.0, 2.0, 6.0, 6.0])
    lengths = np.array([1.0, 3.0, 2.0, 2.0, 4.0, 4.0])
    ids = np.array([0, 0, 1, 1, 2, 2])
    est = dv.plain_kl(values, np.zeros(6), lengths, ids)
    a = np.array([1.0, 2.0, 6.0])
    assert est.value == pytest.approx(3.0)
    assert est.stderr == pytest.approx(a.std(ddof=1) / math.sqrt(3))
    assert est.per_token == pytest.approx(values.sum() / lengths.sum())
    b = np.array([2.0, 2.0, 4.0])
    r = a.sum() / b.sum()
    want = math.sqrt(((a - r * b) ** 2).sum() / 6) / b.mean()
    assert est.per_token_stderr == pytest.approx(want)
    assert est.num_prompts == 3
    np.testing.assert_array_equal(est.per_sequence, values)
    np.testing.assert_allclose(est.per_prompt, a)  # the values the mean and stderr are over
    single = dv.plain_kl([1.0, 2.0], [0.0, 0.0], [1, 1], [7, 7])
    assert single.value == 1.5 and math.isnan(single.stderr)


def test_js_bounds_and_symmetry():
    rng = np.random.default_rng(2)
    lp, lq = rng.normal(size=8) - 3, rng.normal(size=8) - 3
    ids = np.repeat(np.arange(4), 2)
    est = dv.plain_js(lp, lq, np.ones(8), ids, lp[::-1], lq[::-1], np.ones(8), ids)
    assert np.all(est.per_sequence <= math.log(2) + 1e-12)
    assert est.per_sequence.shape == (16,)
    swapped = dv.plain_js(lq[::-1], lp[::-1], np.ones(8), ids, lq, lp, np.ones(8), ids)
    assert swapped.value == pytest.approx(est.value)
    same = dv.plain_js(lp, lp, np.ones(8), ids, lp, lp, np.ones(8), ids)
    assert same.value == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_are_refused_with_names():
    with pytest.raises(ValueError, match="logq_seq"):
        dv.plain_kl(np.zeros(3), np.zeros(4), np.ones(3), np.arange(3))
    with pytest.raises(ValueError, match="prompt_ids"):
        dv.plain_kl(np.zeros(3), np.zeros(3), np.ones(3), np.arange(4))
    with pytest.raises(ValueError, match="mask"):
        dv.rao_blackwell_kl(np.zeros((3, 2)), np.ones((3, 4)), np.arange(3))
    with pytest.raises(ValueError, match="same prompts"):
        dv.rao_blackwell_js(
            np.zeros((2, 2)), np.ones((2, 2)), [0, 1], np.zeros((2, 2)), np.ones((2, 2)), [0, 2]
        )
    with pytest.raises(ValueError, match="non-finite"):
        dv.plain_kl([0.0, -np.inf], [0.0, 0.0], [1, 1], [0, 1])
    with pytest.raises(ValueError, match="interval method"):
        dv.half_width(1.0, 10, method="bootstrap")


def test_intervals_normal_and_student_t():
    est = dv.plain_kl([1.0, 2.0, 4.0, 3.0], np.zeros(4), np.ones(4), np.arange(4))
    low, high = dv.interval(est, method="normal")
    assert (high - low) / 2 == pytest.approx(1.959964 * est.stderr, rel=1e-6)
    low_t, high_t = dv.interval(est)  # the default: t with 3 dof, 3.182
    assert (high_t - low_t) / 2 == pytest.approx(3.182446 * est.stderr, rel=1e-6)
    assert low_t + high_t == pytest.approx(2 * est.value)
    # vectorised over stderrs and prompt counts; the t quantile tends to the normal one
    half = dv.half_width(np.array([1.0, 1.0]), np.array([40, 100000]), method="t")
    assert half[0] == pytest.approx(2.022691, rel=1e-6) and half[1] == pytest.approx(1.96, rel=1e-3)
    assert np.isnan(dv.half_width(1.0, 1, method="t"))


# ------------------------------------------------------------------- exactness by enumeration


# The enumeration helpers live in the coverage study (thack_jax/evaluation/coverage.py).
response_mask = cv.response_mask
enumerate_responses = cv.enumerate_responses
masked_scores = cv.masked_scores
make_model = cv.make_model
make_pair = cv.make_pair
random_params = cv.random_params


def exact_divergences(p, q, population):
    """{forward_kl, reverse_kl, js}: exact over the population (`coverage.exact_divergences`),
    checking that the enumerated space is complete (callers iterate over the three)."""
    exact = cv.exact_divergences(p, q, population)
    assert exact["p_mass"] == pytest.approx(1.0, rel=1e-5)
    assert exact["q_mass"] == pytest.approx(1.0, rel=1e-5)
    return {div: exact[div] for div in cv.DIVERGENCES}


def all_estimates(p, q, prompts, num_samples, rng):
    """The six estimates (plain and Rao-Blackwellised x forward, reverse, JS) of one draw."""
    ids = np.repeat(np.arange(prompts.shape[0]), num_samples)
    inputs = np.repeat(prompts, num_samples, axis=0)
    key_p, key_q = jax.random.split(rng)
    out = {}
    stats = {}
    for name, a, b, key in (("p", p, q, key_p), ("q", q, p, key_q)):
        s = sampling.sample(*a, prompts, key, num_samples=num_samples, max_decode_len=L)
        y, mask = np.asarray(s.tokens), np.asarray(s.mask)
        assert np.array_equal(mask, response_mask(y)), "sampler mask != up-to-first-EOS"
        a_tok, a_full = masked_scores(a, inputs, y, mask)
        b_tok, b_full = masked_scores(b, inputs, y, mask)
        kl = dv.token_kl(a_full, b_full)
        mix = dv.mixture_token_kl(a_full, b_full, a_tok, b_tok, mask)
        stats[name] = dict(
            a=a_tok.sum(1), b=b_tok.sum(1), len=mask.sum(1), mask=mask, kl=kl, mix=mix
        )
    sp, sq = stats["p"], stats["q"]
    out["plain/forward_kl"] = dv.plain_kl(sp["a"], sp["b"], sp["len"], ids)
    out["plain/reverse_kl"] = dv.plain_kl(sq["a"], sq["b"], sq["len"], ids)
    out["plain/js"] = dv.plain_js(
        sp["a"], sp["b"], sp["len"], ids, sq["b"], sq["a"], sq["len"], ids
    )
    out["rao_blackwell/forward_kl"] = dv.rao_blackwell_kl(sp["kl"], sp["mask"], ids)
    out["rao_blackwell/reverse_kl"] = dv.rao_blackwell_kl(sq["kl"], sq["mask"], ids)
    out["rao_blackwell/js"] = dv.rao_blackwell_js(
        sp["mix"], sp["mask"], ids, sq["mix"], sq["mask"], ids
    )
    return out


NUM_SEEDS, NUM_PROMPTS, NUM_SAMPLES, POPULATION = 20, 32, 8, 24


def run_exactness():
    """Coverage of the 95% intervals and the estimates over seeds, for each estimator."""
    p, q = make_pair()
    population = np.random.default_rng(0).integers(2, V, size=(POPULATION, LX)).astype(np.int32)
    exact = exact_divergences(p, q, population)
    estimates = {}
    for seed in range(NUM_SEEDS):
        # Prompts drawn from the population, so the stderr over prompts is the right one.
        rows = np.random.default_rng(100 + seed).integers(0, POPULATION, NUM_PROMPTS)
        draw = all_estimates(p, q, population[rows], NUM_SAMPLES, jax.random.key(seed))
        for name, est in draw.items():
            estimates.setdefault(name, []).append(est)
    return exact, estimates


@pytest.fixture(scope="module")
def exactness():
    return run_exactness()


@pytest.mark.slow
def test_exact_divergences_are_nontrivial(exactness):
    exact, _ = exactness
    assert 0.1 < exact["forward_kl"] < 5 and 0.1 < exact["reverse_kl"] < 5
    assert 0.01 < exact["js"] < math.log(2)


@pytest.mark.slow
def test_estimators_95_intervals_cover_the_exact_divergences(exactness):
    exact, estimates = exactness
    total = 0
    for name, ests in estimates.items():
        target = exact[name.split("/")[1]]
        covered = sum(abs(e.value - target) <= 1.96 * e.stderr for e in ests)
        assert covered >= 0.75 * NUM_SEEDS, (name, target, [(e.value, e.stderr) for e in ests])
        total += covered
        # Unbiased: the mean over seeds is within 4 standard errors of the exact value.
        values = np.array([e.value for e in ests])
        assert abs(values.mean() - target) < 4 * values.std(ddof=1) / math.sqrt(NUM_SEEDS)
    assert total >= 0.9 * len(estimates) * NUM_SEEDS


def within_prompt_variance(est, num_prompts=NUM_PROMPTS, num_samples=NUM_SAMPLES):
    """Mean over prompts (and, for JS, over the two sample sets) of the variance of the
    per-sequence terms among the samples of one prompt: the Monte Carlo noise that
    Rao-Blackwellisation reduces (the spread between prompts it cannot)."""
    return est.per_sequence.reshape(-1, num_samples).var(axis=1, ddof=1).mean()


def variance_ratios(estimates):
    """Rao-Blackwellised / plain: within-prompt per-sequence variance pooled over seeds, and
    the variance of the estimates over seeds."""
    out = {}
    for div in ("forward_kl", "reverse_kl", "js"):
        plain, rb = estimates[f"plain/{div}"], estimates[f"rao_blackwell/{div}"]
        within = np.mean([within_prompt_variance(e) for e in rb]) / np.mean(
            [within_prompt_variance(e) for e in plain]
        )
        seeds = np.var([e.value for e in rb], ddof=1) / np.var([e.value for e in plain], ddof=1)
        out[div] = (within, seeds)
    return out


@pytest.mark.slow
def test_rao_blackwell_has_lower_variance_than_plain(exactness):
    _, estimates = exactness
    for div, (within, over_seeds) in variance_ratios(estimates).items():
        assert within < 0.5, (div, within)
        assert over_seeds < 1.0, (div, over_seeds)


if __name__ == "__main__":  # prints the numbers quoted in docs/evaluation.md
    exact_values, ests_by_name = run_exactness()
    for est_name, ests in ests_by_name.items():
        tgt = exact_values[est_name.split("/")[1]]
        cov = sum(abs(e.value - tgt) <= 1.96 * e.stderr for e in ests)
        vals = np.array([e.value for e in ests])
        print(
            f"{est_name:26s} exact={tgt:.4f} mean={vals.mean():.4f} sd={vals.std(ddof=1):.4f} "
            f"mean_stderr={np.mean([e.stderr for e in ests]):.4f} coverage={cov}/{len(ests)}"
        )
    for div_name, (within_ratio, seeds_ratio) in variance_ratios(ests_by_name).items():
        print(
            f"variance ratio RB/plain {div_name}: within-prompt {within_ratio:.3f}, "
            f"over seeds {seeds_ratio:.3f}"
        )

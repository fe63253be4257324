"""Tests of the sampler's per-step strategies on hand-made logits: top-k / top-p filters,
composition and renormalisation, greedy, and the two draws (exact CDF edges, chi-square
against the distribution)."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from thack_jax.decoding import strategies


def _kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered)[0])).tolist())


def test_top_k_keeps_exactly_k_ties_to_lowest_id():
    logits = jnp.array([[1.0, 5.0, 3.0, 5.0, 2.0]])
    assert _kept(strategies.apply_top_k(logits, 2)) == {1, 3}
    assert _kept(strategies.apply_top_k(logits, 1)) == {1}  # tie at 5.0: lowest id wins
    assert _kept(strategies.apply_top_k(logits, 3)) == {1, 2, 3}
    assert _kept(strategies.apply_top_k(logits, 5)) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(strategies.apply_top_k(logits, 3)[0, 1:4], logits[0, 1:4])


def test_top_p_keeps_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.3, 0.2]]))
    assert _kept(strategies.apply_top_p(logits, 0.35)) == {1}
    assert _kept(strategies.apply_top_p(logits, 0.5)) == {1, 2}
    assert _kept(strategies.apply_top_p(logits, 0.75)) == {1, 2, 3}
    assert _kept(strategies.apply_top_p(logits, 0.95)) == {0, 1, 2, 3}
    ties = jnp.zeros((1, 4))  # uniform: the nucleus is filled in token-id order
    assert _kept(strategies.apply_top_p(ties, 0.2)) == {0}
    assert _kept(strategies.apply_top_p(ties, 0.3)) == {0, 1}
    rows = jnp.log(jnp.array([[0.1, 0.4, 0.3, 0.2], [0.4, 0.1, 0.2, 0.3]]))  # per row
    kept = np.isfinite(np.asarray(strategies.apply_top_p(rows, 0.5)))
    np.testing.assert_array_equal(kept, [[0, 1, 1, 0], [1, 0, 0, 1]])


def _draw(strategy, logits, n=3000):
    keys = jax.random.split(jax.random.key(0), n)
    return jax.jit(jax.vmap(lambda k: strategy(logits, k[None])))(keys)


def test_strategies_compose_and_renormalise():
    logits = jnp.log(jnp.array([[0.6, 0.25, 0.1, 0.05]]))
    # Temperature before top-p: at T=1 the 0.55 nucleus is {0}, at T=4 it is {0, 1}.
    tokens, logprobs = _draw(strategies.make_strategy(1.0, top_p=0.55), logits)
    assert set(np.unique(tokens)) == {0} and np.allclose(logprobs, 0.0, atol=1e-6)
    tokens, logprobs = _draw(strategies.make_strategy(4.0, top_p=0.55), logits)
    assert set(np.unique(tokens)) == {0, 1}
    tempered = np.exp(np.asarray(logits[0, :2]) / 4.0)
    want = np.log(tempered / tempered.sum())
    np.testing.assert_allclose(logprobs[:, 0], want[np.asarray(tokens[:, 0])], atol=1e-5)
    # top-k renormalises over the k kept tokens.
    tokens, logprobs = _draw(strategies.make_strategy(1.0, top_k=3), logits)
    assert set(np.unique(tokens)) == {0, 1, 2}
    np.testing.assert_allclose(
        logprobs[:, 0], np.log(np.array([0.6, 0.25, 0.1]) / 0.95)[np.asarray(tokens[:, 0])], 1e-5
    )
    tokens, _ = _draw(strategies.make_strategy(1.0, top_k=2, draw="gumbel"), logits)
    assert set(np.unique(tokens)) == {0, 1}
    # Greedy: argmax, ties to the lowest id, log-prob 0 (a point mass).
    tokens, logprobs = strategies.greedy(jnp.array([[0.0, 2.0, 2.0]]), None)
    assert int(tokens[0]) == 1 and float(logprobs[0]) == 0.0


def test_invert_cdf_edges():
    probs = jnp.array([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    u = jnp.array([0.0, 0.49, 0.5, 0.99, 1.0])  # 1.0 stands for a threshold rounded up
    np.testing.assert_array_equal(strategies.invert_cdf(probs, u), [1, 1, 3, 3, 3])


def test_draws_follow_the_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = jnp.log(jnp.asarray(probs))[None]
    for draw in strategies.DRAWS.values():
        tokens, logprobs = _draw(draw, logits, n=4000)
        counts = np.bincount(np.asarray(tokens[:, 0]), minlength=5)
        assert counts[4] == 0
        assert scipy.stats.chisquare(counts[:4], 4000 * probs[:4]).pvalue > 1e-3
        np.testing.assert_allclose(np.exp(logprobs[:, 0]), probs[np.asarray(tokens[:, 0])], 1e-5)

"""The sampling kernel with a decoder-only (Llama-architecture) model, through the one model
seam (models.api): prefill once, then the cached decode loop. The same checks as the T5
ones of test_sampling.py: log-probs equal scoring's, greedy is the teacher-forced argmax,
the same tokens on 1 and 8 devices, and the empirical distribution matches the exact one
enumerated with `scoring.score` (G test), a deliberately wrong variant failing it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import STAT_L, STAT_N, _all_responses, _g_test

from thack_jax import models
from thack_jax.decoding import sampling, scoring
from thack_jax.parallel import partitioning

EOS = 1
KWARGS = dict(num_samples=4, max_decode_len=10, return_full_logprobs=True)


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama (vocab 8, grouped-query attention), prompts of different lengths and
    a peakier output layer than Llama's init, so responses end at EOS and vary."""
    config = models.get_config("llama-tiny", vocab_size=8, init_std=0.125)
    params = models.init_params(config, jax.random.key(0))
    params["lm_head"]["kernel"] = 3.0 * params["lm_head"]["kernel"]
    inputs = jnp.array([[5, 2, 6, 7, 1, 0], [3, 4, 1, 0, 0, 0]], jnp.int32)
    return config, params, inputs


@pytest.fixture(scope="module")
def llama_sample(llama):
    config, params, inputs = llama
    return sampling.sample(config, params, inputs, jax.random.key(3), **KWARGS)


def test_logprobs_match_scoring(llama, llama_sample):
    config, params, inputs = llama
    out = llama_sample
    assert models.is_decoder_only(config)
    assert out.tokens.shape == (8, 10) and out.full_logprobs.shape == (8, 10, 8)
    mask = np.asarray(out.mask)
    assert mask.sum() > 16 and (~mask).sum() > 0, "want both tokens and padding"
    assert len({tuple(r) for r in np.asarray(out.tokens)}) > 4  # they vary
    s = scoring.score(config, params, jnp.repeat(inputs, 4, axis=0), out.tokens)
    gathered = scoring.gather_logprobs(s.full_logprobs, out.tokens)
    np.testing.assert_allclose(np.where(mask, gathered, 0.0), out.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(
        np.where(mask[..., None], s.full_logprobs, 0.0), out.full_logprobs, atol=1e-5
    )


def test_greedy_is_teacher_forced_argmax(llama):
    config, params, inputs = llama
    out = sampling.sample(
        config, params, inputs, jax.random.key(5), num_samples=2, max_decode_len=8,
        temperature=0.0, return_full_logprobs=True,
    )  # fmt: skip
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    np.testing.assert_array_equal(tokens[0], tokens[1])
    logits = models.logits(config, params, jnp.repeat(inputs, 2, axis=0), out.tokens)
    np.testing.assert_array_equal(np.where(mask, np.argmax(logits, -1), 0), tokens)


def test_a_prompt_samples_the_same_whatever_its_padding(llama):
    """Right- or left-padded, a prompt's samples are the same (positions come from the mask,
    not from the column)."""
    config, params, inputs = llama
    left = jnp.array([[0, 5, 2, 6, 7, 1], [0, 0, 0, 3, 4, 1]], jnp.int32)
    a = sampling.sample(config, params, inputs, jax.random.key(3), **KWARGS)
    b = sampling.sample(config, params, left, jax.random.key(3), **KWARGS)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [{"data": -1, "model": 1}, {"data": 4, "model": 2}])
def test_same_tokens_on_8_devices(llama, llama_sample, mesh_shape):
    assert jax.device_count() == 8
    config, params, inputs = llama
    mesh = partitioning.make_mesh(mesh_shape)
    shardings = partitioning.param_shardings(
        mesh, models.param_axes(config), models.param_shapes(config)
    )
    placed = jax.device_put(params, shardings)
    out = sampling.sample(config, placed, inputs, jax.random.key(3), mesh=mesh, **KWARGS)
    assert len(out.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(out.tokens, llama_sample.tokens)
    np.testing.assert_allclose(out.token_logprobs, llama_sample.token_logprobs, atol=1e-5)


def _exact(config, params, inputs):
    """(responses [S, L], probs [B, S]) of every response of length <= STAT_L."""
    seqs = _all_responses()
    lengths = np.array([list(s).index(EOS) + 1 if EOS in s else STAT_L for s in seqs])
    mask = np.arange(STAT_L)[None] < lengths[:, None]
    probs = []
    for prompt in inputs:
        s = scoring.score(config, params, jnp.tile(prompt, (len(seqs), 1)), jnp.asarray(seqs))
        token = np.asarray(scoring.gather_logprobs(s.full_logprobs, seqs))
        probs.append(np.exp(np.where(mask, token, 0.0).sum(axis=1)))
    probs = np.array(probs)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    return seqs, probs


@pytest.mark.slow
def test_empirical_distribution_matches_the_enumerated_one():
    config = models.get_config("llama-tiny", vocab_size=6, init_std=0.125)
    params = models.init_params(config, jax.random.key(0))
    kernel = params["lm_head"]["kernel"]  # EOS swapped with a likely token: short responses
    params["lm_head"]["kernel"] = 1.5 * kernel[:, jnp.array([0, 2, 1, 3, 4, 5])]
    inputs = jnp.array([[3, 4, 5, 2, 1], [5, 5, 2, 1, 0]], jnp.int32)
    seqs, probs = _exact(config, params, inputs)
    settings = dict(num_samples=STAT_N, max_decode_len=STAT_L)
    out = sampling.sample(config, params, inputs, jax.random.key(11), **settings)
    assert _g_test(out.tokens, seqs, probs) > 1e-3
    # A sampler with the wrong temperature draws from another distribution: the test sees it.
    hot = sampling.sample(config, params, inputs, jax.random.key(11), temperature=1.3, **settings)
    assert _g_test(hot.tokens, seqs, probs) < 1e-6

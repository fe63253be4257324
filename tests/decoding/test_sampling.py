"""Tests of the sampling kernel: fake models with known answers, exact distributions of a
tiny T5 (chi-square / G test against `scoring.score`), log-prob agreement with scoring,
sharding invariance, retracing and argument checks. The per-step strategies on hand-made
logits are in test_sampling_strategies.py."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from thack_jax import models
from thack_jax.decoding import sampling, scoring
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.parallel import partitioning

EOS = 1


# ----------------------------------------------------------------------------- fake model

FAKE_V = 10


def _fake_next(token, step, offset):
    """The fake model's deterministic next token."""
    return (3 * token + step + offset) % FAKE_V


def _fake_tokens_to_logits(cache, token, step):
    nxt = _fake_next(token, step, cache["offset"])
    logits = 50.0 * jax.nn.one_hot(nxt, FAKE_V) + 0.01 * jnp.arange(FAKE_V)
    return logits, {"offset": cache["offset"], "calls": cache["calls"] + 1}


def _fake_expected(offsets, length):
    tokens = np.zeros((len(offsets), length), np.int32)
    lengths = np.zeros(len(offsets), np.int32)
    for r, off in enumerate(offsets):
        token = 0
        for step in range(length):
            token = _fake_next(token, step, off)
            tokens[r, step] = token
            lengths[r] = step + 1
            if token == EOS:
                break
    return tokens, lengths


def _run_fake(offsets, length, return_full_logprobs=False, **settings):
    cache = {"offset": jnp.asarray(offsets, jnp.int32), "calls": jnp.zeros((), jnp.int32)}
    fn = jax.jit(
        lambda cache, rng: sampling.sample_with_fn(
            _fake_tokens_to_logits,
            cache,
            rng,
            SamplingConfig(max_decode_len=length, **settings),
            batch_size=len(offsets),
            token_ids=sampling.TokenIds(eos=EOS),
            return_full_logprobs=return_full_logprobs,
        )
    )
    return fn(cache, jax.random.key(0))


OFFSETS = [0, 1, 2, 3, 4, 5, 6, 7]


def test_fake_model_known_answer():
    length = 8
    want_tokens, want_lengths = _fake_expected(OFFSETS, length)
    assert want_lengths.min() < length and want_lengths.max() == length  # both cases occur
    variants = [dict(temperature=0.0), dict(top_k=2), dict(top_p=0.5), dict(draw="gumbel")]
    for kwargs in variants:
        out = _run_fake(OFFSETS, length, return_full_logprobs=True, **kwargs)
        np.testing.assert_array_equal(out.tokens, want_tokens, err_msg=str(kwargs))
        np.testing.assert_array_equal(out.lengths, want_lengths)
        np.testing.assert_array_equal(out.mask, np.arange(length) < want_lengths[:, None])
        # Peaked logits: every sampled token has log-prob ~0; pads exactly 0.
        assert np.all(np.abs(np.asarray(out.token_logprobs)) < 1e-6)
        assert np.all(np.asarray(out.full_logprobs)[~np.asarray(out.mask)] == 0)
        assert out.full_logprobs.shape == (len(OFFSETS), length, FAKE_V)
    assert _run_fake(OFFSETS, length).full_logprobs is None


def test_full_logprobs_are_tempered_model_distribution():
    out = _run_fake(OFFSETS, 6, temperature=0.5, return_full_logprobs=True)
    toks, lens = _fake_expected(OFFSETS, 6)
    for r, off in enumerate(OFFSETS):
        prev = 0
        for step in range(lens[r]):
            logits, _ = _fake_tokens_to_logits(
                {"offset": jnp.array([off]), "calls": 0}, jnp.array([prev]), step
            )
            want = jax.nn.log_softmax(logits[0] / 0.5)
            np.testing.assert_allclose(out.full_logprobs[r, step], want, atol=1e-5)
            prev = toks[r, step]


def test_loop_stops_when_all_rows_ended():
    calls = []

    def counting(cache, token, step):
        jax.debug.callback(lambda s: calls.append(int(s)), step)
        return _fake_tokens_to_logits(cache, token, step)

    offsets = [o for o in OFFSETS if _fake_expected([o], 16)[1][0] < 16]
    assert offsets, "need rows that end"
    _, lengths = _fake_expected(offsets, 16)
    cache = {"offset": jnp.asarray(offsets, jnp.int32), "calls": jnp.zeros((), jnp.int32)}
    out = jax.jit(
        lambda c: sampling.sample_with_fn(
            counting,
            c,
            jax.random.key(0),
            SamplingConfig(max_decode_len=16),
            batch_size=len(offsets),
            token_ids=sampling.TokenIds(eos=EOS),
        )
    )(cache)
    jax.block_until_ready(out)
    assert sorted(calls) == list(range(int(lengths.max())))
    np.testing.assert_array_equal(out.lengths, lengths)


# ----------------------------------------------------------------------------- tiny T5


@pytest.fixture(scope="module")
def tiny():
    config = models.get_config("tiny", vocab_size=32)
    params = models.init_params(config, jax.random.key(0))
    inputs = jnp.array([[5, 9, 12, 7, 1, 0], [3, 4, 1, 0, 0, 0]], jnp.int32)
    return config, params, inputs


TINY_KWARGS = dict(num_samples=4, max_decode_len=10, return_full_logprobs=True)


@pytest.fixture(scope="module")
def tiny_sample(tiny):
    """One T=1 sample of the tiny model (8 rows) and how many traces it took."""
    config, params, inputs = tiny
    before = sampling.trace_count()
    out = sampling.sample(config, params, inputs, jax.random.key(3), **TINY_KWARGS)
    return out, sampling.trace_count() - before


def test_logprobs_match_scoring(tiny, tiny_sample):
    config, params, inputs = tiny
    out, _ = tiny_sample
    n = TINY_KWARGS["num_samples"]
    assert out.tokens.shape == (8, 10) and out.full_logprobs.shape == (8, 10, 32)
    prompts = jnp.repeat(inputs, n, axis=0)  # prompt-major rows
    s = scoring.score(config, params, prompts, out.tokens)
    mask = np.asarray(out.mask)
    assert mask.sum() > 16 and (~mask).sum() > 0, "want both tokens and padding"
    np.testing.assert_array_equal(mask, np.arange(10) < np.asarray(out.lengths)[:, None])
    tokens = np.asarray(out.tokens)
    assert np.all(tokens[~mask] == 0)
    ends = tokens[np.arange(8), np.asarray(out.lengths) - 1]
    assert np.all((ends == EOS) | (np.asarray(out.lengths) == 10))
    assert len({tuple(r) for r in tokens}) > 4  # the samples of one prompt differ
    # Where scoring scores (token != 0) its token log-probs are ours; sampled pads inside a
    # response (an untrained model can emit id 0) are compared through the full log-probs.
    np.testing.assert_allclose(
        np.where(s.mask, out.token_logprobs, 0.0), s.token_logprobs, atol=1e-5
    )
    gathered = scoring.gather_logprobs(s.full_logprobs, out.tokens)
    np.testing.assert_allclose(np.where(mask, gathered, 0.0), out.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(
        np.where(mask[..., None], s.full_logprobs, 0.0), out.full_logprobs, atol=1e-5
    )


def test_tempered_top_k_logprobs(tiny):
    config, params, inputs = tiny
    t, k = 0.7, 5
    out = sampling.sample(
        config, params, inputs, jax.random.key(4), max_decode_len=6, temperature=t, top_k=k,
        return_full_logprobs=True,
    )  # fmt: skip
    s = scoring.score(config, params, inputs, out.tokens, temperature=t)
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(
        np.where(mask[..., None], s.full_logprobs, 0.0), out.full_logprobs, atol=1e-5
    )
    # The sampling distribution is the tempered one renormalised over the top k tokens.
    full = np.asarray(s.full_logprobs)
    top = np.sort(full, axis=-1)[..., -k:]
    renorm = scoring.gather_logprobs(full, out.tokens) - scipy.special.logsumexp(top, axis=-1)
    np.testing.assert_allclose(np.where(mask, renorm, 0.0), out.token_logprobs, atol=1e-5)
    chosen = np.asarray(scoring.gather_logprobs(full, out.tokens))
    assert np.all((chosen >= top[..., 0] - 1e-6)[mask])  # only top-k tokens were drawn


def test_greedy_is_teacher_forced_argmax(tiny):
    config, params, inputs = tiny
    out = sampling.sample(
        config, params, inputs, jax.random.key(5), num_samples=2, max_decode_len=8,
        temperature=0.0, return_full_logprobs=True,
    )  # fmt: skip
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    np.testing.assert_array_equal(tokens[0], tokens[1])  # greedy ignores the rng
    logits = models.logits(config, params, jnp.repeat(inputs, 2, axis=0), out.tokens)
    np.testing.assert_array_equal(np.where(mask, np.argmax(logits, -1), 0), tokens)
    assert np.all(np.asarray(out.token_logprobs) == 0.0)
    want = np.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)
    np.testing.assert_allclose(out.full_logprobs, want, atol=1e-5)


def test_sampling_config_equals_keywords(tiny, tiny_sample):
    config, params, inputs = tiny
    ref, _ = tiny_sample
    settings = SamplingConfig(num_samples=4, max_decode_len=10)
    before = sampling.trace_count()
    out = sampling.sample(
        config, params, inputs, jax.random.key(3), settings, return_full_logprobs=True
    )
    assert sampling.trace_count() == before  # the keyword call made the same settings
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    with pytest.raises(ValueError, match="not both"):
        sampling.sample(config, params, inputs, jax.random.key(3), settings, temperature=0.5)
    with pytest.raises(ValueError, match="needs max_decode_len"):
        sampling.sample(config, params, inputs, jax.random.key(3), num_samples=2)
    with pytest.raises(TypeError, match="max_len"):
        sampling.sample(config, params, inputs, jax.random.key(3), max_len=4)
    with pytest.raises(ValueError, match="exceeds config.max_target_length=64"):
        sampling.validate_sample_args(config, (2, 6), SamplingConfig(max_decode_len=65))


def test_compiled_once_per_shape(tiny, tiny_sample):
    config, params, inputs = tiny
    out, traces = tiny_sample
    assert traces == 1
    before = sampling.trace_count()
    other = sampling.sample(config, params, inputs[::-1], jax.random.key(1), **TINY_KWARGS)
    assert sampling.trace_count() == before  # new values, same shapes: no retrace
    assert not np.array_equal(other.tokens, out.tokens)


# The tokens of `tiny_sample` as the sampler drew them before `first_row` existed (row r drew
# with fold_in(fold_in(rng, t), r)); first_row = 0 must keep every existing number.
OLD_TINY_TOKENS = [
    [27, 5, 10, 15, 15, 20, 3, 11, 12, 7],
    [13, 10, 24, 1, 0, 0, 0, 0, 0, 0],
    [13, 23, 30, 29, 25, 10, 10, 10, 15, 18],
    [2, 13, 13, 25, 1, 0, 0, 0, 0, 0],
    [11, 27, 20, 15, 29, 3, 15, 23, 18, 15],
    [31, 30, 11, 30, 25, 16, 24, 30, 12, 7],
    [7, 17, 1, 0, 0, 0, 0, 0, 0, 0],
    [11, 10, 15, 8, 16, 21, 29, 2, 15, 10],
]


def test_first_row_zero_keeps_the_old_draws(tiny_sample):
    out, _ = tiny_sample
    np.testing.assert_array_equal(out.tokens, OLD_TINY_TOKENS)
    np.testing.assert_array_equal(out.lengths, [10, 4, 10, 5, 10, 10, 3, 10])


def test_first_row_makes_samples_independent_of_how_prompts_are_cut(tiny, tiny_sample):
    """Prompt 1 sampled alone as the second call of a list cut into calls of 1 prompt
    (first_row = 1 * 4 samples) draws exactly its rows of the call holding both prompts."""
    config, params, inputs = tiny
    ref, _ = tiny_sample
    before = sampling.trace_count()
    alone = sampling.sample(
        config, params, inputs[1:], jax.random.key(3), first_row=4, **TINY_KWARGS
    )
    np.testing.assert_array_equal(alone.tokens, ref.tokens[4:])
    np.testing.assert_array_equal(alone.lengths, ref.lengths[4:])
    np.testing.assert_allclose(alone.token_logprobs, ref.token_logprobs[4:], atol=1e-5)
    # Without first_row the call draws with row ids 0..3: other samples (the evaluator's
    # per-batch draws, which made its numbers depend on the batch size).
    plain = sampling.sample(config, params, inputs[1:], jax.random.key(3), **TINY_KWARGS)
    assert not np.array_equal(plain.tokens, ref.tokens[4:])
    other = sampling.sample(
        config, params, inputs[1:], jax.random.key(3), first_row=8, **TINY_KWARGS
    )
    assert not np.array_equal(other.tokens, alone.tokens)
    assert sampling.trace_count() - before == 1  # the new shape once; first_row is traced
    for bad in (-1, 2**32, 1.5, True, "4"):
        with pytest.raises(ValueError, match="first_row="):
            sampling.sample(config, params, inputs, jax.random.key(3), first_row=bad, **TINY_KWARGS)


@pytest.mark.parametrize(
    "mesh_shape",
    [{"data": -1, "model": 1}, pytest.param({"data": 4, "model": 2}, marks=pytest.mark.slow)],
)
def test_same_tokens_on_8_devices(tiny, tiny_sample, mesh_shape):
    assert jax.device_count() == 8
    config, params, inputs = tiny
    ref, _ = tiny_sample
    mesh = partitioning.make_mesh(mesh_shape)
    shardings = partitioning.param_shardings(
        mesh, models.param_axes(config), models.param_shapes(config)
    )
    placed = jax.device_put(params, shardings)
    # No context needed: sample(mesh=...) runs under partitioning.activate(mesh) itself.
    out = sampling.sample(config, placed, inputs, jax.random.key(3), mesh=mesh, **TINY_KWARGS)
    assert len(out.tokens.sharding.device_set) == 8
    assert not out.tokens.sharding.is_fully_replicated  # the 8 rows really are split
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.token_logprobs, ref.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(out.full_logprobs, ref.full_logprobs, atol=1e-5)


def test_explicit_mesh_is_rejected(tiny):
    config, params, inputs = tiny
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match="Auto mesh axes"):
        sampling.sample(config, params, inputs, jax.random.key(0), max_decode_len=4, mesh=mesh)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inputs_len=65), "exceeds config.max_input_length=64"),
        (dict(max_decode_len=65), "exceeds config.max_target_length=64"),
        (dict(max_decode_len=0), "max_decode_len=0"),
        (dict(top_k=33), "top_k=33 exceeds the vocabulary size 32"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=4, top_p=0.9), "both set"),
        (dict(num_samples=0), "num_samples=0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(inputs_dtype=jnp.float32), "integer token ids"),
        (dict(draw="multinomial"), "draw='multinomial'"),
    ],
)
def test_bad_arguments(tiny, kwargs, message):
    config, params, _ = tiny
    kwargs = {"max_decode_len": 4, **kwargs}
    inputs = jnp.ones((2, kwargs.pop("inputs_len", 6)), kwargs.pop("inputs_dtype", jnp.int32))
    before = sampling.trace_count()
    with pytest.raises(ValueError, match=message):
        sampling.sample(config, params, inputs, jax.random.key(0), **kwargs)
    assert sampling.trace_count() == before  # rejected before compiling


# ----------------------------------------------------------------------------- statistics

STAT_V, STAT_L, STAT_N = 6, 3, 10_000


@pytest.fixture(scope="module")
def stat_model():
    """A tiny T5 with vocabulary 6 whose exact response distribution is enumerable.

    The output kernel is scaled (peakier than at init) and its EOS column swapped with a
    likely token's, so EOS-terminated responses are common.
    """
    config = models.get_config("tiny", vocab_size=STAT_V)
    params = models.init_params(config, jax.random.key(0))
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = 1.5 * kernel[:, jnp.array([0, 2, 1, 3, 4, 5])]
    inputs = jnp.array([[3, 4, 5, 2, 1], [5, 5, 2, 1, 0]], jnp.int32)
    return config, params, inputs, _exact_distribution(config, params, inputs)


def _all_responses():
    """Every response of length <= STAT_L: EOS-terminated ones and length-capped ones."""
    seqs = []
    for length in range(1, STAT_L + 1):
        for prefix in itertools.product([t for t in range(STAT_V) if t != EOS], repeat=length - 1):
            if length < STAT_L:
                seqs.append(list(prefix) + [EOS] + [0] * (STAT_L - length))
            else:  # capped: the last token may be anything, EOS included
                seqs.extend(list(prefix) + [last] for last in range(STAT_V))
    return np.array(seqs, np.int32)


def _exact_distribution(config, params, inputs):
    """-> (responses [S, L], probs [B, S]) from scoring.score by enumeration."""
    seqs = _all_responses()
    lengths = np.array([list(s).index(EOS) + 1 if EOS in s else STAT_L for s in seqs])
    mask = np.arange(STAT_L)[None] < lengths[:, None]  # positional: id 0 can be a token
    probs = []
    for prompt in inputs:
        s = scoring.score(config, params, jnp.tile(prompt, (len(seqs), 1)), jnp.asarray(seqs))
        token = np.asarray(scoring.gather_logprobs(s.full_logprobs, seqs))
        probs.append(np.exp(np.where(mask, token, 0.0).sum(axis=1)))
    probs = np.array(probs)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    return seqs, probs


def _g_test(tokens, seqs, probs):
    """p-value of the G test of sampled rows [B * N, L] (prompt-major) against probs [B, S];
    categories with expected count < 5 are pooled per prompt."""
    index = {tuple(s): i for i, s in enumerate(seqs)}
    tokens = np.asarray(tokens).reshape(probs.shape[0], -1, seqs.shape[1])
    stat, dof = 0.0, 0
    for p, rows in zip(probs, tokens, strict=True):
        counts = np.bincount([index[tuple(r)] for r in rows], minlength=len(seqs))
        expected = p * len(rows)
        small = expected < 5
        obs = np.append(counts[~small], counts[small].sum())
        exp = np.append(expected[~small], expected[small].sum())
        nz = obs > 0
        stat += 2.0 * np.sum(obs[nz] * np.log(obs[nz] / exp[nz]))
        dof += len(obs) - 1
    return scipy.stats.chi2.sf(stat, dof)


def _sample_wrapped(config, params, inputs, wrap):
    """Like `sample` (T=1) but through `sample_with_fn` with a wrapped decode step."""

    @jax.jit
    def run(params, inputs, rng):
        encoded = models.encode(config, params, inputs)
        cache = models.init_cache(config, params, encoded, inputs, STAT_L)
        cache = sampling.repeat_rows(cache, STAT_N)

        def step_fn(cache, token, step):
            return models.decode_step(config, params, cache, token, step)

        return sampling.sample_with_fn(
            lambda c, t, s: wrap(step_fn, c, t, s),
            cache,
            rng,
            SamplingConfig(max_decode_len=STAT_L, num_samples=STAT_N),
            batch_size=inputs.shape[0],
            token_ids=sampling.TokenIds(eos=EOS),
        )

    return run(params, inputs, jax.random.key(11))


def _wrong_temperature(step_fn, cache, token, step):
    logits, cache = step_fn(cache, token, step)
    return logits / 1.3, cache


def _off_by_one_position(step_fn, cache, token, step):
    # Writes each token one position too early (the start token is overwritten).
    return step_fn(cache, token, jnp.maximum(step - 1, 0))


@pytest.mark.slow
def test_empirical_distribution_matches_scoring(stat_model):
    config, params, inputs, (seqs, probs) = stat_model
    out = sampling.sample(
        config, params, inputs, jax.random.key(11), num_samples=STAT_N, max_decode_len=STAT_L
    )
    assert _g_test(out.tokens, seqs, probs) > 1e-3
    gumbel = sampling.sample(
        config, params, inputs, jax.random.key(12), num_samples=STAT_N, max_decode_len=STAT_L,
        draw="gumbel",
    )  # fmt: skip
    assert _g_test(gumbel.tokens, seqs, probs) > 1e-3
    # The wrapper path with the identity wrapper is the same sampler (same tokens)...
    same = _sample_wrapped(config, params, inputs, lambda f, c, t, s: f(c, t, s))
    np.testing.assert_array_equal(same.tokens, out.tokens)
    # ...so the deliberately wrong variants below differ only by their bug, and must fail.
    for wrong in (_wrong_temperature, _off_by_one_position):
        bad = _sample_wrapped(config, params, inputs, wrong)
        assert _g_test(bad.tokens, seqs, probs) < 1e-6, wrong.__name__


def test_sample_with_fn_bad_arguments():
    with pytest.raises(ValueError, match="TokenIds.eos"):
        sampling.TokenIds(eos=1.5)
    with pytest.raises(ValueError, match="settings must be a SamplingConfig"):
        sampling.sample_with_fn(
            _fake_tokens_to_logits, {}, jax.random.key(0), {"max_decode_len": 4}, batch_size=2
        )
    # N = batch_size * num_samples rows: a cache of 8 rows with 2 samples needs batch_size 4.
    eight_rows = lambda cache, token, step: (jnp.zeros((8, FAKE_V)), cache)
    with pytest.raises(ValueError, match="logits \\[16, V\\]"):
        sampling.sample_with_fn(
            eight_rows,
            {},
            jax.random.key(0),
            SamplingConfig(max_decode_len=4, num_samples=2),
            batch_size=8,
        )

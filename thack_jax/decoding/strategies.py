"""Per-step token strategies of the sampler: filters and draws over logits [N, V].

A strategy maps (logits [N, V] float32, keys [N]) to (tokens [N] int32, log-probs [N]
float32), one row per sequence being decoded. `make_strategy` composes it: greedy when
temperature == 0, else temperature, then an optional top-k or top-p filter, then a draw.
`sampling.sample_with_fn` calls it once per decoding step; `validate_strategy` checks its
arguments (also for `sampling.validate_sample_args`, before anything is compiled).

Draws: `inverse_cdf` (default) inverts the CDF at one uniform per row; `gumbel` is
`jax.random.categorical`, same distribution, but it needs V random numbers per row, which
on CPU costs more than the model's output projection.

The returned log-prob is that of the drawn token under the SAMPLING distribution, i.e.
log_softmax of logits / T after the top-k / top-p truncation (renormalised); greedy draws
from a point mass, so its log-probs are 0.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

# (logits [N, V] float32, keys [N]) -> (tokens [N] int32, log-probs [N] float32).
Strategy = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def greedy(logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Argmax (ties: the lowest token id); log-prob 0 (a point mass). logits [N, V]."""
    del keys
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, jnp.zeros(logits.shape[:1], jnp.float32)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """logits [N, V] / temperature (temperature > 0)."""
    return logits / jnp.asarray(temperature, logits.dtype)


def _keep(logits: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, logits, -jnp.inf)


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keeps exactly the k largest logits per row [N, V], the rest become -inf.

    Ties at the k-th place are broken towards the lowest token id (`jax.lax.top_k` order),
    so exactly k tokens remain even when several share the k-th value.
    """
    _, index = jax.lax.top_k(logits, k)  # [N, k]
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, index].set(True)
    return _keep(logits, keep)


def apply_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter on logits [N, V]: keeps the smallest set of most likely tokens whose
    probability reaches p; the rest become -inf.

    Tokens are ranked by probability, ties by lowest token id; a token is kept when the
    mass of the tokens ranked before it is < p, so the top token is always kept and a tie
    straddling the boundary is split by token id.
    """
    order = jnp.argsort(-logits, axis=-1, stable=True)  # [N, V], descending, ties by id
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
    return _keep(logits, keep)


def _chosen_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def gumbel(logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One draw per row from softmax(logits [N, V]) by `jax.random.categorical` (Gumbel-max,
    V random numbers per row) with that row's key (keys [N]).

    Returns (tokens [N] int32, log-probs [N] of the drawn tokens under softmax(logits)).
    """
    tokens = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    return tokens, _chosen_logprobs(logits, tokens)


def inverse_cdf(logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One draw per row from softmax(logits [N, V]) by inverting its CDF at one uniform per
    row (keys [N]): the same distribution as `gumbel`, with 1 random number per row instead
    of V (on CPU, V-wide threefry costs more than the output projection; see
    docs/performance.md). The uniform's resolution is 2^-23 (float32).

    Returns (tokens [N] int32, log-probs [N] of the drawn tokens under softmax(logits)).
    """
    u = jax.vmap(jax.random.uniform)(keys)  # [N] in [0, 1)
    tokens = invert_cdf(jax.nn.softmax(logits, axis=-1), u)
    return tokens, _chosen_logprobs(logits, tokens)


def invert_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """probs [N, V] (rows sum to ~1), u [N] in [0, 1) -> the first token [N] whose CDF
    exceeds u * total; that token has probability > 0. When rounding puts the threshold at
    the total, the last token with probability > 0."""
    cdf = jnp.cumsum(probs, axis=-1)
    tokens = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    last = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    return jnp.minimum(tokens, last).astype(jnp.int32)


DRAWS = {"inverse_cdf": inverse_cdf, "gumbel": gumbel}


def make_strategy(
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, draw: str = "inverse_cdf"
) -> Strategy:
    """Composes the token choice: greedy when temperature == 0, else temperature, then the
    optional top-k (k > 0) or top-p (p < 1) filter, then a draw (`DRAWS[draw]`)."""
    validate_strategy(temperature, top_k, top_p, draw=draw)
    if temperature == 0:
        return greedy
    filters = []
    if temperature != 1:
        filters.append(functools.partial(apply_temperature, temperature=temperature))
    if top_k > 0:
        filters.append(functools.partial(apply_top_k, k=top_k))
    if top_p < 1:
        filters.append(functools.partial(apply_top_p, p=top_p))

    def strategy(logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        for f in filters:
            logits = f(logits)
        return draw_fn(logits, keys)

    draw_fn = DRAWS[draw]
    return strategy


def validate_strategy(
    temperature: float,
    top_k: int,
    top_p: float,
    vocab_size: int | None = None,
    draw: str = "inverse_cdf",
) -> None:
    """Raises ValueError naming the bad argument."""
    if draw not in DRAWS:
        raise ValueError(f"draw={draw!r}; expected one of {sorted(DRAWS)}")
    if not isinstance(temperature, numbers.Real) or math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy)")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 = off)")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = off)")
    if top_k > 0 and top_p < 1:
        raise ValueError(f"top_k={top_k} and top_p={top_p} are both set; choose one")

"""Sequence-level divergence estimators (Monte Carlo over sampled responses) with errors.

Two models of responses y given a prompt x: p (the reference: teacher or oracle) and q (the
student). The divergences, sequence-level, averaged over prompts x:

  KL(p || q) = E_x E_{y~p(.|x)} [log p(y|x) - log q(y|x)]                  (forward KL)
  KL(q || p)  the same with the roles swapped, samples from q               (reverse KL)
  JS(p, q)   = 0.5 KL(p || m) + 0.5 KL(q || m),  m = (p + q) / 2           (Jensen-Shannon)

Two unbiased estimators of each:
- plain: the log-ratio of each sampled sequence, e.g. log p(y) - log q(y) for y ~ p, and for
  JS log p(y) - log m(y) (y ~ p) and log q(y) - log m(y) (y ~ q) with
  log m(y) = logsumexp(log p(y), log q(y)) - log 2.
- Rao-Blackwellised: the expectation of each token's log-ratio over the token, given the
  sampled prefix: sum_t KL(p(.|x,y<t) || q(.|x,y<t)) for y ~ p (full-vocabulary token KL).
  For JS the token distribution of the mixture given a prefix is itself a mixture,
  m(.|y<t) = w_t p(.|y<t) + (1 - w_t) q(.|y<t) with w_t = p(y<t) / (p(y<t) + q(y<t)), so
  KL(p || m) = E_{y~p} sum_t KL(p(.|y<t) || m(.|y<t)) (`mixture_token_kl`). Each term is
  >= 0, so these estimates are never negative, and their variance is lower.

Errors: samples of one prompt are correlated (they share x), so every estimate first
averages the samples of each prompt, A_i, and the standard error is the one of a mean over
independent prompts: std(A_i, ddof=1) / sqrt(P). JS pairs the p- and q-samples of a prompt:
A_i = 0.5 mean_p(i) + 0.5 mean_q(i). With fewer than 2 prompts the stderr is nan.

Intervals (`half_width`, `interval`): value +- c * stderr with c Student's t quantile with
P - 1 degrees of freedom (`method="t"`, the default: 2.02 at P = 40, 1.97 at P = 200) or
the normal one (`method="normal"`, 1.96 at 95%): the t interval allows for the stderr
itself being estimated from P prompt means, and it is the one that covered at >= 94% with
few prompts (docs/evaluation.md, "Coverage and bias").

Per-token normalisation: a ratio of sums, (sum of per-sequence values) / (number of response
tokens, EOS included), i.e. mean_i A_i / mean_i B_i with B_i the prompt's mean response
length (for JS, length under m: 0.5 mean_p(i) + 0.5 mean_q(i)). It estimates
E[divergence] / E[length] (consistent, not unbiased); its standard error is the delta
method's for a ratio of prompt means: sqrt(sum_i (A_i - R B_i)^2 / (P (P - 1))) / mean_i B_i.

The token-level helpers (`token_kl`, `mixture_token_kl`) are jnp and run inside jit; the
estimators take host arrays ([N] per sequence or [N, L] per token) and compute in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LOG2 = math.log(2.0)
INTERVAL_METHODS = ("normal", "t")


class NonFiniteValuesError(ValueError):
    """Per-sequence values with NaN/inf: a model with non-finite outputs (or weights)."""


class Estimate(NamedTuple):
    """A divergence estimate over prompts.

    value: mean over prompts of the per-prompt mean of `per_sequence` (nats per sequence);
    stderr: its standard error over prompts; per_token / per_token_stderr: nats per response
    token (ratio of sums, see the module docstring); per_sequence [N]: the estimator's term of
    each sequence (JS: the p-sample terms then the q-sample terms); num_prompts: P;
    per_prompt [P]: the per-prompt values whose mean is `value` (sorted prompt ids), what a
    bootstrap over prompts resamples.
    """

    value: float
    stderr: float
    per_token: float
    per_token_stderr: float
    per_sequence: np.ndarray
    num_prompts: int
    per_prompt: np.ndarray


def half_width(stderr, num_prompts, level: float = 0.95, method: str = "t"):
    """Half-width of the two-sided `level` interval: stderr [...] x quantile -> [...].

    method: 't' (Student's t with num_prompts - 1 dof; nan below 2 prompts; the default) or
    'normal' (z quantile). Array or scalar stderr; num_prompts an int or an array
    broadcasting with it.
    """
    from scipy import stats  # numpy-only callers (reports) need not import it

    if method not in INTERVAL_METHODS:
        raise ValueError(f"interval method {method!r}; valid: {INTERVAL_METHODS}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level} must be in (0, 1)")
    tail = 0.5 + 0.5 * level
    if method == "normal":
        quantile = stats.norm.ppf(tail)
    else:
        dof = np.asarray(num_prompts, np.float64) - 1.0
        quantile = np.where(dof >= 1, stats.t.ppf(tail, np.maximum(dof, 1.0)), np.nan)
    return np.asarray(stderr, np.float64) * quantile


def interval(est: Estimate, level: float = 0.95, method: str = "t") -> tuple[float, float]:
    """(low, high) of the `level` interval of an Estimate's value (see `half_width`)."""
    half = float(half_width(est.stderr, est.num_prompts, level, method))
    return est.value - half, est.value + half


# ----------------------------------------------------------------------------- token level (jnp)


def token_kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Full-vocabulary KL(p || q) of each position: [..., V] x2 log-probs -> [...] (>= 0)."""
    logp = logp.astype(jnp.float32)
    logq = logq.astype(jnp.float32)
    # p = 0 entries contribute 0 (x log x -> 0), even where q = 0 too.
    terms = jnp.where(logp > -jnp.inf, jnp.exp(logp) * (logp - logq), 0.0)
    return jnp.maximum(terms.sum(axis=-1), 0.0)


def prefix_logprobs(token_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """log-prob of the prefix y<t of each position: [B, L] -> [B, L] (exclusive cumsum)."""
    lp = jnp.where(mask, token_logprobs, 0.0).astype(jnp.float32)
    return jnp.cumsum(lp, axis=-1) - lp


def mixture_token_kl(
    loga: jax.Array, logb: jax.Array, a_tokens: jax.Array, b_tokens: jax.Array, mask: jax.Array
) -> jax.Array:
    """KL(a(.|y<t) || m(.|y<t)) at each position of sequences y, m = (a + b) / 2 sequence-level.

    loga, logb [B, L, V]: full log-probs of the two models along y; a_tokens, b_tokens [B, L]:
    their log-probs of the tokens of y; mask [B, L]. The conditional of the sequence mixture
    is w_t a + (1 - w_t) b with w_t = a(y<t) / (a(y<t) + b(y<t)). Returns [B, L] (0 at pads).
    """
    pa = prefix_logprobs(a_tokens, mask)
    pb = prefix_logprobs(b_tokens, mask)
    norm = jnp.logaddexp(pa, pb)
    log_w, log_1mw = (pa - norm)[..., None], (pb - norm)[..., None]
    loga = loga.astype(jnp.float32)
    logm = jnp.logaddexp(log_w + loga, log_1mw + logb.astype(jnp.float32))
    return jnp.where(mask, token_kl(loga, logm), 0.0)


# ------------------------------------------------------------------------ estimators (numpy)


def log_mixture(logp_seq, logq_seq) -> np.ndarray:
    """log m(y) = logsumexp(log p(y), log q(y)) - log 2, elementwise. [N] x2 -> [N]."""
    return np.logaddexp(np.asarray(logp_seq, np.float64), np.asarray(logq_seq, np.float64)) - LOG2


def _as_1d(name: str, x, n: int | None = None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or (n is not None and x.shape[0] != n):
        want = f"[{n}]" if n is not None else "[N]"
        raise ValueError(f"{name} has shape {x.shape}; want {want}")
    return x


def _prompt_means(values, lengths, prompt_ids, what: str):
    """Per-prompt means -> (sorted unique prompt ids [P], mean values [P], mean lengths [P])."""
    values = _as_1d(f"{what} values", values)
    n = values.shape[0]
    if n == 0:
        raise ValueError(f"{what}: no sequences")
    lengths = _as_1d(f"{what} lengths", lengths, n)
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.shape != (n,):
        raise ValueError(f"{what} prompt_ids has shape {prompt_ids.shape}; want [{n}]")
    if not np.all(np.isfinite(values)):
        bad = np.flatnonzero(~np.isfinite(values))[:5]
        raise NonFiniteValuesError(f"{what}: non-finite per-sequence values at rows {bad.tolist()}")
    ids, inverse, counts = np.unique(prompt_ids, return_inverse=True, return_counts=True)
    mean_v = np.bincount(inverse, weights=values) / counts
    mean_l = np.bincount(inverse, weights=lengths) / counts
    return ids, mean_v, mean_l


def _combine(parts, per_sequence: np.ndarray) -> Estimate:
    """parts: [(values [N], lengths [N], prompt_ids [N], weight, name)] over the same prompts."""
    a = b = ids0 = None
    for values, lengths, prompt_ids, weight, name in parts:
        ids, mean_v, mean_l = _prompt_means(values, lengths, prompt_ids, name)
        if ids0 is None:
            ids0, a, b = ids, weight * mean_v, weight * mean_l
            continue
        if not np.array_equal(ids, ids0):
            raise ValueError(
                f"{name} covers prompts {ids.tolist()[:8]}... but {parts[0][4]} covers "
                f"{ids0.tolist()[:8]}...; both sample sets must use the same prompts"
            )
        a, b = a + weight * mean_v, b + weight * mean_l
    p = a.shape[0]
    value = float(a.mean())
    total_len = float(b.mean())
    per_token = value / total_len if total_len > 0 else float("nan")
    if p < 2:
        stderr = per_token_stderr = float("nan")
    else:
        stderr = float(a.std(ddof=1) / math.sqrt(p))
        resid = a - per_token * b
        per_token_stderr = float(math.sqrt((resid**2).sum() / (p * (p - 1))) / total_len)
    return Estimate(value, stderr, per_token, per_token_stderr, per_sequence, p, a)


def _token_sums(name: str, token_values, mask) -> tuple[np.ndarray, np.ndarray]:
    token_values = np.asarray(token_values, np.float64)
    mask = np.asarray(mask).astype(bool)
    if token_values.ndim != 2 or token_values.shape != mask.shape:
        raise ValueError(
            f"{name} has shape {token_values.shape} and mask {mask.shape}; want equal [N, L]"
        )
    return np.where(mask, token_values, 0.0).sum(axis=1), mask.sum(axis=1).astype(np.float64)


def plain_kl(logp_seq, logq_seq, lengths, prompt_ids) -> Estimate:
    """KL(p || q) from sequences y ~ p: mean of log p(y) - log q(y).

    logp_seq, logq_seq [N]: sequence log-probs under p and q; lengths [N]: response tokens
    (EOS included); prompt_ids [N]: the prompt of each sequence.
    """
    logp = _as_1d("logp_seq", logp_seq)
    values = logp - _as_1d("logq_seq", logq_seq, logp.shape[0])
    return _combine([(values, lengths, prompt_ids, 1.0, "plain_kl")], values)


def rao_blackwell_kl(token_kl_values, mask, prompt_ids) -> Estimate:
    """KL(p || q) from sequences y ~ p: mean of sum_t KL(p(.|y<t) || q(.|y<t)).

    token_kl_values [N, L] (e.g. `token_kl` of full log-probs), mask [N, L], prompt_ids [N].
    """
    values, lengths = _token_sums("token_kl_values", token_kl_values, mask)
    return _combine([(values, lengths, prompt_ids, 1.0, "rao_blackwell_kl")], values)


def plain_js(
    logp_on_p, logq_on_p, lengths_p, prompt_ids_p, logp_on_q, logq_on_q, lengths_q, prompt_ids_q
) -> Estimate:
    """JS(p, q) from sequences y ~ p ([N] arrays `*_p`) and y ~ q ([M] arrays `*_q`).

    logp_on_p / logq_on_p: log p(y), log q(y) of the p-samples; likewise for the q-samples.
    Both sample sets must cover the same prompts.
    """
    logp_on_p, logq_on_p = _as_1d("logp_on_p", logp_on_p), _as_1d("logq_on_p", logq_on_p)
    logp_on_q, logq_on_q = _as_1d("logp_on_q", logp_on_q), _as_1d("logq_on_q", logq_on_q)
    v_p = logp_on_p - log_mixture(logp_on_p, logq_on_p)
    v_q = logq_on_q - log_mixture(logp_on_q, logq_on_q)
    parts = [
        (v_p, lengths_p, prompt_ids_p, 0.5, "p-samples"),
        (v_q, lengths_q, prompt_ids_q, 0.5, "q-samples"),
    ]
    return _combine(parts, np.concatenate([v_p, v_q]))


def rao_blackwell_js(
    token_kl_pm, mask_p, prompt_ids_p, token_kl_qm, mask_q, prompt_ids_q
) -> Estimate:
    """JS(p, q) from token KLs to the sequence mixture (`mixture_token_kl`).

    token_kl_pm [N, L]: KL(p(.|y<t) || m(.|y<t)) along p-samples; token_kl_qm [M, L]: the
    same for q along q-samples; masks and prompt ids of each set.
    """
    v_p, len_p = _token_sums("token_kl_pm", token_kl_pm, mask_p)
    v_q, len_q = _token_sums("token_kl_qm", token_kl_qm, mask_q)
    parts = [
        (v_p, len_p, prompt_ids_p, 0.5, "p-samples"),
        (v_q, len_q, prompt_ids_q, 0.5, "q-samples"),
    ]
    return _combine(parts, np.concatenate([v_p, v_q]))

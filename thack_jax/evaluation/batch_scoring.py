"""One batch of evaluation prompts scored for both references, in one jitted function.

`score_fn(configs, num_samples, mesh)` is what `Evaluator` calls per batch: each model's
encoder runs once, the student decodes (teacher forcing) its own, the oracle's and the
teacher's responses, and each reference its own and the student's (7 decoder passes, 3
encoder passes). Each scored sample set comes back as the arrays of a `Side`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from thack_jax import models
from thack_jax.decoding import scoring
from thack_jax.evaluation import divergences
from thack_jax.parallel import partitioning

REFERENCES = {"golden": "oracle", "proxy": "teacher"}  # metric prefix -> reference role


class Side(NamedTuple):
    """Host arrays of one sample set scored by two models a (the sampler) and b.

    a_tok, b_tok [N, L]: log-probs of the sampled tokens (0 at pads); kl [N, L]: token
    KL(a || b); mix [N, L]: token KL(a || m) of the sequence mixture; mask [N, L].
    """

    a_tok: np.ndarray
    b_tok: np.ndarray
    kl: np.ndarray
    mix: np.ndarray
    mask: np.ndarray


def _encode(config, params, inputs, num_samples):
    """inputs [B, Lx] -> encoded [B*n, Lx, D]: once per prompt, repeated for its n samples."""
    return jnp.repeat(models.encode(config, params, inputs), num_samples, axis=0)


def _decode_logprobs(config, params, encoded, inputs, targets):
    """Teacher-forced full log-probs [B*n, L, V] of targets [B*n, L] from encoded prompts."""
    logits = models.decode_logits(config, params, encoded, inputs, targets)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _side(la, lb, targets, mask):
    """Arrays of a Side (without the mask) from full log-probs of a and b [B*n, L, V]."""
    a_tok = jnp.where(mask, scoring.gather_logprobs(la, targets), 0.0)
    b_tok = jnp.where(mask, scoring.gather_logprobs(lb, targets), 0.0)
    kl = jnp.where(mask, divergences.token_kl(la, lb), 0.0)
    mix = divergences.mixture_token_kl(la, lb, a_tok, b_tok, mask)
    return a_tok, b_tok, kl, mix


def _score_batch(params, inputs, samples, *, configs, num_samples):
    """Scores one batch of prompts [B, Lx] for both references.

    params, configs: {'student' | 'oracle' | 'teacher': ...}; samples: the same keys ->
    (tokens [B*n, L], mask [B*n, L]). Each encoder runs once, the student decodes its own
    responses once for both references. Returns {role: (ref-samples side, student-samples
    side)} for role in oracle, teacher, each side the 4 arrays of `_side`.
    """
    rep = jnp.repeat(inputs, num_samples, axis=0)
    encoded = {role: _encode(configs[role], params[role], inputs, num_samples) for role in params}

    def logprobs(role, targets):
        return _decode_logprobs(configs[role], params[role], encoded[role], rep, targets)

    y_q, m_q = samples["student"]
    q_on_q = logprobs("student", y_q)
    out = {}
    for role in REFERENCES.values():
        y_p, m_p = samples[role]
        p_side = _side(logprobs(role, y_p), logprobs("student", y_p), y_p, m_p)
        q_side = _side(q_on_q, logprobs(role, y_q), y_q, m_q)
        out[role] = (p_side, q_side)
    return out


@functools.lru_cache(maxsize=16)
def score_fn(configs: tuple, num_samples: int, mesh):
    """The jitted `_score_batch`; with a mesh it runs under the mesh's axis rules and returns
    replicated arrays (read back on every process)."""
    fn = functools.partial(_score_batch, configs=dict(configs), num_samples=num_samples)
    out_sharding = None if mesh is None else partitioning.replicated(mesh)
    return partitioning.jit(fn, mesh, out_shardings=out_sharding)

"""One batch of evaluation prompts scored for both references, in one jitted function.

`score_fn(configs, num_samples, mesh)` is what `Evaluator` calls per batch: each model's
encoder runs once, the student decodes (teacher forcing) its own, the oracle's and the
teacher's responses, and each reference its own and the student's (7 decoder passes, 3
encoder passes). Each scored sample set comes back as the arrays of a `Side`. Without an
oracle (field mode: `configs` has no 'oracle') nothing of it runs (4 decoder passes, 2
encoder passes). Given reference responses (one per prompt), the student also decodes them,
from its encoder output of the same batch (one more decoder pass on B rows).

What no checkpoint changes is computed once (`fixed_fn`, a `Fixed` per batch and reference
model): the reference's encoder output of the prompts and, within the evaluator's memory
budget, its full log-probs of its own samples. With both given, a checkpoint costs 5
decoder passes and 1 encoder pass (3 and 1 in field mode); the results are the same arrays
(tested bitwise), since the same functions run on the same inputs.

`reference_fn(config, mesh)` is the same teacher-forced pass for one model alone (the
reference models' levels on the reference responses, computed once per evaluator).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

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


def _reference_logprobs(config, params, encoded, inputs, references):
    """Log-probs [B, Ly_ref] of the reference responses (tokens, mask) [B, Ly_ref] x2 from
    encoded prompts [B, Lx, D] (0 outside the positional mask)."""
    tokens, mask = references
    full = _decode_logprobs(config, params, encoded, inputs, tokens)
    return jnp.where(mask, scoring.gather_logprobs(full, tokens), 0.0)


class Fixed(NamedTuple):
    """What scoring one batch needs of a reference model that no checkpoint changes.

    encoded: its encoder output of the batch's prompts [B, Lx, D] (decoder-only: the
    prefill pytree); own: its full log-probs of its own samples [B*n, L, V] float32, or
    None (not cached: recomputed at every checkpoint). Arrays stay on the device(s)."""

    encoded: Any
    own: jax.Array | None


def _fixed(params, inputs, tokens, *, config, num_samples, own: bool) -> Fixed:
    encoded = models.encode(config, params, inputs)
    if not own:
        return Fixed(encoded, None)
    rep = jnp.repeat(inputs, num_samples, axis=0)
    repeated = jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=0), encoded)
    return Fixed(encoded, _decode_logprobs(config, params, repeated, rep, tokens))


@functools.lru_cache(maxsize=16)
def fixed_fn(config, num_samples: int, mesh, own: bool):
    """Jitted (params, inputs [B, Lx], own sample tokens [B*n, L]) -> `Fixed` of one
    reference model (`own` False: its encoder output only). Outputs keep the shardings
    the model's logical constraints give them (rows along `batch`), not replicated."""
    fn = functools.partial(_fixed, config=config, num_samples=num_samples, own=own)
    return partitioning.jit(fn, mesh)


def fixed_bytes(config, num_rows: int, length: int) -> int:
    """Bytes of one batch's cached own log-probs: num_rows x length x V float32."""
    return num_rows * length * config.vocab_size * 4


def _score_batch(params, inputs, samples, references, fixed=None, *, configs, num_samples):
    """Scores one batch of prompts [B, Lx] for the reference models present.

    params, configs: {'student' | 'oracle' | 'teacher': ...} (no 'oracle' in field mode);
    samples: the same keys -> (tokens [B*n, L], mask [B*n, L]); references: None or
    (tokens, mask) [B, Ly_ref] x2, one reference response per prompt; fixed: None, or
    {reference role: `Fixed`} of this batch. Each encoder runs once (or comes from
    `fixed`), the student decodes its own responses once for every reference model.
    Returns ({role: (ref-samples side, student-samples side)} for the reference models
    present, each side the 4 arrays of `_side`; the student's log-probs of the references
    [B, Ly_ref] or None).
    """
    fixed = fixed or {}
    rep = jnp.repeat(inputs, num_samples, axis=0)
    # Each encoder once per prompt, repeated for its n samples.
    once = {
        role: fixed[role].encoded
        if role in fixed
        else models.encode(configs[role], params[role], inputs)
        for role in params
    }
    # A tree map: the decoder-only family's encoding is a prefill pytree (batch-major).
    encoded = {
        role: jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=0), tree)
        for role, tree in once.items()
    }

    def logprobs(role, targets):
        return _decode_logprobs(configs[role], params[role], encoded[role], rep, targets)

    y_q, m_q = samples["student"]
    q_on_q = logprobs("student", y_q)
    out = {}
    for role in REFERENCES.values():
        if role not in params:
            continue
        y_p, m_p = samples[role]
        own = fixed[role].own if role in fixed else None
        own = logprobs(role, y_p) if own is None else own
        p_side = _side(own, logprobs("student", y_p), y_p, m_p)
        q_side = _side(q_on_q, logprobs(role, y_q), y_q, m_q)
        out[role] = (p_side, q_side)
    ref_lp = None
    if references is not None:
        student = configs["student"], params["student"]
        ref_lp = _reference_logprobs(*student, once["student"], inputs, references)
    return out, ref_lp


@functools.lru_cache(maxsize=16)
def score_fn(configs: tuple, num_samples: int, mesh):
    """The jitted `_score_batch`; with a mesh it runs under the mesh's axis rules and returns
    replicated arrays (read back on every process)."""
    fn = functools.partial(_score_batch, configs=dict(configs), num_samples=num_samples)
    out_sharding = None if mesh is None else partitioning.replicated(mesh)
    return partitioning.jit(fn, mesh, out_shardings=out_sharding)


def _reference_batch(params, inputs, references, *, config):
    return _reference_logprobs(
        config, params, models.encode(config, params, inputs), inputs, references
    )


@functools.lru_cache(maxsize=16)
def reference_fn(config, mesh):
    """Jitted (params, inputs [B, Lx], (tokens, mask) [B, Ly_ref] x2) -> the model's
    log-probs of the reference tokens [B, Ly_ref] (0 outside the mask), replicated."""
    fn = functools.partial(_reference_batch, config=config)
    out_sharding = None if mesh is None else partitioning.replicated(mesh)
    return partitioning.jit(fn, mesh, out_shardings=out_sharding)

"""Scoring API: log-probabilities of given responses under a T5 model.

Used by the trainer (teacher targets), the sampler's tests and the evaluator.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from thack_jax import models
from thack_jax.models.config import T5Config


class Scores(NamedTuple):
    """token_logprobs [B, Ly] (0 at pads); full_logprobs [B, Ly, V]; mask [B, Ly] bool."""

    token_logprobs: jax.Array
    full_logprobs: jax.Array
    mask: jax.Array


def response_mask(targets: jax.Array, pad_id: int = 0) -> jax.Array:
    """targets [B, Ly] -> bool mask of scored positions (tokens and EOS, not pads)."""
    return targets != pad_id


def gather_logprobs(full_logprobs: jax.Array, targets: jax.Array) -> jax.Array:
    """full_logprobs [B, Ly, V], targets [B, Ly] -> log-prob of each target token [B, Ly]."""
    return jnp.take_along_axis(full_logprobs, targets[..., None], axis=-1)[..., 0]


def score(
    config: T5Config,
    params: dict,
    inputs: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
) -> Scores:
    """Log-probs of `targets` [B, Ly] given `inputs` [B, Lx] (teacher forcing).

    `temperature` divides the logits before the softmax (1.0 = the model itself).
    """
    logits = models.logits(config, params, inputs, targets)
    full = jax.nn.log_softmax(logits / temperature, axis=-1)
    mask = response_mask(targets, config.pad_id)
    token = jnp.where(mask, gather_logprobs(full, targets), 0.0)
    return Scores(token, full, mask)

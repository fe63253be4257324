"""Pure functions over decoder-only (Llama / Qwen2) parameters, with the signatures of
`thack_jax.models.api` (the T5 family), so the sampler, scoring, train step and evaluator
can call either family through one dispatch.

Conventions (docs/architecture.md): prompts `inputs` [B, Lx] and responses `targets`
[B, Ly] int32, padded with 0. A row's prompt is its non-pad tokens (left or right padded
gives the same result), response token s sits at position len_prompt + s, and
logits[:, s] predicts targets[:, s] (logits[:, 0] comes from the prompt's last token).
Prompt tokens are never scored. "Encoded" here is a prefill pytree (the prompt's per-layer
K/V, its mask, lengths and last-token logits), which callers only pass back to
`decode_logits` / `init_cache`.

Everything is traceable; callers decide what to `jax.jit` (the config is hashable and is
meant to be a static argument).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from thack_jax.models.decoder_config import DecoderConfig
from thack_jax.models.decoder_network import DecoderLM


@functools.lru_cache(maxsize=64)
def module(config: DecoderConfig) -> DecoderLM:
    return DecoderLM(config)


def boxed_init(config: DecoderConfig, rng: jax.Array):
    """The boxed (logically partitioned) parameters; `api.param_shapes` / `param_axes` trace
    it (once per config) for both families."""
    inputs, targets = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)
    return module(config).init(rng, inputs, targets)["params"]


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: DecoderConfig, rng: jax.Array) -> dict:
    """Random parameters (normal(init_std) kernels and embedding, unit norm scales, zero
    biases, as HF's Llama init), a plain nested dict. Jitted: op-by-op init is slow."""
    return nn.unbox(boxed_init(config, rng))


def logits(config: DecoderConfig, params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Teacher-forced logits: inputs [B, Lx], targets [B, Ly] -> [B, Ly, V] float32."""
    return module(config).apply({"params": params}, inputs, targets)


def encode(config: DecoderConfig, params: dict, inputs: jax.Array) -> dict:
    """inputs [B, Lx] -> prefill dict: "k"/"v" per-layer tuples of [B, K, Lx, Dh]
    (heads-first), "mask" [B, Lx] bool, "lengths" [B] int32, "last_logits" [B, V] f32."""
    return module(config).apply({"params": params}, inputs, method=DecoderLM.encode)


def decode_logits(
    config: DecoderConfig, params: dict, encoded: dict, inputs: jax.Array, targets: jax.Array
) -> jax.Array:
    """`logits` reusing the prefill `encoded` of `inputs` [B, Lx] (whose mask the prefill
    holds): targets [B, Ly] -> [B, Ly, V] float32. For scoring several response sets of one
    prompt batch."""
    del inputs  # The prefill holds the prompt mask and lengths.
    return module(config).apply({"params": params}, encoded, targets, method=DecoderLM.decode)


def init_cache(
    config: DecoderConfig, params: dict, encoded: dict, inputs: jax.Array, max_decode_len: int
) -> dict:
    """Decoding cache for prompts `inputs` [B, Lx] from their prefill: "k"/"v" per-layer
    buffers [B, K, Lx + max_decode_len, Dh] holding the prompt's K/V, "mask" (valid keys),
    "prompt_mask", "lengths", "last_logits". Every leaf has the batch as dim 0 (the sampler
    repeats rows)."""
    del inputs
    return module(config).apply(
        {"params": params}, encoded, max_decode_len, method=DecoderLM.init_cache
    )


def decode_step(
    config: DecoderConfig, params: dict, cache: dict, token: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict]:
    """T5's contract: step 0 (token 0, ignored) returns the prefill's last-token logits,
    which predict targets[:, 0]; step s >= 1 feeds token = targets[:, s-1] and returns
    (logits [B, V] float32 predicting targets[:, s], cache). `step` may be traced."""
    step = jnp.asarray(step, jnp.int32)

    def first(cache, token):
        return cache["last_logits"], cache

    def later(cache, token):
        return module(config).apply({"params": params}, cache, token, step, method=DecoderLM.step)

    return jax.lax.cond(step == 0, first, later, cache, token)

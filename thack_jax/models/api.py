"""Pure functions over a model's parameters: init, encode, teacher-forced logits, cached
decoding: the one seam between the model families and everything that runs them (the
sampler, scoring, the train step, the evaluator, the regimes).

The config's type selects the family: a `T5Config` runs the T5 encoder-decoder below; a
`DecoderConfig` runs the decoder-only family (`decoder_api`, Llama / Qwen2), whose
"encoded" prompt is a prefill pytree and whose `decode_step` keeps T5's contract (step 0
gives the logits of the first response token). Both families take prompts [B, Lx] and
responses [B, Ly] padded with 0 and return logits [B, Ly, V] float32.

Everything here is traceable; callers decide what to `jax.jit` (the config is hashable and
is meant to be a static argument).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from thack_jax.models import decoder_api
from thack_jax.models.config import T5Config
from thack_jax.models.decoder_config import DecoderConfig
from thack_jax.models.network import T5

ModelConfig = T5Config | DecoderConfig


@functools.lru_cache(maxsize=64)
def module(config: T5Config) -> T5:
    return T5(config)


def _dummy_inputs():
    return jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)


def _boxed_init(config: T5Config, rng: jax.Array):
    return module(config).init(rng, *_dummy_inputs())["params"]


def is_decoder_only(config: ModelConfig) -> bool:
    return isinstance(config, DecoderConfig)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters (T5 / Mesh-TF init scales; decoder-only: HF's),
    a plain nested dict. Jitted: op-by-op initialisation is slow (seconds even for `tiny`).
    """
    if is_decoder_only(config):
        return decoder_api.init_params(config, rng)
    return _init_t5(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_t5(config: T5Config, rng: jax.Array) -> dict:
    return nn.unbox(_boxed_init(config, rng))


def param_axes(config: ModelConfig) -> dict:
    """The parameter tree with each leaf replaced by its tuple of logical axis names."""
    return jax.tree.map(
        lambda p: tuple(p.names),
        _abstract_boxed(config),
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


def param_shapes(config: ModelConfig) -> dict:
    """The parameter tree of `jax.ShapeDtypeStruct`s; nothing is allocated."""
    return nn.unbox(_abstract_boxed(config))


@functools.lru_cache(maxsize=64)
def _abstract_boxed(config: ModelConfig):
    """The boxed (logically partitioned) parameter tree of shapes, traced once per config.

    A trace of the init took ~0.5 s for each of the tiny default's models on the 2-core box,
    and one online run (its checks, shardings and checkpoint loads) asked for it 24 times.
    Never handed out as is (callers get new trees from tree maps), so none can change it."""
    init = decoder_api.boxed_init if is_decoder_only(config) else _boxed_init
    return jax.eval_shape(functools.partial(init, config), jax.random.key(0))


def count_params(config: ModelConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(config))))


def shift_right(targets: jax.Array, start_id: int = 0) -> jax.Array:
    """targets [B, Ly] -> decoder inputs [B, Ly]: start token, then targets[:, :-1]."""
    start = jnp.full((targets.shape[0], 1), start_id, targets.dtype)
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


def encode(config: ModelConfig, params: dict, inputs: jax.Array):
    """inputs [B, Lx] int32 -> encoded [B, Lx, D] (activation dtype; decoder-only: the
    prefill pytree, every leaf batch-major)."""
    if is_decoder_only(config):
        return decoder_api.encode(config, params, inputs)
    return module(config).apply({"params": params}, inputs, method=T5.encode)


def logits(config: ModelConfig, params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Teacher-forced logits: inputs [B, Lx], targets [B, Ly] -> [B, Ly, V] float32."""
    if is_decoder_only(config):
        return decoder_api.logits(config, params, inputs, targets)
    return module(config).apply({"params": params}, inputs, shift_right(targets))


def decode_logits(
    config: ModelConfig, params: dict, encoded, inputs: jax.Array, targets: jax.Array
) -> jax.Array:
    """Teacher-forced logits from already encoded prompts: encoded [B, Lx, D], inputs
    [B, Lx] (their padding mask), targets [B, Ly] -> [B, Ly, V]. `logits` without the
    encoder, for callers that decode several response sets of one encoding."""
    if is_decoder_only(config):
        return decoder_api.decode_logits(config, params, encoded, inputs, targets)
    return module(config).apply(
        {"params": params}, encoded, inputs, shift_right(targets), method=T5.decode
    )


def init_cache(
    config: ModelConfig, params: dict, encoded, inputs: jax.Array, max_decode_len: int
) -> dict:
    """Decoding cache for prompts `inputs` [B, Lx]; cross-attention K/V computed here, once
    (decoder-only: the prompt's K/V from the prefill). Every leaf is batch-major."""
    if is_decoder_only(config):
        return decoder_api.init_cache(config, params, encoded, inputs, max_decode_len)
    return module(config).apply(
        {"params": params}, encoded, inputs, max_decode_len, method=T5.init_cache
    )


def decode_step(
    config: ModelConfig, params: dict, cache: dict, token: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict]:
    """Feeds token [B] at decoder position `step` -> (logits [B, V] float32, cache).

    The first call feeds the start token (0) at step 0; its logits predict targets[:, 0].
    """
    if is_decoder_only(config):
        return decoder_api.decode_step(config, params, cache, token, step)
    return module(config).apply(
        {"params": params}, cache, token, jnp.asarray(step, jnp.int32), method=T5.decode_step
    )

"""Pure functions over T5 parameters: init, encode, teacher-forced logits, cached decoding.

Everything here is traceable; callers decide what to `jax.jit` (the config is hashable and
is meant to be a static argument).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from thack_jax.models.config import T5Config
from thack_jax.models.network import T5


@functools.lru_cache(maxsize=64)
def module(config: T5Config) -> T5:
    return T5(config)


def _dummy_inputs():
    return jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)


def _boxed_init(config: T5Config, rng: jax.Array):
    return module(config).init(rng, *_dummy_inputs())["params"]


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: T5Config, rng: jax.Array) -> dict:
    """Randomly initialised parameters (T5 / Mesh-TF init scales), a plain nested dict.

    Jitted: op-by-op initialisation is slow (seconds even for `tiny`).
    """
    return nn.unbox(_boxed_init(config, rng))


def param_axes(config: T5Config) -> dict:
    """The parameter tree with each leaf replaced by its tuple of logical axis names."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))
    return jax.tree.map(
        lambda p: tuple(p.names),
        boxed,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


def param_shapes(config: T5Config) -> dict:
    """The parameter tree of `jax.ShapeDtypeStruct`s; nothing is allocated."""
    return nn.unbox(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))


def count_params(config: T5Config) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(config))))


def shift_right(targets: jax.Array, start_id: int = 0) -> jax.Array:
    """targets [B, Ly] -> decoder inputs [B, Ly]: start token, then targets[:, :-1]."""
    start = jnp.full((targets.shape[0], 1), start_id, targets.dtype)
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


def encode(config: T5Config, params: dict, inputs: jax.Array) -> jax.Array:
    """inputs [B, Lx] int32 -> encoded [B, Lx, D] (activation dtype)."""
    return module(config).apply({"params": params}, inputs, method=T5.encode)


def logits(config: T5Config, params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Teacher-forced logits: inputs [B, Lx], targets [B, Ly] -> [B, Ly, V] float32."""
    return module(config).apply({"params": params}, inputs, shift_right(targets))


def decode_logits(
    config: T5Config, params: dict, encoded: jax.Array, inputs: jax.Array, targets: jax.Array
) -> jax.Array:
    """Teacher-forced logits from already encoded prompts: encoded [B, Lx, D], inputs
    [B, Lx] (their padding mask), targets [B, Ly] -> [B, Ly, V]. `logits` without the
    encoder, for callers that decode several response sets of one encoding."""
    return module(config).apply(
        {"params": params}, encoded, inputs, shift_right(targets), method=T5.decode
    )


def init_cache(
    config: T5Config, params: dict, encoded: jax.Array, inputs: jax.Array, max_decode_len: int
) -> dict:
    """Decoding cache for prompts `inputs` [B, Lx]; cross-attention K/V computed here, once."""
    return module(config).apply(
        {"params": params}, encoded, inputs, max_decode_len, method=T5.init_cache
    )


def decode_step(
    config: T5Config, params: dict, cache: dict, token: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict]:
    """Feeds token [B] at decoder position `step` -> (logits [B, V] float32, cache).

    The first call feeds the start token (0) at step 0; its logits predict targets[:, 0].
    """
    return module(config).apply(
        {"params": params}, cache, token, jnp.asarray(step, jnp.int32), method=T5.decode_step
    )

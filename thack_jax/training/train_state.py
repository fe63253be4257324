"""The training state (a pytree) and its shardings.

The state holds everything a bitwise-exact resume needs besides the data position (which
the batch source keeps): the update count, the student parameters, the optimizer state and
an RNG key. The key is stored as raw uint32 key data (not a typed key array) so that orbax
can save it like any other array.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from thack_jax import models
from thack_jax.models.config import T5Config
from thack_jax.parallel import partitioning


@flax.struct.dataclass
class TrainState:
    """step: int32 [] (updates done); params: the student's tree; opt_state: optax state;
    rng: uint32 key data (e.g. [2] for threefry), for stochastic parts of future steps."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def rng_key(self) -> jax.Array:
        """The RNG as a typed key (`jax.random.wrap_key_data`)."""
        return jax.random.wrap_key_data(self.rng)


def _key_data(rng) -> jax.Array:
    """Raw uint32 key data from a typed key, a legacy uint32 key or an int seed."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32:
        raise ValueError(f"rng must be a typed key, uint32 key data or an int, got {rng.dtype}")
    return rng


def create_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    """A fresh state at step 0: `optimizer.init(params)` and the key data of `rng`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=_key_data(rng),
    )


@functools.lru_cache(maxsize=32)
def abstract_state(config: T5Config, optimizer: optax.GradientTransformation) -> TrainState:
    """The state's tree of `jax.ShapeDtypeStruct` (no sharding); nothing is allocated.

    Cached per (config, optimizer object): tracing the model's init is not free.
    """

    def make():
        params = models.init_params(config, jax.random.key(0))
        return create_train_state(params, optimizer, jax.random.key(0))

    return jax.eval_shape(make)


@functools.lru_cache(maxsize=32)
def state_shardings(mesh, config: T5Config, optimizer: optax.GradientTransformation) -> TrainState:
    """A TrainState whose leaves are the `NamedSharding`s of the state on `mesh`.

    Params follow `models.param_axes(config)` through the partitioning rules; the optimizer
    state mirrors the params where its leaves have the params' shapes (Adam moments,
    unfactored Adafactor moments) and is replicated elsewhere (factored row/column
    statistics, counts); step and rng are replicated. `mesh=None`: everything on the
    first device.
    """
    shapes = abstract_state(config, optimizer)
    if mesh is None:
        return single_device_shardings(shapes)
    params_sh = partitioning.param_shardings(mesh, models.param_axes(config), shapes.params)
    opt_sh = partitioning.opt_state_shardings(
        mesh, shapes.opt_state, params_sh, params_shapes=shapes.params
    )
    rep = partitioning.replicated(mesh)
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh, rng=rep)


def single_device_shardings(tree, device=None):
    """The same tree with every leaf mapped to one device's sharding (the no-mesh case)."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    return jax.tree.map(lambda _: sharding, tree)

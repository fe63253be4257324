"""Tests of thack_jax.training.train_state: the state pytree and its shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_worker import fast_init_params
from jax.sharding import PartitionSpec as P

from thack_jax import models
from thack_jax.parallel import partitioning
from thack_jax.training import optim, train_state

CFG = models.get_config("tiny")


@pytest.fixture(scope="module")
def params():
    return fast_init_params(CFG, 0)


def test_create_train_state(params):
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", 1e-3))
    state = train_state.create_train_state(params, opt, jax.random.key(7))
    assert state.step.dtype == jnp.int32 and state.step.shape == () and int(state.step) == 0
    assert state.rng.dtype == jnp.uint32  # raw key data: orbax can save it
    np.testing.assert_array_equal(
        jax.random.key_data(state.rng_key()), jax.random.key_data(jax.random.key(7))
    )
    assert jax.tree.structure(state.params) == jax.tree.structure(params)
    # Legacy uint32 keys and int seeds are accepted too.
    assert train_state.create_train_state(params, opt, 7).rng.dtype == jnp.uint32
    with pytest.raises(ValueError, match="rng must be"):
        train_state.create_train_state(params, opt, jnp.zeros(2, jnp.float32))


def test_state_is_a_pytree_through_jit(params):
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", 1e-3))
    state = train_state.create_train_state(params, opt, jax.random.key(0))
    bumped = jax.jit(lambda s: s.replace(step=s.step + 1))(state)
    assert int(bumped.step) == 1
    assert isinstance(bumped, train_state.TrainState)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_abstract_state_matches_real_state(params, name):
    opt = optim.make_optimizer(optim.OptimizerConfig(name, 1e-3))
    real = train_state.create_train_state(params, opt, jax.random.key(0))
    abstract = train_state.abstract_state(CFG, opt)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract), strict=True):
        assert (r.shape, r.dtype) == (a.shape, a.dtype)
        assert isinstance(a, jax.ShapeDtypeStruct)


def test_state_shardings_follow_the_rules():
    mesh = partitioning.make_mesh({"data": 4, "model": 2})
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", 1e-3))
    sh = train_state.state_shardings(mesh, CFG, opt)
    assert sh.step.spec == P() and sh.rng.spec == P()
    q = sh.params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert q.spec == P(None, "model")  # [embed, joined_kv]: joined_kv over model
    emb = sh.params["token_embedder"]["embedding"]
    assert emb.spec == P("model", None)  # [vocab, embed]
    adam = sh.opt_state[0]
    assert adam.mu["encoder"]["layers_0"]["attention"]["query"]["kernel"].spec == q.spec
    assert adam.count.spec == P()


def test_state_shardings_adafactor_factored_stats_replicated():
    mesh = partitioning.make_mesh({"data": 2, "model": 4})
    opt = optim.make_optimizer(optim.OptimizerConfig("adafactor", 1e-3, min_dim_size_to_factor=16))
    sh = train_state.state_shardings(mesh, CFG, opt)
    factored = sh.opt_state[0]
    # [embed=32, mlp=64] is factored: its row/column statistics are vectors, replicated.
    wi = factored.v_row["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert wi.spec == P()
    # The [heads, buckets] table (4 x 8) is not factored: v mirrors the param.
    rel = factored.v["encoder"]["relpos_bias"]["rel_embedding"]
    assert rel.spec == sh.params["encoder"]["relpos_bias"]["rel_embedding"].spec


def test_device_put_with_state_shardings(params):
    mesh = partitioning.make_mesh({"data": 2, "model": 4})
    opt = optim.make_optimizer(optim.OptimizerConfig("adafactor", 1e-3))
    sh = train_state.state_shardings(mesh, CFG, opt)
    state = jax.device_put(train_state.create_train_state(params, opt, 0), sh)
    kernel = state.params["decoder"]["logits_dense"]["kernel"]  # [embed=32, vocab=128]
    assert kernel.sharding.spec == P(None, "model")
    assert kernel.addressable_shards[0].data.shape == (32, 32)


def test_no_mesh_is_single_device():
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", 1e-3))
    sh = train_state.state_shardings(None, CFG, opt)
    assert all(isinstance(s, jax.sharding.SingleDeviceSharding) for s in jax.tree.leaves(sh))

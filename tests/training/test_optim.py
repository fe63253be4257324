"""Tests of training.optim: schedules, optimizer choice, clipping, Adafactor's factoring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from thack_jax.training import optim


def _values(fn, steps):
    return np.array([float(fn(s)) for s in steps])


def test_constant_with_linear_warmup():
    lr = optim.make_schedule(1e-3, warmup_steps=4)
    np.testing.assert_allclose(
        _values(lr, range(7)), [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6
    )


def test_no_warmup_is_constant():
    np.testing.assert_allclose(_values(optim.make_schedule(0.1), [0, 1, 100]), 0.1, rtol=1e-6)


def test_cosine_decays_to_end_value():
    lr = optim.make_schedule(1.0, warmup_steps=2, schedule="cosine", total_steps=12)
    v = _values(lr, range(14))
    assert v[1] == pytest.approx(1.0)
    np.testing.assert_allclose(v[2], 1.0, rtol=1e-6)  # decay starts at the peak
    assert np.all(np.diff(v[2:13]) < 0)
    np.testing.assert_allclose(v[7], 0.5, atol=1e-6)  # half way
    np.testing.assert_allclose(v[12:], 0.0, atol=5e-7)  # 4 float32 ulps of the peak (1.0)


def test_rsqrt_is_continuous_after_warmup():
    lr = optim.make_schedule(1e-2, warmup_steps=100, schedule="rsqrt")
    np.testing.assert_allclose(float(lr(99)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(lr(399)), 1e-2 * 0.5, rtol=1e-6)  # sqrt(100 / 400)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="linear"), "valid schedules: \\['constant', 'cosine', 'rsqrt'\\]"),
        (dict(schedule="cosine"), "total_steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(warmup_steps=-1), "warmup_steps"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.make_schedule(**{"learning_rate": 1e-3, **kwargs})


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match="name='sgd' must be one of adafactor, adamw"):
        optim.make_optimizer(optim.OptimizerConfig("sgd", 1e-3))


def test_schedule_callable_and_schedule_args_conflict():
    with pytest.raises(ValueError, match="schedule callable"):
        optim.make_optimizer(
            optim.OptimizerConfig("adamw", optim.make_schedule(1e-3), warmup_steps=10)
        )


def _quadratic_steps(tx, steps=50):
    params = {"w": jnp.full((4, 3), 2.0), "b": jnp.ones((3,))}
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return float(loss(params))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizers_minimise_a_quadratic(name):
    tx = optim.make_optimizer(optim.OptimizerConfig(name, 0.1, warmup_steps=5, clip_norm=1.0))
    start = 4 * 3 * 4.0 + 3.0
    assert _quadratic_steps(tx) < 0.1 * start


def test_adamw_first_step_size_is_the_learning_rate():
    tx = optim.make_optimizer(optim.OptimizerConfig("adamw", 0.01))
    params = {"w": jnp.array([1.0, -2.0])}
    updates, _ = tx.update({"w": jnp.array([3.0, -0.5])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.01, 0.01], rtol=1e-5)


def test_clip_norm_bounds_the_gradient():
    tx = optim.make_optimizer(optim.OptimizerConfig("adamw", 1.0, clip_norm=1.0))
    state = tx.init({"w": jnp.zeros(3)})
    clip_state = state[0]
    clipped, _ = optax.clip_by_global_norm(1.0).update(
        {"w": jnp.array([30.0, 40.0, 0.0])}, clip_state
    )
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8, 0.0], rtol=1e-6)
    assert len(state) == 2  # clipping then AdamW


def test_adamw_weight_decay_shrinks_params_without_gradient():
    tx = optim.make_optimizer(optim.OptimizerConfig("adamw", 0.1, weight_decay=0.5))
    params = {"w": jnp.array([2.0])}
    updates, _ = tx.update({"w": jnp.array([0.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1 * 0.5 * 2.0], rtol=1e-6)


def test_adafactor_factors_large_matrices_only():
    tx = optim.make_optimizer(optim.OptimizerConfig("adafactor", 1e-3, min_dim_size_to_factor=8))
    params = {"big": jnp.zeros((16, 8)), "small": jnp.zeros((4, 4)), "vec": jnp.zeros((16,))}
    (factored_state, *_rest) = tx.init(params)
    # One statistic per row and one per column (optax's naming of which is which aside).
    row_col = {factored_state.v_row["big"].shape, factored_state.v_col["big"].shape}
    assert row_col == {(16,), (8,)}
    assert factored_state.v["big"].shape == (1,)  # full second moment not kept
    assert factored_state.v["small"].shape == (4, 4)  # too small to factor
    assert factored_state.v["vec"].shape == (16,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_decay=-0.1), "OptimizerConfig.weight_decay=-0.1 must be a number >= 0"),
        (dict(clip_norm=0.0), "OptimizerConfig.clip_norm=0.0 must be a number > 0 or None"),
        (dict(schedule="cosine", total_steps=None), "schedule='cosine' needs total_steps"),
        (dict(min_dim_size_to_factor=0), "min_dim_size_to_factor=0 must be an integer >= 1"),
    ],
)
def test_optimizer_config_names_the_bad_field_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.OptimizerConfig("adamw", 1e-3, **kwargs)


def test_make_optimizer_takes_only_a_config():
    with pytest.raises(TypeError, match="takes an OptimizerConfig"):
        optim.make_optimizer("adamw")
    with pytest.raises(TypeError):
        optim.OptimizerConfig("adamw", 1e-3, 10)  # the schedule arguments are keyword-only

"""Tests of the T5 network: sizes, axes, cached decoding, dtypes, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from thack_jax import models
from thack_jax.parallel import partitioning

PUBLISHED_MILLIONS = {"small": 77.0, "base": 247.6, "large": 783.2, "xl": 2850.0}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_param_counts_match_published(name):
    count = models.count_params(models.get_config(name)) / 1e6
    assert abs(count - PUBLISHED_MILLIONS[name]) / PUBLISHED_MILLIONS[name] < 0.005, count


def test_tied_config_has_no_output_layer():
    shapes = models.param_shapes(models.get_config("t5_1_0_small"))
    assert "logits_dense" not in shapes["decoder"]
    assert "wi" in shapes["encoder"]["layers_0"]["mlp"]


def test_every_param_has_logical_axes():
    config = models.get_config("tiny")
    axes = models.param_axes(config)
    shapes = models.param_shapes(config)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for names, shape in zip(flat_axes, flat_shapes, strict=True):
        assert len(names) == len(shape.shape)
        assert all(isinstance(n, str) for n in names)
    assert axes["decoder"]["logits_dense"]["kernel"] == ("embed", "vocab")
    assert axes["encoder"]["relpos_bias"]["rel_embedding"] == ("heads", "relpos_buckets")


def _batch(config, b=3, lx=7, ly=6, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, config.vocab_size, (b, lx)).astype(np.int32)
    inputs[1, 4:] = 0  # padded prompt
    targets = rng.integers(3, config.vocab_size, (b, ly)).astype(np.int32)
    return jnp.asarray(inputs), jnp.asarray(targets)


def _incremental_logits(config, params, inputs, targets):
    encoded = models.encode(config, params, inputs)
    cache = models.init_cache(config, params, encoded, inputs, targets.shape[1])
    step_fn = jax.jit(lambda c, t, s: models.decode_step(config, params, c, t, s))
    token = jnp.zeros((inputs.shape[0],), jnp.int32)
    out = []
    for t in range(targets.shape[1]):
        logits, cache = step_fn(cache, token, t)
        out.append(logits)
        token = targets[:, t]
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_parameter_shapes_are_traced_once_per_config_and_handed_out_as_new_trees(name):
    config = models.get_config(name, max_target_length=7)  # a config no other test traced
    traced = []
    original = jax.eval_shape
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "eval_shape", lambda *a, **k: traced.append(1) or original(*a, **k))
        first, axes = models.param_shapes(config), models.param_axes(config)
        first["extra"] = None  # a caller's change stays in its own tree
        second = models.param_shapes(config)
    assert len(traced) == 1
    assert "extra" not in second and second.keys() == axes.keys()
    flat = jax.tree.leaves(second)
    assert flat and all(isinstance(x, jax.ShapeDtypeStruct) for x in flat)


@pytest.mark.parametrize("name", ["tiny", "t5_1_0_tiny"])
def test_incremental_decoding_matches_teacher_forcing(name):
    if name == "t5_1_0_tiny":
        config = models.get_config("tiny", feed_forward="relu", tie_word_embeddings=True)
    else:
        config = models.get_config(name)
    params = models.init_params(config, jax.random.key(0))
    inputs, targets = _batch(config)
    full = models.logits(config, params, inputs, targets)
    incremental = _incremental_logits(config, params, inputs, targets)
    assert full.shape == (3, 6, config.vocab_size)
    np.testing.assert_allclose(incremental, full, atol=1e-5, rtol=0)


def test_cross_attention_kv_computed_once():
    """The per-step function must not contain the cross-attention key/value projections."""
    config = models.get_config("tiny")
    params = models.init_params(config, jax.random.key(0))
    inputs, _ = _batch(config)
    encoded = models.encode(config, params, inputs)
    cache = models.init_cache(config, params, encoded, inputs, 4)
    token = jnp.zeros((3,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda c: models.decode_step(config, params, c, token, 0))(cache)
    # Matmuls with the encoder length (7) as a dimension would mean K/V recomputation.
    contracted_over_encoder = [
        eqn
        for eqn in jaxpr.jaxpr.eqns
        if eqn.primitive.name == "dot_general"
        and any(v.aval.shape[:2] == (3, 7) and len(v.aval.shape) == 3 for v in eqn.invars)
    ]
    assert not contracted_over_encoder


def test_decoding_cache_is_heads_first_and_sharded_by_heads():
    """K/V buffers are [B, H, L, Dk] (the layout decode attention contracts without a
    transpose), with logical axes (batch, heads, length, kv) under a data x model mesh."""
    config = models.get_config("tiny")
    params = models.init_params(config, jax.random.key(0))
    inputs = jnp.ones((8, 7), jnp.int32)
    h, dk, n = config.num_heads, config.d_kv, config.num_decoder_layers

    def init(p, x):
        return models.init_cache(config, p, models.encode(config, p, x), x, 5)

    cache = init(params, inputs)
    for name, length in (("self_k", 5), ("self_v", 5), ("cross_k", 7), ("cross_v", 7)):
        assert [a.shape for a in cache[name]] == [(8, h, length, dk)] * n, name
    assert cache["cross_bias"].shape == (8, 1, 1, 7)
    # The cross K/V are the projections of the encoder output, transposed once.
    layer = params["decoder"]["layers_0"]["encoder_decoder_attention"]["key"]["kernel"]
    encoded = models.encode(config, params, inputs)
    want = (encoded @ layer).reshape(8, 7, h, dk).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(cache["cross_k"][0], want, atol=1e-5)

    mesh = partitioning.make_mesh({"data": 4, "model": 2})
    with nn.logical_axis_rules(partitioning.flax_axis_rules(mesh)), jax.set_mesh(mesh):
        sharded = jax.jit(init)(params, inputs)
        logits, stepped = jax.jit(
            lambda c: models.decode_step(config, params, c, jnp.zeros((8,), jnp.int32), 0)
        )(sharded)
    for tree in (sharded, stepped):
        for name in ("self_k", "self_v", "cross_k", "cross_v"):
            spec = tuple(tree[name][0].sharding.spec) + (None,) * 4
            assert spec[:4] == ("data", "model", None, None), (name, spec)
    want, _ = models.decode_step(config, params, cache, jnp.zeros((8,), jnp.int32), 0)
    np.testing.assert_allclose(logits, want, atol=1e-5)


def test_padding_in_prompt_does_not_change_logits():
    config = models.get_config("tiny")
    params = models.init_params(config, jax.random.key(1))
    inputs, targets = _batch(config)
    longer = jnp.concatenate([inputs, jnp.zeros((3, 5), jnp.int32)], axis=1)
    np.testing.assert_allclose(
        models.logits(config, params, inputs, targets),
        models.logits(config, params, longer, targets),
        atol=1e-5,
    )


def test_bfloat16_activations_and_params():
    config = models.get_config("tiny", dtype="bfloat16", param_dtype="bfloat16")
    params = models.init_params(config, jax.random.key(0))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    inputs, targets = _batch(config)
    logits = models.logits(config, params, inputs, targets)
    assert logits.dtype == jnp.float32
    f32 = models.get_config("tiny")
    ref = models.logits(f32, jax.tree.map(lambda p: p.astype(jnp.float32), params), inputs, targets)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1
    assert models.encode(config, params, inputs).dtype == jnp.bfloat16


def test_shift_right():
    targets = jnp.array([[5, 6, 1, 0]])
    np.testing.assert_array_equal(models.shift_right(targets), [[0, 5, 6, 1]])


def test_relative_position_buckets_match_reference():
    from thack_jax.models.network import relative_position_bucket

    rel = jnp.arange(-200, 201)
    got = np.asarray(relative_position_bucket(rel, True, 32, 128))
    # Reference values from T5's definition (bidirectional, 32 buckets, max distance 128).
    ref = []
    for r in range(-200, 201):
        n = 16
        bucket = n if r > 0 else 0
        d = abs(r)
        if d < 8:
            bucket += d
        else:
            bucket += min(n - 1, 8 + int(np.log(d / 8) / np.log(128 / 8) * 8))
        ref.append(bucket)
    np.testing.assert_array_equal(got, ref)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        models.get_config("huge")
    with pytest.raises(ValueError, match="d_modle"):
        models.get_config("tiny", d_modle=3)
    with pytest.raises(ValueError, match="feed_forward='swish'"):
        models.get_config("tiny", feed_forward="swish")
    with pytest.raises(ValueError, match="dtype='float8'"):
        models.get_config("tiny", dtype="float8")

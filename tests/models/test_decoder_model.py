"""Tests of the decoder-only network (models/decoder_*.py): sizes, parameter tree and axes,
cached decoding = teacher forcing, padding invariance, GQA / MQA, dtypes, sharding, config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from thack_jax import models
from thack_jax.models import decoder_api as api
from thack_jax.models.decoder_config import DecoderConfig, get_decoder_config
from thack_jax.models.decoder_network import rope_inv_freq
from thack_jax.parallel import partitioning

# Published sizes (model cards). Counts from jax.eval_shape, tied embeddings counted once:
# smollm2-135m 134,515,008; qwen2.5-0.5b 494,032,768; llama-3.2-1b 1,235,814,400.
PUBLISHED = {"smollm2-135m": 134.5e6, "qwen2.5-0.5b": 494e6, "llama-3.2-1b": 1.24e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published_without_allocating(name):
    config = get_decoder_config(name)
    shapes = models.param_shapes(config)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    count = models.count_params(config)
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005, count


def _contract_tree(c: DecoderConfig) -> dict:
    """The parameter tree of the contract (docs/models_decoder.md): name -> (shape, axes)."""
    d, h, k, dh, f, v = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff, c.vocab_size
    tree = {"embed/embedding": ((v, d), ("vocab", "embed")), "final_norm/scale": ((d,), ("embed",))}
    if not c.tie_word_embeddings:
        tree["lm_head/kernel"] = ((d, v), ("embed", "vocab"))
    for i in range(c.num_layers):
        p = f"layers_{i}/"
        tree[p + "attn_norm/scale"] = ((d,), ("embed",))
        tree[p + "mlp_norm/scale"] = ((d,), ("embed",))
        for name, heads in (("query", h), ("key", k), ("value", k)):
            tree[p + f"attention/{name}/kernel"] = ((d, heads, dh), ("embed", "heads", "kv"))
            if c.attention_bias:
                tree[p + f"attention/{name}/bias"] = ((heads, dh), ("heads", "kv"))
        tree[p + "attention/out/kernel"] = ((h, dh, d), ("heads", "kv", "embed"))
        tree[p + "mlp/gate/kernel"] = ((d, f), ("embed", "mlp"))
        tree[p + "mlp/up/kernel"] = ((d, f), ("embed", "mlp"))
        tree[p + "mlp/down/kernel"] = ((f, d), ("mlp", "embed"))
    return tree


def _flat(tree, is_leaf=None) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("llama-tiny", {}),
        ("qwen2-tiny", {}),
        ("llama-tiny", {"attention_bias": True}),  # biases, untied
        ("qwen2-tiny", {"attention_bias": False}),  # tied, no biases
    ],
)
def test_param_tree_shapes_and_logical_axes_match_contract(name, overrides):
    config = get_decoder_config(name, **overrides)
    shapes = _flat(models.param_shapes(config))
    axes = _flat(models.param_axes(config), is_leaf=lambda x: isinstance(x, tuple))
    want = _contract_tree(config)
    assert sorted(shapes) == sorted(want)
    assert sorted(axes) == sorted(want)
    for key, (shape, names) in want.items():
        assert shapes[key].shape == shape, key
        assert axes[key] == names, key
        assert set(names) <= set(partitioning.LOGICAL_AXES), key
    params = api.init_params(config, jax.random.key(0))
    assert {k: v.shape for k, v in _flat(params).items()} == {k: s for k, (s, _) in want.items()}


def _batch(config, seed=0, b=4, lx=7, ly=6):
    """Right-padded prompts of lengths lx, 4, 1, 6 (+ more) and responses with end pads."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, config.vocab_size, (b, lx)).astype(np.int32)
    for row, length in enumerate([lx, 4, 1, 6][:b]):
        inputs[row, length:] = 0
    targets = rng.integers(3, config.vocab_size, (b, ly)).astype(np.int32)
    targets[1, 3:] = 0
    targets[2, 5:] = 0
    return inputs, targets


@functools.partial(jax.jit, static_argnums=0)
def _decoded(config, params, inputs, targets):
    """Cached decoding over targets (step 0 token 0, then targets[:, s-1]) in a lax.scan
    (step traced) -> [B, Ly, V]."""
    encoded = api.encode(config, params, inputs)
    cache = api.init_cache(config, params, encoded, inputs, targets.shape[1])
    fed = jnp.concatenate([jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)

    def body(cache, xs):
        token, step = xs
        logits, cache = api.decode_step(config, params, cache, token, step)
        return cache, logits

    steps = jnp.arange(targets.shape[1], dtype=jnp.int32)
    _, out = jax.lax.scan(body, cache, (fed.T, steps))
    return jnp.swapaxes(out, 0, 1)


def _logits(config, params, inputs, targets):
    return jax.jit(api.logits, static_argnums=0)(config, params, inputs, targets)


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_cached_decoding_and_decode_logits_equal_teacher_forcing(name):
    config = get_decoder_config(name)
    params = api.init_params(config, jax.random.key(1))
    inputs, targets = _batch(config)
    want = _logits(config, params, inputs, targets)
    assert want.shape == (4, 6, config.vocab_size) and want.dtype == jnp.float32
    np.testing.assert_allclose(_decoded(config, params, inputs, targets), want, atol=1e-5)
    encoded = api.encode(config, params, inputs)
    got = api.decode_logits(config, params, encoded, inputs, targets)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # logits[:, 0] is the prefill's: the prompt's last real token predicts targets[:, 0].
    np.testing.assert_allclose(encoded["last_logits"], want[:, 0], atol=1e-5)
    one = api.decode_logits(config, params, encoded, inputs, targets[:, :1])
    np.testing.assert_allclose(one, want[:, :1], atol=1e-5)


def test_cache_layout_is_heads_first_with_prompt_kv():
    config = get_decoder_config("llama-tiny")
    params = api.init_params(config, jax.random.key(0))
    inputs, _ = _batch(config)
    encoded = api.encode(config, params, inputs)
    cache = api.init_cache(config, params, encoded, inputs, 5)
    k, dh = config.num_kv_heads, config.head_dim
    assert [x.shape for x in cache["k"]] == [(4, k, 12, dh)] * config.num_layers
    np.testing.assert_array_equal(cache["k"][0][:, :, :7], encoded["k"][0])
    np.testing.assert_array_equal(cache["mask"][:, :7], inputs != 0)
    assert not cache["mask"][:, 7:].any()
    np.testing.assert_array_equal(encoded["lengths"], [7, 4, 1, 6])
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(cache))  # rows repeatable


def _left_pad(row: np.ndarray) -> np.ndarray:
    tokens = row[row != 0]
    return np.concatenate([np.zeros(len(row) - len(tokens), row.dtype), tokens])


def test_logits_do_not_depend_on_padding_or_other_rows():
    config = get_decoder_config("llama-tiny")
    params = api.init_params(config, jax.random.key(2))
    inputs, targets = _batch(config)
    right = _logits(config, params, inputs, targets)
    left_inputs = np.stack([_left_pad(r) for r in inputs])
    assert not np.array_equal(left_inputs, inputs)
    np.testing.assert_allclose(_logits(config, params, left_inputs, targets), right, atol=1e-5)
    np.testing.assert_allclose(_decoded(config, params, left_inputs, targets), right, atol=1e-5)
    for row in range(4):
        prompt = inputs[row][inputs[row] != 0][None]
        alone = api.logits(config, params, prompt, targets[row : row + 1])
        np.testing.assert_allclose(alone[0], right[row], atol=1e-5, err_msg=f"row {row}")
    # Other rows' tokens do not leak into a row.
    other = inputs.copy()
    other[1:] = np.random.default_rng(9).integers(3, config.vocab_size, other[1:].shape)
    np.testing.assert_allclose(_logits(config, params, other, targets)[0], right[0], atol=1e-5)


def test_response_pads_do_not_change_earlier_logits():
    config = get_decoder_config("qwen2-tiny")
    params = api.init_params(config, jax.random.key(3))
    inputs, targets = _batch(config)
    full = _logits(config, params, inputs, targets)
    cut = targets.copy()
    cut[:, 3:] = 0
    np.testing.assert_allclose(_logits(config, params, inputs, cut)[:, :4], full[:, :4], atol=1e-5)
    longer = np.concatenate([targets, np.zeros((4, 3), np.int32)], axis=1)
    np.testing.assert_allclose(_logits(config, params, inputs, longer)[:, :6], full, atol=1e-5)
    # A changed response token changes later logits (the check above can fail).
    assert float(jnp.max(jnp.abs(_logits(config, params, inputs, cut)[:, 4:] - full[:, 4:]))) > 1e-3


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("llama-tiny", {"num_kv_heads": 2}),
        ("llama-tiny", {"num_kv_heads": 1}),  # multi-query
        ("llama-tiny", {"num_kv_heads": 4}),  # multi-head
        ("qwen2-tiny", {}),
    ],
)
def test_grouped_query_variants_run_and_decode_consistently(name, overrides):
    config = get_decoder_config(name, **overrides)
    params = api.init_params(config, jax.random.key(4))
    if config.attention_bias:  # non-zero biases, so they take part
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.1 if "bias" in jax.tree_util.keystr(p) else x, params
        )
    inputs, targets = _batch(config)
    want = _logits(config, params, inputs, targets)
    assert bool(jnp.all(jnp.isfinite(want)))
    np.testing.assert_allclose(_decoded(config, params, inputs, targets), want, atol=1e-5)


def test_bfloat16_runs_and_is_close_to_float32():
    config = get_decoder_config("llama-tiny", dtype="bfloat16", param_dtype="bfloat16")
    params = api.init_params(config, jax.random.key(5))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    inputs, targets = _batch(config)
    got = _logits(config, params, inputs, targets)
    assert got.dtype == jnp.float32
    f32 = config.replace(dtype="float32", param_dtype="float32")
    want = _logits(f32, jax.tree.map(lambda p: p.astype(jnp.float32), params), inputs, targets)
    assert float(jnp.max(jnp.abs(got - want))) < 0.05
    decoded = _decoded(config, params, inputs, targets)
    assert float(jnp.max(jnp.abs(decoded - want))) < 0.05
    assert api.encode(config, params, inputs)["k"][0].dtype == jnp.bfloat16


def test_sharded_logits_and_decoding_equal_unsharded():
    config = get_decoder_config("qwen2-tiny", tie_word_embeddings=False)
    params = api.init_params(config, jax.random.key(6))
    inputs, targets = _batch(config, b=8)
    want = _logits(config, params, inputs, targets)
    want_decoded = _decoded(config, params, inputs, targets)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    shardings = partitioning.param_shardings(
        mesh, models.param_axes(config), models.param_shapes(config)
    )
    assert shardings["layers_0"]["attention"]["key"]["kernel"].spec == P("fsdp", "model", None)
    sharded = jax.device_put(params, shardings)
    batch = partitioning.shard_batch(mesh, {"inputs": inputs, "targets": targets})
    fn = partitioning.jit(functools.partial(api.logits, config), mesh)
    got = fn(sharded, batch["inputs"], batch["targets"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    decoded = partitioning.jit(functools.partial(_decoded, config), mesh)
    np.testing.assert_allclose(
        decoded(sharded, batch["inputs"], batch["targets"]), want_decoded, atol=1e-5
    )
    cache_fn = partitioning.jit(
        lambda p, x: api.init_cache(config, p, api.encode(config, p, x), x, 4), mesh
    )
    cache = cache_fn(sharded, batch["inputs"])
    spec = tuple(cache["k"][0].sharding.spec) + (None,) * 4
    assert spec[:4] == (("data", "fsdp"), "model", None, None), spec


def test_llama3_rope_frequencies_match_transformers():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    config = get_decoder_config("llama-3.2-1b")
    scaling = config.rope_scaling_dict()
    hf = LlamaConfig(
        hidden_size=config.d_model,
        num_attention_heads=config.num_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rope_scaling=scaling,
    )
    inv_freq, scale = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert scale == 1.0
    got = rope_inv_freq(config)
    assert not np.allclose(got, rope_inv_freq(config.replace(rope_scaling=None)))
    np.testing.assert_allclose(got, inv_freq.numpy(), rtol=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown decoder size 'huge'"):
        get_decoder_config("huge")
    with pytest.raises(ValueError, match="d_modle"):
        get_decoder_config("llama-tiny", d_modle=3)
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        get_decoder_config("llama-tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype='float8'"):
        get_decoder_config("llama-tiny", dtype="float8")
    with pytest.raises(ValueError, match="num_layers=0"):
        get_decoder_config("llama-tiny", num_layers=0)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        get_decoder_config("llama-tiny", rope_scaling=(("rope_type", "yarn"),))
    with pytest.raises(ValueError, match="rope_scaling"):
        get_decoder_config("llama-tiny", rope_scaling={"rope_type": "llama3"})
    hash(get_decoder_config("llama-3.2-1b"))  # static jit argument

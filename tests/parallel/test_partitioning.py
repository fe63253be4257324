"""Tests for thack_jax.parallel.partitioning on 8 virtual CPU devices: meshes, the rules
table and shardings; `activate` / `jit` (the one way to run under a mesh); and that no other
module names a mesh axis."""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from thack_jax.parallel import partitioning as pt

MESHES = {
    "8x1": {"data": 8, "model": 1},
    "4x2": {"data": 4, "model": 2},
    "2x4": {"data": 2, "model": 4},
    "fsdp": {"data": 2, "fsdp": 2, "model": 2},
}

# A tiny params tree with some dimensions (10, 6, 3) that 4 does not divide.
AXES = {
    "token_embedder": {"embedding": ("vocab", "embed")},
    "mlp": {"wi": ("embed", "mlp"), "wo": ("mlp", "embed")},
    "relpos": ("heads", "relpos_buckets"),
    "norm": ("embed",),
}
SHAPES = {
    "token_embedder": {"embedding": (10, 8)},
    "mlp": {"wi": (8, 6), "wo": (6, 8)},
    "relpos": (3, 32),
    "norm": (8,),
}


def params_like(shapes):
    return jax.tree.map(
        lambda s: jnp.ones(s, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def test_make_mesh_shapes():
    assert dict(pt.make_mesh().shape) == {"data": 8, "model": 1}
    assert dict(pt.make_mesh({"data": -1, "model": 2}).shape) == {"data": 4, "model": 2}
    assert dict(pt.make_mesh({"model": 4, "data": -1}).shape) == {"data": 2, "model": 4}
    mesh = pt.make_mesh({"fsdp": 2, "model": 2, "data": -1})
    assert mesh.axis_names == ("data", "fsdp", "model")  # canonical order
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(pt.make_mesh({"data": -1}, devices=jax.devices()[:4]).shape)["data"] == 4


@pytest.mark.parametrize(
    "shape,match",
    [
        ({"data": 3, "model": 2}, r"needs 6 devices, 8 available"),
        ({"data": -1, "model": 3}, r"needs a multiple of 3 devices, 8 available"),
        ({"data": -1, "model": -1}, r"at most one axis may be -1"),
        ({"data": 8, "tensor": 1}, r"unknown axes \['tensor'\]"),
        ({"data": 0, "model": 8}, r"size of 'data'"),
    ],
)
def test_make_mesh_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        pt.make_mesh(shape)


def test_rules_drop_absent_mesh_axes_and_agree_with_flax():
    plain, fsdp = pt.make_mesh(MESHES["4x2"]), pt.make_mesh(MESHES["fsdp"])
    rules = dict(pt.flax_axis_rules(plain))
    assert rules["batch"] == "data" and rules["embed"] is None and rules["vocab"] == "model"
    assert dict(pt.flax_axis_rules(fsdp))["batch"] == ("data", "fsdp")
    for mesh in (plain, fsdp):
        for axes in [
            ("vocab", "embed"),
            ("batch", "length", "embed"),
            ("embed", "mlp"),
            ("batch", "length", "heads", "kv"),
            ("heads", "relpos_buckets"),
        ]:
            flax_spec = nn.logical_to_mesh_axes(axes, pt.flax_axis_rules(mesh))
            assert pt.logical_to_spec(mesh, axes) == flax_spec, (mesh.shape, axes)
    # Params shard embed over fsdp; activations give fsdp to batch and replicate embed.
    assert pt.logical_to_spec(fsdp, ("vocab", "embed")) == P("model", "fsdp")
    assert pt.logical_to_spec(fsdp, ("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="unknown logical axes"):
        pt.logical_to_spec(plain, ("vocab", "embd"))
    with pytest.raises(ValueError, match="rank differs"):
        pt.logical_to_spec(plain, ("vocab",), (4, 4))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_param_shardings_with_indivisible_dims(name):
    mesh = pt.make_mesh(MESHES[name])
    params = params_like(SHAPES)
    shardings = pt.param_shardings(mesh, AXES, params)
    model = dict(mesh.shape)["model"]
    expect_vocab = "model" if 10 % model == 0 else None
    expect_mlp = "model" if 6 % model == 0 else None
    expect_heads = "model" if 3 % model == 0 else None
    embed = "fsdp" if "fsdp" in mesh.axis_names else None
    assert shardings["token_embedder"]["embedding"].spec == P(expect_vocab, embed)
    assert shardings["mlp"]["wi"].spec == P(embed, expect_mlp)
    assert shardings["relpos"].spec == P(expect_heads, None)
    assert shardings["norm"].spec == P(embed)
    placed = jax.device_put(params, shardings)  # valid shardings for these shapes
    assert placed["mlp"]["wo"].sharding == shardings["mlp"]["wo"]
    if name == "2x4":  # without shapes, the rules alone would shard vocab=10 over model=4
        assert pt.param_shardings(mesh, AXES)["token_embedder"]["embedding"].spec == P(
            "model", None
        )


@pytest.mark.parametrize(
    "tx",
    [optax.adamw(1e-3), optax.adafactor(1e-3, min_dim_size_to_factor=4)],
    ids=["adamw", "adafactor"],
)
@pytest.mark.parametrize("with_shapes", [True, False])
def test_opt_state_shardings(tx, with_shapes):
    mesh = pt.make_mesh(MESHES["fsdp"])
    params = params_like(SHAPES)
    p_shardings = pt.param_shardings(mesh, AXES, params)
    state_shapes = jax.eval_shape(tx.init, params)
    shardings = pt.opt_state_shardings(
        mesh, state_shapes, p_shardings, params if with_shapes else None
    )
    assert jax.tree.structure(shardings) == jax.tree.structure(state_shapes)
    flat_params = {
        jax.tree_util.keystr(k): (v.shape, s)
        for (k, v), s in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(p_shardings), strict=True
        )
    }
    rep = pt.replicated(mesh)
    inherited = 0
    leaves = jax.tree_util.tree_leaves_with_path(state_shapes)
    for (path, leaf), got in zip(leaves, jax.tree.leaves(shardings), strict=True):
        key = next((k for k in flat_params if jax.tree_util.keystr(path).endswith(k)), None)
        if key is not None and leaf.shape == flat_params[key][0]:
            assert got == flat_params[key][1], jax.tree_util.keystr(path)
            inherited += int(got != rep)
        else:  # counts, factored row/column vectors, (1,) placeholders
            assert got == rep, jax.tree_util.keystr(path)
    assert inherited > 0
    # The shardings work end to end: init and one update under jit.
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.jit(
        lambda g, s, p: tx.update(g, s, p),
        in_shardings=(p_shardings, shardings, p_shardings),
        out_shardings=(p_shardings, shardings),
    )
    updates, state = step(params, state, params)
    assert np.all(np.isfinite(np.asarray(updates["mlp"]["wi"])))


@pytest.mark.parametrize("name", ["4x2", "fsdp"])
def test_shard_batch_places_rows(name):
    mesh = pt.make_mesh(MESHES[name])
    inputs = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    out = pt.shard_batch(mesh, {"inputs": inputs, "lengths": np.arange(16)})
    arr = out["inputs"]
    np.testing.assert_array_equal(np.asarray(arr), inputs)
    assert arr.sharding.is_equivalent_to(pt.batch_sharding(mesh, 2), 2)
    dp = pt.data_parallel_size(mesh)
    assert dp == 4
    rows = 16 // dp
    coords = {d: idx for idx, d in np.ndenumerate(mesh.devices)}
    for shard in arr.addressable_shards:
        idx = coords[shard.device]
        # Device position along the data(+fsdp) axes picks its block of rows.
        block = idx[0] if name == "4x2" else idx[0] * 2 + idx[1]
        np.testing.assert_array_equal(
            np.asarray(shard.data), inputs[block * rows : (block + 1) * rows]
        )
    assert out["lengths"].sharding.spec == P(arr.sharding.spec[0])


def test_batch_divisibility_errors():
    mesh = pt.make_mesh(MESHES["4x2"])
    pt.check_batch_divisible(mesh, 8)
    with pytest.raises(
        ValueError, match="batch size 10 is not divisible by the data-parallel size 4"
    ):
        pt.check_batch_divisible(mesh, 10)
    with pytest.raises(ValueError, match=r"batch\['inputs'\] shape \(6, 2\)"):
        pt.shard_batch(mesh, {"inputs": np.zeros((6, 2))})
    with pytest.raises(ValueError, match="ndim >= 1"):
        pt.batch_sharding(mesh, 0)


def test_with_logical_constraint_inside_jit():
    mesh = pt.make_mesh(MESHES["2x4"])
    axes = ("batch", "length", "vocab")

    @jax.jit
    def f(x):
        return pt.with_logical_constraint(x * 2.0, axes) + 1.0

    x = jnp.ones((4, 3, 8))
    # No mesh set: a no-op (still traces and runs).
    assert pt.with_logical_constraint(x, axes) is x
    np.testing.assert_allclose(f(x), 3.0)
    with jax.set_mesh(mesh):
        y = f(x)
        assert y.sharding.is_equivalent_to(pt.logical_to_sharding(mesh, axes), 3)
        # vocab=6 is not divisible by model=4: replicated instead of an error.
        z = f(jnp.ones((4, 3, 6)))
        assert z.sharding.is_equivalent_to(
            jax.sharding.NamedSharding(mesh, P("data", None, None)), 3
        )
    # An explicit mesh works without a context.
    hlo = jax.jit(lambda x: pt.with_logical_constraint(x, axes, mesh)).lower(x).as_text()
    assert "sharding" in hlo


def test_flax_rules_context_with_model_annotations():
    mesh = pt.make_mesh(MESHES["4x2"])

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(nn.initializers.ones, ("embed", "vocab")),
                (x.shape[-1], 6),
            )
            return nn.with_logical_constraint(x @ kernel, ("batch", "vocab"))

    x = jnp.ones((8, 4))
    with jax.set_mesh(mesh), nn.logical_axis_rules(pt.flax_axis_rules(mesh)):
        variables = Dense().init(jax.random.PRNGKey(0), x)
        specs = nn.get_partition_spec(variables)
        shardings = nn.logical_to_mesh_sharding(specs, mesh, pt.flax_axis_rules(mesh))
        y = jax.jit(Dense().apply)(variables, x)
    assert shardings["params"]["kernel"].spec == P(None, "model")
    assert y.sharding.is_equivalent_to(pt.logical_to_sharding(mesh, ("batch", "vocab")), 2)


# ----------------------------------------------------------------------------- one way in


def test_activate_sets_mesh_and_rules_and_none_is_a_no_op():
    mesh = pt.make_mesh(MESHES["4x2"])
    with pt.activate(None):
        assert nn.get_logical_axis_rules() == () and jax.sharding.get_abstract_mesh().empty
    with pt.activate(mesh):
        assert dict(nn.get_logical_axis_rules()) == dict(pt.flax_axis_rules(mesh))
        assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
    assert nn.get_logical_axis_rules() == () and jax.sharding.get_abstract_mesh().empty
    explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match="Auto mesh axes"), pt.activate(explicit):
        pass


def test_jit_traces_under_the_mesh_rules():
    """A flax constraint inside a `pt.jit` function is applied with the mesh's rules, which
    a plain `jax.jit` called outside any context does not do."""
    mesh = pt.make_mesh(MESHES["4x2"])
    axes = ("batch", "vocab")

    def f(x):
        return nn.with_logical_constraint(x * 2.0, axes)

    x = jax.device_put(jnp.ones((8, 6)), pt.replicated(mesh))
    want = pt.logical_to_sharding(mesh, axes)
    y = pt.jit(f, mesh)(x)
    assert y.sharding.is_equivalent_to(want, 2)
    assert not jax.jit(f)(x).sharding.is_equivalent_to(want, 2)  # no rules: no constraint
    assert "sharding" in pt.jit(f, mesh).lower(x).as_text()
    np.testing.assert_allclose(pt.jit(f, None)(jnp.ones((8, 6))), 2.0)


def test_put_replicated_keeps_arrays_already_on_the_mesh():
    mesh = pt.make_mesh(MESHES["4x2"])
    sharded = jax.device_put(jnp.ones((8, 2)), pt.batch_sharding(mesh))
    tree = pt.put_replicated({"a": np.ones((3,)), "b": sharded}, mesh)
    assert tree["a"].sharding == pt.replicated(mesh)
    assert tree["b"] is sharded


def test_named_mesh_shapes():
    assert pt.DEFAULT_MESH_SHAPE == (("data", -1),)
    assert pt.make_mesh(dict(pt.DEFAULT_MESH_SHAPE)).shape == pt.make_mesh().shape
    assert pt.data_parallel_mesh_shape(2) == {"data": -1, "model": 2}
    assert dict(pt.make_mesh(pt.data_parallel_mesh_shape(2)).shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="model_parallel=0"):
        pt.data_parallel_mesh_shape(0)


# Where mesh axes may be named: the partitioning module and its light name module.
_MESH_AXIS_OWNERS = ("thack_jax/parallel/partitioning.py", "thack_jax/parallel/mesh_names.py")


def _is_axis(node) -> bool:
    return isinstance(node, ast.Constant) and node.value in pt.MESH_AXES


def _is_number(node) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int


def _axis_or_axes(node) -> bool:
    return _is_axis(node) or (
        isinstance(node, ast.Tuple | ast.List) and node.elts and all(map(_is_axis, node.elts))
    )


def mesh_axis_uses(source: str) -> list[int]:
    """Line numbers where `source` names a mesh axis as one: a mesh-shape dict
    ({"data": -1}), an (axis, size) pair, a rules entry (logical name, mesh axis), a
    PartitionSpec / P / make_mesh argument, or `.shape["model"]`. Docstrings and other
    strings that happen to read "model" or "data" are not uses."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            hit = node.keys and all(k is not None and _is_axis(k) for k in node.keys)
        elif isinstance(node, ast.Tuple | ast.List) and len(node.elts) == 2:
            first, second = node.elts
            hit = (_is_axis(first) and _is_number(second)) or (
                isinstance(first, ast.Constant)
                and first.value in pt.LOGICAL_AXES
                and _axis_or_axes(second)
            )
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            args = list(node.args) + [k.value for k in node.keywords]
            hit = name in ("PartitionSpec", "P", "make_mesh") and any(
                _axis_or_axes(a) for a in args
            )
        elif isinstance(node, ast.Subscript):
            hit = (
                isinstance(node.value, ast.Attribute)
                and node.value.attr in ("shape", "axis_sizes")
                and _is_axis(node.slice)
            )
        else:
            hit = False
        if hit:
            lines.append(node.lineno)
    return sorted(set(lines))


def test_the_mesh_axis_checker_finds_each_kind_of_use():
    uses = """
mesh = make_mesh({"data": -1, "model": 2})
shape: tuple = (("data", -1),)
rules = (("batch", ("data", "fsdp")),)
spec = PartitionSpec("data", None)
size = mesh.shape["model"]
axes = jax.make_mesh((8,), ("data",))
"""
    assert mesh_axis_uses(uses) == [2, 3, 4, 5, 6, 7]
    not_uses = '''
"""mesh_shape: e.g. {'data': 8, 'model': 2}."""
path = ctx.path("oracle", "model")
row = {"model": size, "ms": 1.0}
kind = ("model", "teacher")
'''
    assert mesh_axis_uses(not_uses) == []


def test_no_module_outside_partitioning_names_a_mesh_axis():
    root = pathlib.Path(__file__).resolve().parents[2]
    files = sorted((root / "thack_jax").rglob("*.py")) + sorted((root / "launch").glob("*.py"))
    assert len(files) > 40
    found = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel in _MESH_AXIS_OWNERS:
            continue
        lines = mesh_axis_uses(path.read_text())
        if lines:
            found[rel] = lines
    assert not found, f"mesh axes named outside parallel/partitioning.py: {found}"

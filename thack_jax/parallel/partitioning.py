"""The device mesh, the one logical-axis rules table, and shardings.

This is the only module (with its light name module `mesh_names.py`) that names mesh axes:
`data`, `model` and the optional `fsdp` (tests/parallel/test_partitioning.py checks it).
Everything else speaks logical axis names (params: `vocab, embed, joined_kv, mlp, heads,
relpos_buckets`; activations: `batch, length, embed, heads, kv, mlp, vocab`).

Mapping a tuple of logical names to a `PartitionSpec` follows flax's priority rule: the rules
are visited in table order, and a rule shards its dimension over its mesh axes only if none
of those mesh axes is already used by another dimension of the same array. So `batch`
(first in the table) takes `("data", "fsdp")` and an activation's `embed` then stays
replicated, while a parameter's `embed` (no `batch` present) is sharded over `fsdp`.
Mesh axes absent from the mesh are dropped from the rules (`embed` -> replicated without
`fsdp`).

Indivisible dimensions: when the array shape is known and a dimension's size is not divisible
by the product of the mesh axis sizes a rule gives it, that rule is skipped and the dimension
ends up replicated (its mesh axes stay free for later rules). This is deterministic (table
order, then dimension sizes) and lets tiny test models run on 8 devices.

One way in: every jitted function that runs on a mesh is made with `partitioning.jit(fn,
mesh, ...)`, which calls (and traces, and lowers) it under `activate(mesh)`: the mesh set
with `jax.set_mesh` and flax's logical-axis rules of that mesh, so the network's
`nn.with_logical_constraint` and this module's `with_logical_constraint` see the same table.
Like t5x's partitioner, the context is entered outside jit, where `jax.set_mesh` is allowed.
"""

import contextlib
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from thack_jax.parallel.mesh_names import DATA, DEFAULT_MESH_SHAPE, FSDP, MESH_AXES, MODEL

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", (DATA, FSDP)),
    ("vocab", MODEL),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("joined_kv", MODEL),
    ("embed", FSDP),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
)
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_AXIS_RULES)


def data_parallel_mesh_shape(model_parallel: int = 1) -> dict[str, int]:
    """The shape of `model_parallel`-way model parallelism, all other devices on `data`."""
    if not isinstance(model_parallel, (int, np.integer)) or model_parallel < 1:
        raise ValueError(f"model_parallel={model_parallel!r} must be an int >= 1")
    return {DATA: -1, MODEL: int(model_parallel)}


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes (data, [fsdp,] model), e.g. make_mesh({"data": -1, "model": 2}).

    shape: axis -> size; one size may be -1 (= all the remaining devices). `data` and `model`
    are always present (size 1 when not given); `fsdp` only when given. Default
    `DEFAULT_MESH_SHAPE` ({"data": -1}). devices: the devices to use (default: all).
    """
    shape = dict(DEFAULT_MESH_SHAPE if shape is None else shape)
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh {shape}: unknown axes {unknown}; valid axes: {list(MESH_AXES)}")
    for axis, size in shape.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh {shape}: size of {axis!r} must be >= 1 or -1, got {size!r}")
    rest = [axis for axis, size in shape.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1, got {rest}")
    known = math.prod(size for size in shape.values() if size != -1)
    n = len(devices)
    if rest:
        if n % known:
            raise ValueError(f"mesh {shape} needs a multiple of {known} devices, {n} available")
        shape[rest[0]] = n // known
    elif known != n:
        raise ValueError(f"mesh {shape} needs {known} devices, {n} available")
    names = tuple(a for a in MESH_AXES if a in shape or a in (DATA, MODEL))
    sizes = tuple(int(shape.get(a, 1)) for a in names)
    # Auto axis types: GSPMD propagation, as flax's logical constraints expect.
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def _filter_axes(axes: MeshAxes, present: Sequence[str]) -> MeshAxes:
    """Drops mesh axes absent from the mesh; () -> None, 1-tuple -> str."""
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in present)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def flax_axis_rules(mesh) -> tuple[tuple[str, MeshAxes], ...]:
    """LOGICAL_AXIS_RULES restricted to `mesh`'s axes, for `flax.linen.logical_axis_rules`."""
    return tuple((name, _filter_axes(axes, mesh.axis_names)) for name, axes in LOGICAL_AXIS_RULES)


def logical_to_spec(mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None):
    """PartitionSpec for an array whose dimensions have logical names `axes` (None = replicated).

    shape: the array shape; when given, dimensions not divisible by their mesh axes are
    replicated (see the module docstring).
    """
    axes = tuple(axes)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)} (rank differs)")
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown} in {axes}; known: {list(LOGICAL_AXES)}")
    dups = sorted({a for a in axes if a is not None and axes.count(a) > 1})
    if dups:
        raise ValueError(f"logical axes {dups} occur more than once in {axes}")
    sizes = _mesh_sizes(mesh)
    result: list[MeshAxes] = [None] * len(axes)
    assigned = [False] * len(axes)
    used: set[str] = set()
    for name, rule_axes in flax_axis_rules(mesh):
        if name not in axes:
            continue
        pos = axes.index(name)
        mesh_axes = _as_tuple(rule_axes)
        if assigned[pos] or used.intersection(mesh_axes):
            continue
        if shape is not None and shape[pos] % math.prod(sizes[a] for a in mesh_axes):
            continue
        result[pos] = rule_axes
        assigned[pos] = True
        used.update(mesh_axes)
    return PartitionSpec(*result)


def logical_to_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding for logical `axes` (and optional `shape`, see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(mesh, axes, shape))


def _is_axes(x) -> bool:
    return isinstance(x, tuple)


def _shape_of(x) -> tuple[int, ...]:
    if not hasattr(x, "shape"):
        raise ValueError(f"shapes tree leaf {x!r} has no .shape (want arrays/ShapeDtypeStruct)")
    return tuple(x.shape)


def param_shardings(mesh: Mesh, axes_tree, shapes_tree=None):
    """Tree of NamedSharding for a params tree whose leaves are tuples of logical axis names.

    shapes_tree: the same tree with arrays / `jax.ShapeDtypeStruct` leaves; enables the
    indivisible-dimension fallback.
    """
    if shapes_tree is None:
        return jax.tree.map(lambda a: logical_to_sharding(mesh, a), axes_tree, is_leaf=_is_axes)
    try:
        return jax.tree.map(
            lambda a, s: logical_to_sharding(mesh, a, _shape_of(s)),
            axes_tree,
            shapes_tree,
            is_leaf=_is_axes,
        )
    except ValueError as e:
        raise ValueError(f"param_shardings: axes tree and shapes tree differ: {e}") from e


def _divides(mesh, spec: PartitionSpec, shape: tuple[int, ...]) -> bool:
    sizes = _mesh_sizes(mesh)
    return len(spec) == len(shape) and all(
        dim % math.prod(sizes[a] for a in _as_tuple(axes)) == 0
        for dim, axes in zip(shape, spec, strict=True)
    )


def opt_state_shardings(mesh: Mesh, opt_state_shapes, params_shardings, params_shapes=None):
    """Shardings for an optax state, e.g. of `jax.eval_shape(tx.init, params)`.

    Rule: a subtree of the state whose tree structure equals the params tree (adam's mu/nu,
    adafactor's v/v_row/v_col, ...) is matched leaf by leaf with the params. A leaf there gets
    its param's sharding if it has the param's shape (from `params_shapes`; when that is None:
    the same rank and every sharded dimension divisible). Every other leaf (counts, scalars,
    adafactor's factored row/column vectors, placeholders) is replicated. Containers must
    match exactly (a dict params tree does not mirror a FrozenDict state).
    """
    params_def = jax.tree.structure(params_shardings)
    shapes = params_shapes
    if shapes is not None and jax.tree.structure(shapes) != params_def:
        raise ValueError("opt_state_shardings: params_shapes does not match params_shardings")
    rep = replicated(mesh)

    def mirrors(node) -> bool:
        return jax.tree.structure(node) == params_def

    def leaf_sharding(leaf, sharding, param_shape):
        shape = tuple(np.shape(leaf))
        if param_shape is not None:
            same = shape == tuple(param_shape)
        else:
            same = _divides(mesh, sharding.spec, shape)
        return sharding if same else rep

    def assign(node):
        if not mirrors(node):
            return rep
        if shapes is None:
            return jax.tree.map(lambda x, s: leaf_sharding(x, s, None), node, params_shardings)
        return jax.tree.map(
            lambda x, s, p: leaf_sharding(x, s, _shape_of(p)), node, params_shardings, shapes
        )

    return jax.tree.map(assign, opt_state_shapes, is_leaf=mirrors)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input: dim 0 over the data-parallel axes, the rest replicated."""
    if ndim < 1:
        raise ValueError(f"batch arrays need ndim >= 1, got {ndim}")
    return logical_to_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch dimension is split (product of its mesh axes' sizes)."""
    sizes = _mesh_sizes(mesh)
    return math.prod(sizes[a] for a in _as_tuple(dict(flax_axis_rules(mesh))["batch"]))


def check_batch_divisible(mesh: Mesh, batch_size: int) -> None:
    """Raises ValueError unless the global `batch_size` divides over the data-parallel axes."""
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the data-parallel size {dp} "
            f"(mesh {_mesh_sizes(mesh)})"
        )


def shard_batch(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Puts a dict of host arrays [local_batch, ...] on the mesh, rows over the data axes.

    Each process passes its own rows (single process: the whole batch); the global batch is
    local_batch * process_count and must divide over the data-parallel axes.
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim < 1:
            raise ValueError(f"batch[{name!r}] is a scalar; want [batch, ...]")
        global_rows = value.shape[0] * jax.process_count()
        try:
            check_batch_divisible(mesh, global_rows)
        except ValueError as e:
            raise ValueError(f"batch[{name!r}] shape {value.shape}: {e}") from e
        sharding = batch_sharding(mesh, value.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def with_logical_constraint(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None = None):
    """`jax.lax.with_sharding_constraint` by logical axis names, usable inside jit.

    The mesh is `mesh`, else the current one (`jax.set_mesh(mesh)`); with neither this is a
    no-op. Indivisible dimensions are replicated (shapes are static under jit).
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
    spec = logical_to_spec(mesh, axes, np.shape(x))
    if isinstance(mesh, Mesh):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, spec)


# ----------------------------------------------------------------------------- running on a mesh


def check_auto_axes(mesh: Mesh) -> None:
    """Raises ValueError unless every axis of `mesh` is Auto (GSPMD propagation, which
    flax's logical constraints and `with_logical_constraint` rely on)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if any(t != AxisType.Auto for t in mesh.axis_types):
        raise ValueError(
            f"partitioning needs Auto mesh axes (flax logical constraints); got axis types "
            f"{mesh.axis_types} for axes {mesh.axis_names}"
        )


@contextlib.contextmanager
def activate(mesh: Mesh | None):
    """Runs the body on `mesh`: `jax.set_mesh(mesh)` and flax's `logical_axis_rules` of
    `flax_axis_rules(mesh)`. A no-op for mesh=None. Enter it outside jit (`jax.set_mesh`
    refuses to run under a trace); `partitioning.jit` does that for a jitted function."""
    if mesh is None:
        yield
        return
    check_auto_axes(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_axis_rules(mesh)):
        yield


class MeshFunction:
    """A `jax.jit` function called, traced and lowered under `activate(mesh)`.

    The logical-axis rules are a function of the mesh, so one compiled function per mesh is
    enough (jax.jit does not see flax's rules; here they can never differ).
    """

    def __init__(self, fn, mesh: Mesh | None, **jit_kwargs):
        if mesh is not None:
            check_auto_axes(mesh)
        self.mesh = mesh
        self._jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        with activate(self.mesh):
            return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with activate(self.mesh):
            return self._jitted.lower(*args, **kwargs)


def jit(fn, mesh: Mesh | None = None, **jit_kwargs) -> MeshFunction:
    """`jax.jit(fn, **jit_kwargs)` that always runs under `activate(mesh)` (see MeshFunction)."""
    return MeshFunction(fn, mesh, **jit_kwargs)


def put_replicated(tree, mesh: Mesh):
    """Leaves of `tree` not already on `mesh` (numpy, single-device arrays) are replicated
    onto it; leaves on `mesh` are kept as they are. So a jitted function never has to choose
    (possibly uneven) shardings for its inputs."""
    rep = replicated(mesh)

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, rep)
        # device_put cannot target other hosts' devices; every process holds the whole
        # value, so each builds its own devices' (identical) shards of the global array.
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=x.dtype._impl)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, rep, lambda index: host[index])

    return jax.tree.map(place, tree)


def to_host(x) -> np.ndarray:
    """A jax array -> numpy on every process (gathered when it spans several processes:
    `np.asarray` cannot fetch other hosts' shards)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

"""Accelerator memory per device, estimated without allocating anything (and forward FLOPs).

Parameters and optimizer state are exact: their shapes come from `jax.eval_shape` of the
model's init (`models.param_shapes`) and of the optimizer's `init`, and their per-device
share from the partitioning rules applied on an abstract mesh (`partitioning.param_shardings`
and `partitioning.opt_state_shardings`, so a dimension that does not divide over its mesh
axes stays replicated, as in training). Activations are a formula (below), an estimate of
what XLA keeps alive; compilers fuse and rematerialise, so treat it as +-30%.

Modes (what one jitted call holds at its peak):
  * 'train': params + gradients (float32 when gradients are accumulated over microbatches,
    else the parameter dtype) + optimizer state + the activations stored for the backward
    pass of one microbatch + logits.
  * 'forward': params + one layer's activations (transient) + the encoder output + logits
    and log-probs [B, Ly, V] float32 (a frozen teacher's forward, scoring).
  * 'sample': params + the KV cache of `sampling.sample` (self-attention [N, H, Ly, Dk] and
    cross-attention [N, H, Lx, Dk] keys and values per decoder layer, N = batch *
    num_samples) + the encoder's transient + optionally full log-probs [N, Ly, V] float32.

Activation formula (training, per device; r = rows per device per microbatch, I = heads *
d_kv, F = d_ff, a = activation bytes; I, F, H and V are divided by the `model` axis when
it divides them):
  encoder layer: r*Lx*(4D + 4I + kF)*a + r*H*Lx*Lx*(4 + a)
  decoder layer: r*Ly*(6D + 6I + kF)*a + r*Lx*2I*a + r*H*(Ly*Ly + Ly*Lx)*(4 + a)
  with k = 4 for gated-GELU (two input projections, the GELU, the product), 2 for ReLU;
  4D: the residual stream and layer-norm output before each block; attention: q, k, v and
  the attended values; (4 + a): the float32 softmax output and its cast copy.
  logits: 3 * r*Ly*V*4 bytes (float32 logits, log-softmax, their gradient).
  Every layer's activations are kept: the network does not rematerialise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from thack_jax import models
from thack_jax.core import checks
from thack_jax.models.config import T5Config
from thack_jax.parallel import partitioning
from thack_jax.training import optim

GiB = 1 << 30
# Nominal memory per chip / GPU (public spec sheets). H200: 141 GB (NVIDIA).
DEVICES: dict[str, int] = {
    "TPU v4": 32 * GiB,
    "TPU v5e": 16 * GiB,
    "TPU v5p": 95 * GiB,
    "A100 40GB": 40 * GiB,
    "A100 80GB": 80 * GiB,
    "H100 80GB": 80 * GiB,
    "H200": 141 * GiB,
}
# XLA, the runtime and fragmentation take a share of the nominal memory.
USABLE_FRACTION = 0.9
MODES = ("train", "forward", "sample")
PERSISTENT = ("params", "grads", "opt_state")
TRANSIENT = ("activations", "logits", "cache")


def abstract_mesh(mesh_shape: Mapping[str, int] | None) -> AbstractMesh:
    """A device-less mesh with axes (data, [fsdp,] model) of the given sizes (no -1)."""
    shape = dict(mesh_shape or {partitioning.DATA: 1})
    unknown = sorted(set(shape) - set(partitioning.MESH_AXES))
    if unknown:
        raise ValueError(
            f"mesh_shape {shape}: unknown axes {unknown}; valid: {list(partitioning.MESH_AXES)}"
        )
    for axis, size in shape.items():
        if not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(
                f"mesh_shape {shape}: size of {axis!r} must be an int >= 1 (give explicit "
                f"sizes, not -1), got {size!r}"
            )
    names = tuple(
        a
        for a in partitioning.MESH_AXES
        if a in shape or a in (partitioning.DATA, partitioning.MODEL)
    )
    sizes = tuple(int(shape.get(a, 1)) for a in names)
    return AbstractMesh(sizes, names, axis_types=(AxisType.Auto,) * len(names))


@functools.lru_cache(maxsize=32)
def _model_shapes(config: T5Config):
    """(params tree of ShapeDtypeStruct, tree of logical axes); cached: tracing is slow."""
    return models.param_shapes(config), models.param_axes(config)


@functools.lru_cache(maxsize=32)
def _opt_shapes(config: T5Config, optimizer: str):
    tx = optim.make_optimizer(optim.OptimizerConfig(optimizer, 1e-3))
    return jax.eval_shape(tx.init, _model_shapes(config)[0])


def _per_device_bytes(shapes, shardings) -> int:
    leaves = jax.tree.leaves(shapes)
    shards = jax.tree.leaves(shardings)
    if len(leaves) != len(shards):
        raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings")
    return int(
        sum(
            math.prod(sh.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
            for x, sh in zip(leaves, shards, strict=True)
        )
    )


def _divided(size: int, ways: int) -> float:
    """size / ways when the mesh axis divides it (sharded), else size (replicated)."""
    return size / ways if size % ways == 0 else size


def _layer_bytes(c: T5Config, rows: float, lx: int, ly: int, a: int, ways: int):
    """(encoder layer, decoder layer) bytes stored for backward, per device (see module doc)."""
    d = c.d_model
    inner = _divided(c.inner_dim, ways)
    heads = _divided(c.num_heads, ways)
    ff = _divided(c.d_ff, ways) * (4 if c.feed_forward == "gated-gelu" else 2)
    enc = rows * lx * (4 * d + 4 * inner + ff) * a + rows * heads * lx * lx * (4 + a)
    dec = (
        rows * ly * (6 * d + 6 * inner + ff) * a
        + rows * lx * 2 * inner * a
        + rows * heads * (ly * ly + ly * lx) * (4 + a)
    )
    return enc, dec


@dataclasses.dataclass(frozen=True)
class Workload:
    """The rows one jitted call handles, as one frozen value checked when it is made.

    batch_size: global rows (prompts in 'sample' mode; rows = batch_size * num_samples).
    input_length, target_length: Lx and Ly of every row.
    num_microbatches: gradient-accumulation microbatches per step ('train' mode only).
    num_samples: responses per prompt, full_logprobs: whether the sampler keeps the full
      log-probs [N, Ly, V] float32 ('sample' mode only).
    """

    batch_size: int
    input_length: int
    target_length: int
    _: dataclasses.KW_ONLY
    num_microbatches: int = 1
    num_samples: int = 1
    full_logprobs: bool = False

    def __post_init__(self):
        counts = ("batch_size", "input_length", "target_length", "num_microbatches", "num_samples")
        for name in counts:
            checks.integer(self, name, 1)


def estimate(
    config: T5Config,
    workload: Workload,
    *,
    mode: str = "train",
    mesh_shape: Mapping[str, int] | None = None,
    optimizer: str = "adafactor",
    param_dtype: str | None = None,
    activation_dtype: str | None = None,
) -> dict:
    """Bytes per device of one model running `workload` in one `mode` (see the module
    docstring), e.g. `estimate(config, Workload(8, 512, 128), mesh_shape={'data': 8})`.

    mesh_shape: explicit axis sizes, e.g. {'data': 8, 'model': 2}; default one device.
    optimizer: 'adafactor' | 'adamw' (as `optim.make_optimizer` builds it); train mode only.
    Returns a dict: 'params', 'grads', 'opt_state', 'activations', 'logits', 'cache',
    'total' (bytes per device), 'num_params', 'rows_per_device' and the arguments.
    """
    if not isinstance(config, T5Config):  # the activation formulas are the T5 layers'
        raise ValueError(
            f"memory estimates cover the T5 family only, not {type(config).__name__} "
            "(decoder-only roles: measure instead)"
        )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {list(MODES)}")
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a memory.Workload, got {type(workload).__name__}")
    batch_size, num_microbatches = workload.batch_size, workload.num_microbatches
    num_samples = workload.num_samples
    config = config.replace(
        param_dtype=param_dtype or config.param_dtype, dtype=activation_dtype or config.dtype
    )
    mesh = abstract_mesh(mesh_shape)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    dp = partitioning.data_parallel_size(mesh)
    ways = sizes[partitioning.MODEL]
    rows_total = batch_size * (num_samples if mode == "sample" else 1)
    if rows_total % (dp * (num_microbatches if mode == "train" else 1)):
        raise ValueError(
            f"{rows_total} rows do not divide over the data-parallel size {dp} x "
            f"{num_microbatches} microbatches (mesh {sizes})"
        )
    rows = rows_total / dp / (num_microbatches if mode == "train" else 1)

    shapes, axes = _model_shapes(config)
    p_sh = partitioning.param_shardings(mesh, axes, shapes)
    out = {k: 0 for k in PERSISTENT + TRANSIENT}
    out["params"] = _per_device_bytes(shapes, p_sh)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    a = np.dtype(config.dtype).itemsize
    lx, ly, d = workload.input_length, workload.target_length, config.d_model
    vocab = _divided(config.vocab_size, ways)
    enc, dec = _layer_bytes(config, rows, lx, ly, a, ways)
    n_enc, n_dec = config.num_encoder_layers, config.num_decoder_layers

    if mode == "train":
        if optimizer not in optim.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {list(optim.OPTIMIZERS)}")
        o_shapes = _opt_shapes(config, optimizer)
        o_sh = partitioning.opt_state_shardings(mesh, o_shapes, p_sh, params_shapes=shapes)
        out["opt_state"] = _per_device_bytes(o_shapes, o_sh)
        grad_bytes = 4 if num_microbatches > 1 else np.dtype(config.param_dtype).itemsize
        out["grads"] = out["params"] // np.dtype(config.param_dtype).itemsize * grad_bytes
        out["activations"] = int(n_enc * enc + n_dec * dec)
        out["logits"] = int(3 * rows * ly * vocab * 4)
    elif mode == "forward":
        # Layers run one after another: one layer's activations, the encoder output kept.
        out["activations"] = int(max(enc, dec) + rows * lx * d * a)
        out["logits"] = int(2 * rows * ly * vocab * 4)
    else:
        inner = _divided(config.inner_dim, ways)
        prompts = batch_size / dp
        out["cache"] = int(n_dec * 2 * rows * (ly + lx) * inner * a)
        out["activations"] = int(enc * prompts / rows + prompts * lx * d * a)
        full = workload.full_logprobs
        out["logits"] = int(rows * ly * vocab * 4) if full else int(rows * vocab * 4)
    out["total"] = sum(out[k] for k in PERSISTENT + TRANSIENT)
    out.update(
        mode=mode,
        num_params=int(num_params),
        rows_per_device=rows,
        mesh_shape=sizes,
        batch_size=batch_size,
        input_length=workload.input_length,
        target_length=workload.target_length,
        optimizer=optimizer if mode == "train" else None,
        param_dtype=config.param_dtype,
        activation_dtype=config.dtype,
        num_microbatches=num_microbatches,
    )
    return out


def distill_estimate(
    student: T5Config,
    teacher: T5Config,
    workload: Workload,
    *,
    regime: str = "offline",
    **kwargs,
) -> dict:
    """A distillation step's bytes per device: the student's train step plus the frozen
    teacher (params, and its log-probs [B, Ly, V] float32 alive during the student step).

    regime 'offline': the teacher's forward runs inside the step (its transient counts if
    larger than the student's). 'online_teacher' / 'online_student' / 'mixed': before the
    step the sampler runs (teacher with full log-probs, or the student), holding its cache
    while the student's state and the teacher's params are resident. kwargs: the keyword
    arguments of `estimate` but `mode` (mesh_shape, optimizer, dtypes).
    """
    train = estimate(student, workload, mode="train", **kwargs)
    fwd_kwargs = {k: v for k, v in kwargs.items() if k != "optimizer"}
    fwd = dataclasses.replace(workload, num_microbatches=1)
    t_fwd = estimate(teacher, fwd, mode="forward", **fwd_kwargs)
    mb = workload.num_microbatches
    teacher_lp = t_fwd["logits"] // 2 // mb  # one [r, Ly, V] float32 per microbatch
    resident = sum(train[k] for k in PERSISTENT) + t_fwd["params"]
    train_peak = sum(train[k] for k in TRANSIENT) + teacher_lp
    peaks = {"student train step": train_peak}
    peaks["teacher forward"] = t_fwd["activations"] + t_fwd["logits"]
    if regime in ("online_teacher", "online_student", "mixed"):
        sampler_cfg = teacher if regime == "online_teacher" else student
        sampled = dataclasses.replace(fwd, full_logprobs=regime == "online_teacher")
        s = estimate(sampler_cfg, sampled, mode="sample", **fwd_kwargs)
        peaks["sampler"] = s["cache"] + s["activations"] + s["logits"]
    elif regime != "offline":
        raise ValueError(
            f"unknown regime {regime!r}; valid: offline, online_teacher, online_student, mixed"
        )
    peak_name = max(peaks, key=peaks.get)
    out = dict(train)
    out.update(
        mode=f"distill/{regime}",
        teacher_params=t_fwd["params"],
        teacher_logprobs=teacher_lp,
        peak=peak_name,
        total=int(resident + peaks[peak_name]),
    )
    return out


def forward_flops(config: T5Config, input_length: int, target_length: int) -> float:
    """Matmul FLOPs of one teacher-forced forward pass of one row (multiply-add = 2 FLOPs).

    Per row, with I = heads * d_kv, k = 3 (gated-GELU) or 2 (ReLU) feed-forward matrices:
      2 * [Lx * n_enc * (4DI + kDF) + Ly * n_dec * (6DI + kDF) + Lx * n_dec * 2DI + Ly * D * V]
      + 4 * I * (n_enc * Lx^2 + n_dec * (Ly^2 + Ly * Lx))          (scores and weighted values)
    A train step of the student costs 3x this (forward + backward); embeddings, layer norms
    and softmaxes are not counted (the usual MFU convention).
    """
    d, inner, ff, vocab = config.d_model, config.inner_dim, config.d_ff, config.vocab_size
    k = 3 if config.feed_forward == "gated-gelu" else 2
    lx, ly = input_length, target_length
    n_enc, n_dec = config.num_encoder_layers, config.num_decoder_layers
    dense = (
        lx * n_enc * (4 * d * inner + k * d * ff)
        + ly * n_dec * (6 * d * inner + k * d * ff)
        + lx * n_dec * 2 * d * inner
        + ly * d * vocab
    )
    attention = 4 * inner * (n_enc * lx * lx + n_dec * (ly * ly + ly * lx))
    return float(2 * dense + attention)


def fits(estimate: Mapping, device_memory_bytes: int, usable_fraction=USABLE_FRACTION) -> bool:
    """True when the estimate's total is within `usable_fraction` of the device memory."""
    return estimate["total"] <= usable_fraction * device_memory_bytes


def fitting_devices(estimate: Mapping, devices: Mapping[str, int] = DEVICES) -> list[str]:
    """Names of the devices in `devices` (name -> bytes) that `fits` the estimate."""
    return [name for name, memory in devices.items() if fits(estimate, memory)]


def format_bytes(n: float) -> str:
    """Bytes as GiB with one decimal (MiB below 1 GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a memory table (see `launch/memory.py`)."""

    stage: str
    model: str
    estimate: dict


def table(rows: list[Row]) -> str:
    """A markdown table: stage, model, mesh, rows/device, parts, total, fitting devices."""
    head = (
        "| stage | model | mesh | rows/dev/mb | params | grads+opt | act+logits+cache | "
        "total/dev | fits (90% of HBM) |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        e = row.estimate
        mesh = ",".join(f"{k}={v}" for k, v in e["mesh_shape"].items())
        params = e["params"] + e.get("teacher_params", 0)
        transient = e["activations"] + e["logits"] + e["cache"] + e.get("teacher_logprobs", 0)
        lines.append(
            f"| {row.stage} | {row.model} | {mesh} | {e['rows_per_device']:g} | "
            f"{format_bytes(params)} | {format_bytes(e['grads'] + e['opt_state'])} | "
            f"{format_bytes(transient)} | **{format_bytes(e['total'])}** | "
            f"{', '.join(fitting_devices(e)) or 'none'} |"
        )
    return "\n".join(lines)

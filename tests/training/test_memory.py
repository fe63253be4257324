"""Tests for thack_jax.training.memory (estimates) and launch/memory.py (experiment tables)."""

from __future__ import annotations

import dataclasses
import glob
import math
import os

import gin
import jax
import numpy as np
import pytest

from thack_jax import models
from thack_jax.cli import memory as launch_memory  # noqa: E402
from thack_jax.experiment import gin_registry
from thack_jax.training import memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = models.get_config("tiny")
SHAPE = memory.Workload(batch_size=8, input_length=16, target_length=8)


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_param_bytes_are_count_times_dtype_size(dtype, itemsize):
    e = memory.estimate(TINY, SHAPE, param_dtype=dtype, mesh_shape={"data": 4})
    assert e["num_params"] == models.count_params(TINY)
    # A data-only mesh replicates the parameters: every device holds all of them.
    assert e["params"] == models.count_params(TINY) * itemsize
    assert e["grads"] == e["params"]  # one microbatch: gradients in the parameter dtype
    assert e["param_dtype"] == dtype


def test_adamw_state_is_two_copies_of_the_params():
    e = memory.estimate(TINY, SHAPE, optimizer="adamw")
    # mu and nu mirror the params; the rest is a step count (int32 scalars).
    assert 2 * e["params"] <= e["opt_state"] <= 2 * e["params"] + 64


def test_adafactor_factored_state_is_much_smaller():
    small = models.get_config("small")
    ada = memory.estimate(small, SHAPE, optimizer="adafactor")
    adam = memory.estimate(small, SHAPE, optimizer="adamw")
    assert 0 < ada["opt_state"] < 0.01 * ada["params"]
    assert adam["opt_state"] >= 2 * adam["params"]


def test_microbatches_accumulate_float32_gradients_and_divide_activations():
    one = memory.estimate(TINY, SHAPE, param_dtype="bfloat16")
    two = memory.estimate(
        TINY, dataclasses.replace(SHAPE, num_microbatches=2), param_dtype="bfloat16"
    )
    assert two["grads"] == 2 * one["grads"]  # float32 accumulator vs bfloat16 gradients
    assert two["activations"] == pytest.approx(one["activations"] / 2, rel=1e-6)
    assert two["logits"] == pytest.approx(one["logits"] / 2, rel=1e-6)


def _leaves_by_name(config):
    shapes = models.param_shapes(config)
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}


def test_model_axis_divides_the_sharded_params():
    small = models.get_config("small")  # 6 heads: relpos tables [6, 32] stay replicated
    e = memory.estimate(small, SHAPE, mesh_shape={"data": 2, "model": 4})
    expected = 0
    for name, x in _leaves_by_name(small).items():
        n = math.prod(x.shape) * 4
        # Every matrix has one dim on `model` (vocab, mlp, joined_kv), all divisible by 4.
        sharded = x.ndim == 2 and "rel_embedding" not in name
        expected += n // 4 if sharded else n
    assert e["params"] == expected
    assert e["params"] < memory.estimate(small, SHAPE)["params"] / 3


def test_fsdp_axis_divides_the_embed_dimension():
    e = memory.estimate(TINY, SHAPE, mesh_shape={"fsdp": 8})
    full = memory.estimate(TINY, SHAPE)
    rel = sum(
        math.prod(x.shape) * 4 for n, x in _leaves_by_name(TINY).items() if "rel_embedding" in n
    )
    # Every parameter but the relative-position tables has an `embed` dim (32, divisible).
    assert e["params"] == (full["params"] - rel) // 8 + rel
    # fsdp is also a batch axis: 8 rows over 8 devices.
    assert e["rows_per_device"] == 1


def test_data_axis_divides_the_activations():
    one = memory.estimate(TINY, SHAPE)
    four = memory.estimate(TINY, SHAPE, mesh_shape={"data": 4})
    assert four["rows_per_device"] == 2
    assert four["activations"] == pytest.approx(one["activations"] / 4, rel=1e-6)
    assert four["params"] == one["params"]


def test_modes():
    train = memory.estimate(TINY, SHAPE)
    fwd = memory.estimate(TINY, SHAPE, mode="forward")
    sample = memory.estimate(
        TINY, dataclasses.replace(SHAPE, num_samples=2, full_logprobs=True), mode="sample"
    )
    assert fwd["grads"] == fwd["opt_state"] == 0 and fwd["activations"] < train["activations"]
    assert sample["rows_per_device"] == 16
    c = TINY
    cache = c.num_decoder_layers * 2 * 16 * (8 + 16) * c.inner_dim * 4  # k and v, self + cross
    assert sample["cache"] == cache
    assert sample["logits"] == 16 * 8 * c.vocab_size * 4
    for e in (train, fwd, sample):
        parts = ("params", "grads", "opt_state", "activations", "logits", "cache")
        assert e["total"] == sum(e[k] for k in parts)


def test_distill_adds_the_teacher():
    student, teacher = TINY, TINY.replace(d_model=64)
    d = memory.distill_estimate(student, teacher, SHAPE, regime="online_teacher")
    s = memory.estimate(student, SHAPE)
    t = memory.estimate(teacher, SHAPE, mode="forward")
    assert d["teacher_params"] == t["params"]
    assert d["total"] > s["total"] + t["params"]
    with pytest.raises(ValueError, match="unknown regime 'nope'"):
        memory.distill_estimate(student, teacher, SHAPE, regime="nope")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mesh_shape={"data": -1}), "size of 'data' must be an int >= 1"),
        (dict(mesh_shape={"pipe": 2}), "unknown axes"),
        (dict(mesh_shape={"data": 3}), "do not divide over the data-parallel size 3"),
        (dict(mode="decode"), "unknown mode 'decode'"),
        (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory.estimate(TINY, SHAPE, **kwargs)


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 0), ("input_length", -1), ("num_microbatches", 1.5), ("num_samples", 0)],
)
def test_bad_workload_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"Workload.{field}={value!r} must be an integer >= 1"):
        dataclasses.replace(SHAPE, **{field: value})


def test_fits_and_devices():
    e = {"total": 20 * memory.GiB}
    assert memory.fits(e, 32 * memory.GiB) and not memory.fits(e, 16 * memory.GiB)
    assert not memory.fits({"total": 31 * memory.GiB}, 32 * memory.GiB)  # 90% usable
    fit = memory.fitting_devices(e)
    assert "TPU v4" in fit and "H200" in fit and "TPU v5e" not in fit
    assert memory.DEVICES["H200"] == 141 * memory.GiB


def test_forward_flops_close_to_two_flops_per_param_per_token():
    small = models.get_config("small")
    flops = memory.forward_flops(small, 64, 64)
    # Non-embedding matmul params each see their stack's tokens: ~2 * params * tokens.
    params = models.count_params(small) - small.vocab_size * small.d_model  # input embedding
    assert 0.8 < flops / (2 * params * 64) < 1.5


def test_launch_parses_meshes():
    assert launch_memory.parse_mesh("data=4, model=2") == {"data": 4, "model": 2}
    assert launch_memory.resolve_mesh({"data": -1, "model": 2}, 16) == {"data": 8, "model": 2}
    with pytest.raises(ValueError, match="'data4'"):
        launch_memory.parse_mesh("data4")
    with pytest.raises(ValueError, match="does not divide 6 devices"):
        launch_memory.resolve_mesh({"data": -1, "model": 4}, 6)


PAPER = sorted(
    glob.glob(os.path.join(gin_registry.GIN_DIR, "experiments", "paper_*.gin"))
    + [os.path.join(gin_registry.GIN_DIR, "experiments", "gpu_small.gin")]
)


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_configs_produce_estimates(path):
    gin.clear_config()
    try:
        gin_registry.parse([os.path.relpath(path, gin_registry.GIN_DIR)])
        cfg = gin_registry.experiment_config()
    finally:
        gin.clear_config()
    mesh = launch_memory.resolve_mesh(dict(cfg.mesh_shape), 8)
    rows = launch_memory.experiment_rows(cfg, mesh, {"data": 1})
    stages = [r.stage for r in rows]
    assert stages[:2] == ["oracle data", "offline data"]
    assert sum(s.startswith("distill/") for s in stages) == len(cfg.runs)
    by_stage = {r.stage: r.estimate for r in rows}
    assert all(e["total"] > 0 for e in by_stage.values())
    # The oracle (Flan-T5-XL, float32 params) alone is ~2.85e9 params.
    assert by_stage["oracle data"]["num_params"] == pytest.approx(2.85e9, rel=0.01)
    assert by_stage["distill/offline"]["total"] > by_stage["student SFT (adamw)"]["total"]
    table = memory.table(rows)
    assert table.count("\n") == len(rows) + 1 and "GiB" in table
    assert np.isfinite([e["total"] for e in by_stage.values()]).all()


def test_decoder_only_configs_are_refused_not_misestimated():
    with pytest.raises(ValueError, match="T5 family only, not DecoderConfig"):
        memory.estimate(models.get_config("llama-tiny"), memory.Workload(2, 8, 8))

"""Tests of the regimes: the mixed source (row counts, the exact mean of the non-integer
rounding, exact resume, mesh padding invariance) and `make_source` (bad inputs)."""

import jax
import numpy as np
import pytest
from _regimes_common import (
    LX,
    LY,
    SEED,
    B,
    build_store,
    equal,
    make_prompts,
    resume_check,
    tiny_models,
)

from thack_jax.data import regimes
from thack_jax.decoding import sampling
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.parallel import partitioning


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory)


# ----------------------------------------------------------------------------- mixed


def _mixed(store, config, fraction, mesh=None):
    return regimes.make_source(
        "mixed",
        regimes.SourceConfig(batch_size=B, seed=SEED, online_fraction=fraction),
        offline_store=store,
        student_config=config,
        mesh=mesh,
    )


def _offline_rows(store):
    return {tuple(r) for r in np.concatenate([store.inputs, store.targets], axis=1)}


def test_mixed_has_the_right_online_rows(tiny, store):
    config, _, student = tiny
    source = _mixed(store, config, 0.375)  # 3 of 8 rows
    assert source.num_online(0) == 3 and "teacher_logprobs" not in source.next_batch(0, student)
    batch = source.next_batch(1, student)
    assert source.last_num_online == 3
    assert batch["inputs"].shape == (B, LX) and batch["targets"].shape == (B, LY)
    rows = np.concatenate([batch["inputs"], batch["targets"]], axis=1)
    assert all(tuple(r) in _offline_rows(store) for r in rows[3:])
    # The online rows are the student's samples of the step with its key.
    rng = jax.random.fold_in(jax.random.key(SEED), 1)
    want = sampling.sample(config, student, batch["inputs"][:3], rng, max_decode_len=LY)
    np.testing.assert_array_equal(batch["targets"][:3], np.asarray(want.tokens))
    offline_only = _mixed(store, config, 0.0).next_batch(7, student)
    rows = np.concatenate([offline_only["inputs"], offline_only["targets"]], axis=1)
    assert all(tuple(r) in _offline_rows(store) for r in rows)
    online_only = _mixed(store, config, 1.0)
    assert online_only.next_batch(7, student)["targets"].shape == (B, LY)
    assert online_only.last_num_online == B and online_only.offline.state_dict()["index"] == 0


def test_mixed_expectation_with_non_integer_fraction(tiny, store):
    config, _, student = tiny
    source = _mixed(store, config, 0.3)  # 2.4 online rows per batch of 8
    counts = np.array([source.num_online(t) for t in range(20000)])
    assert set(counts) == {2, 3}
    assert abs(counts.mean() - 2.4) < 4 * np.sqrt(0.24 / len(counts))
    assert [source.num_online(t) for t in range(50)] == list(counts[:50])  # deterministic
    for t in range(3):
        batch = source.next_batch(t, student)
        assert source.last_num_online == counts[t] and batch["targets"].shape == (B, LY)


def test_mixed_resume(tiny, store):
    config, _, student = tiny
    want = resume_check(lambda: _mixed(store, config, 0.3), steps=4, cut=2, params=student)
    assert len(want) == 4


def test_mixed_under_a_mesh_equals_without(tiny, store):
    config, _, student = tiny
    mesh = partitioning.make_mesh({"data": -1, "model": 1})
    plain, sharded = _mixed(store, config, 0.3), _mixed(store, config, 0.3, mesh=mesh)
    for t in range(2):  # 2 or 3 online rows, padded to 8 under the mesh
        equal(sharded.next_batch(t, student), plain.next_batch(t, student))
    # A whole online batch under the mesh: global arrays sharded over the data axis.
    online = [
        regimes.make_source(
            "online_student", regimes.SourceConfig(batch_size=B, seed=SEED),
            prompts=make_prompts(), student_config=config,
            sampling=SamplingConfig(max_decode_len=LY), mesh=m,
        )
        for m in (None, mesh)
    ]  # fmt: skip
    want, got = (s.next_batch(0, student) for s in online)
    equal(got, want)
    assert got["inputs"].sharding.spec[0] is not None


# ----------------------------------------------------------------------------- errors


SOURCE = regimes.SourceConfig(batch_size=B, seed=0)


def test_source_config_names_the_bad_field():
    for kw, field in (
        (dict(batch_size=0), "batch_size"),
        (dict(seed=1.5), "SourceConfig.seed"),
        (dict(num_epochs=-1), "SourceConfig.num_epochs"),
        (dict(online_fraction=float("nan")), "SourceConfig.online_fraction"),
        (dict(online_role="oracle"), "SourceConfig.online_role"),
        (dict(distill_temperature=0.0), "SourceConfig.distill_temperature"),
    ):
        with pytest.raises(ValueError, match=field):
            regimes.SourceConfig(**{"batch_size": B, "seed": 0, **kw})
    with pytest.raises(ValueError, match="source must be a SourceConfig"):
        regimes.make_source("offline", {"batch_size": B, "seed": 0})


def test_bad_inputs(tiny, store):
    config, _, _ = tiny
    with pytest.raises(ValueError, match="offline, online_teacher, online_student, mixed"):
        regimes.make_source("onilne", SOURCE, offline_store=store)
    with pytest.raises(ValueError, match="1.5"):
        _mixed(store, config, 1.5)
    with pytest.raises(ValueError, match="online_fraction"):
        _mixed(store, config, None)
    with pytest.raises(ValueError, match="needs offline_store"):
        regimes.make_source("offline", SOURCE)
    with pytest.raises(ValueError, match="teacher=\\(config, params\\)"):
        regimes.make_source("online_teacher", SOURCE, offline_store=store)
    with pytest.raises(ValueError, match="student_config"):
        regimes.make_source("online_student", SOURCE, offline_store=store)
    with pytest.raises(ValueError, match="needs prompts"):
        regimes.make_source("online_student", SOURCE, student_config=config)
    with pytest.raises(ValueError, match="only applies to regime 'mixed'"):
        regimes.make_source(
            "offline",
            regimes.SourceConfig(batch_size=B, seed=0, online_fraction=0.1),
            offline_store=store,
        )
    with pytest.raises(ValueError, match="do not match"):
        regimes.make_source(
            "mixed",
            regimes.SourceConfig(batch_size=B, seed=0, online_fraction=0.1),
            offline_store=store,
            student_config=config,
            sampling=SamplingConfig(max_decode_len=LY + 1),
        )

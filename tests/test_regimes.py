"""Tests of the data regimes: offline / online teacher / online student / mixed batch sources,
exact resume, teacher log-probs against scoring, mixing counts, and the offline store builder."""

import json

import jax
import numpy as np
import pytest

from thack_jax import models, partitioning, sampling, scoring
from thack_jax.data import regimes
from thack_jax.data.offline_store import OfflineIterator, OfflineStore, StoreMismatchError

N, C, LX, LY, B, V = 12, 2, 6, 5, 8, 32
SEED = 3


def _prompts(n=N, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.integers(3, V, (n, LX)).astype(np.int32)
    p[:, -1] = 1  # EOS
    p[: n // 2, -2:] = [1, 0]  # some shorter prompts: EOS then pad
    return p


@pytest.fixture(scope="module")
def tiny():
    config = models.get_config("tiny", vocab_size=V)
    init = jax.jit(models.init_params, static_argnums=0)  # eager init is slow on a busy CPU
    teacher, student = init(config, jax.random.key(0)), init(config, jax.random.key(1))
    return config, teacher, student


def _build(directory, config, params, **kw):
    args = dict(
        generating_model="teacher",
        config=config,
        params=params,
        prompts=_prompts(),
        completions_per_prompt=C,
        max_decode_len=LY,
        seed=SEED,
        vocab_fingerprint="test-vocab",
        chunk_size=5,
        progress=False,
    )
    args.update(kw)
    return regimes.build_offline_store(str(directory), **args)


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    config, teacher, _ = tiny
    return _build(tmp_path_factory.mktemp("store") / "s", config, teacher)


def _equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _resume_check(make, steps=4, cut=2, params=None):
    """Batch `cut` after load_state_dict equals the uninterrupted source's batch `cut`."""
    reference = make()
    want = [reference.next_batch(t, params) for t in range(steps)]
    first = make()
    for t in range(cut):
        first.next_batch(t, params)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip
    second = make()
    second.load_state_dict(state)
    for t in range(cut, steps):
        _equal(second.next_batch(t, params), want[t])
    return want


# ----------------------------------------------------------------------------- offline


def test_build_store_layout_and_determinism(tiny, store):
    config, teacher, _ = tiny
    assert store.is_complete and store.targets.shape == (N * C, LY)
    np.testing.assert_array_equal(store.prompts, _prompts())
    # Chunk 0 (prompts 0..4) is sampled with fold_in(key(seed), 0), prompt-major rows.
    rng = jax.random.fold_in(jax.random.key(SEED), 0)
    out = sampling.sample(config, teacher, _prompts()[:5], rng, num_samples=C, max_decode_len=LY)
    np.testing.assert_array_equal(store.targets[: 5 * C], np.asarray(out.tokens))
    assert store.spec.generating_model.startswith("teacher|params=")
    assert regimes.params_fingerprint(teacher) in store.spec.generating_model
    assert len(np.unique(np.asarray(store.targets), axis=0)) > N  # completions vary


def test_build_store_resume_after_interruption(tiny, store, tmp_path):
    config, teacher, _ = tiny

    class Killed(Exception):
        pass

    def kill_after_first(p):
        if p["chunk"] == 1:
            raise Killed

    with pytest.raises(Killed):
        _build(tmp_path / "r", config, teacher, progress=kill_after_first)
    partial = OfflineStore.open(str(tmp_path / "r"))
    assert partial.chunks_done == 1 and not partial.is_complete
    seen = []
    resumed = _build(tmp_path / "r", config, teacher, progress=seen.append)
    assert [p["chunk"] for p in seen] == [2, 3]  # only the missing chunks were generated
    assert {"chunks_per_s", "eta_s"} <= set(seen[0])
    np.testing.assert_array_equal(resumed.targets, store.targets)
    np.testing.assert_array_equal(resumed.inputs, store.inputs)


def test_store_of_another_model_is_refused(tiny, store):
    config, teacher, student = tiny
    fp = regimes.params_fingerprint
    assert fp(teacher) == fp(jax.tree.map(np.array, teacher)) != fp(student)
    with pytest.raises(StoreMismatchError, match="generating_model"):
        _build(store.directory, config, student)
    with pytest.raises(StoreMismatchError, match="generating_model"):
        _build(store.directory, config, teacher, temperature=0.5)
    assert _build(store.directory, config, teacher).is_complete  # same model: reopened


def test_offline_source_iterates_and_reshuffles(store):
    source = regimes.OfflineSource(store, B, seed=5, num_epochs=2)
    iterator = OfflineIterator(store, B, seed=5, num_epochs=2)
    batches = []
    for t in range(6):  # 24 rows / 8 = 3 batches per epoch
        batch = source.next_batch(t, None)
        _equal(batch, next(iterator))  # B divides the rows: same order as OfflineIterator
        batches.append(batch)
    with pytest.raises(StopIteration):
        source.next_batch(6, None)
    rows = {tuple(r) for r in np.concatenate([store.inputs, store.targets], axis=1)}
    epochs = [
        np.concatenate([np.concatenate([b["inputs"], b["targets"]], 1) for b in bs])
        for bs in (batches[:3], batches[3:])
    ]
    for e in epochs:
        assert {tuple(r) for r in e} == rows and len(e) == N * C  # every row once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_offline_source_straddles_epochs(store):
    source = regimes.OfflineSource(store, 7, seed=5)
    got = np.concatenate([source.next_batch(t)["targets"] for t in range(6)])  # 42 rows
    perm = [np.random.default_rng([5, e]).permutation(N * C) for e in (0, 1)]
    np.testing.assert_array_equal(got, np.asarray(store.targets)[np.concatenate(perm)[:42]])
    assert source.state_dict() == {"epoch": 1, "index": 42 - N * C}


def test_offline_source_resume(store):
    _resume_check(lambda: regimes.OfflineSource(store, 5, seed=1), steps=8, cut=5)


def test_prompt_pool_epochs_and_resume():
    prompts = _prompts(10)
    pool = regimes.PromptPool(prompts, 4, seed=2)
    drawn = np.concatenate([pool.next_prompts() for _ in range(5)])  # 2 epochs of 10
    for e in (drawn[:10], drawn[10:]):
        np.testing.assert_array_equal(np.sort(e, axis=0), np.sort(prompts, axis=0))
    assert not np.array_equal(drawn[:10], drawn[10:])
    state = pool.state_dict()
    after = pool.next_prompts()
    again = regimes.PromptPool(prompts, 4, seed=2)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.next_prompts(), after)


# ----------------------------------------------------------------------------- online


def _response_mask(targets):
    """Positions up to and including the first EOS (the sampler's positional mask)."""
    eos_before = np.cumsum(targets == 1, axis=1) - (targets == 1)
    return eos_before == 0


def test_online_teacher_logprobs_match_score(tiny):
    config, teacher, _ = tiny
    source = regimes.make_source(
        "online_teacher",
        batch_size=B,
        seed=SEED,
        prompts=_prompts(),
        teacher=(config, teacher),
        max_decode_len=LY,
    )
    batch = source.next_batch(0, None)
    assert batch["targets"].shape == (B, LY) and batch["teacher_logprobs"].shape == (B, LY, V)
    targets = np.asarray(batch["targets"])
    scores = jax.jit(scoring.score, static_argnums=0)(config, teacher, batch["inputs"], targets)
    mask = _response_mask(targets)
    got, want = np.asarray(batch["teacher_logprobs"]), np.asarray(scores.full_logprobs)
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-5)
    assert np.all(got[~mask] == 0)
    # The key depends on the step only: other steps give other samples.
    assert not np.array_equal(np.asarray(source.next_batch(1, None)["targets"]), targets)


def test_online_teacher_resume(tiny):
    config, teacher, _ = tiny
    make = lambda: regimes.make_source(
        "online_teacher",
        batch_size=B,
        seed=SEED,
        prompts=_prompts(5),
        teacher=(config, teacher),
        max_decode_len=LY,
    )
    _resume_check(make, steps=3, cut=2)


def test_online_student_uses_passed_params(tiny):
    config, teacher, student = tiny
    make = lambda: regimes.make_source(
        "online_student",
        batch_size=B,
        seed=SEED,
        prompts=_prompts(),
        student_config=config,
        max_decode_len=LY,
    )
    batch = make().next_batch(0, student)
    assert "teacher_logprobs" not in batch
    # Exactly the sampler under the given params, with the step's key.
    rng = jax.random.fold_in(jax.random.key(SEED), 0)
    want = sampling.sample(config, student, batch["inputs"], rng, max_decode_len=LY)
    np.testing.assert_array_equal(np.asarray(batch["targets"]), np.asarray(want.tokens))
    # Other params (same prompts, same key): other samples.
    other = make().next_batch(0, teacher)
    np.testing.assert_array_equal(other["inputs"], batch["inputs"])
    assert not np.array_equal(np.asarray(other["targets"]), np.asarray(batch["targets"]))
    _resume_check(make, steps=3, cut=1, params=student)
    with pytest.raises(ValueError, match="student_params"):
        make().next_batch(0, None)


# ----------------------------------------------------------------------------- mixed


def _mixed(store, config, fraction, mesh=None):
    return regimes.make_source(
        "mixed",
        batch_size=B,
        seed=SEED,
        offline_store=store,
        student_config=config,
        online_fraction=fraction,
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
    want = _resume_check(lambda: _mixed(store, config, 0.3), steps=4, cut=2, params=student)
    assert len(want) == 4


def test_mixed_under_a_mesh_equals_without(tiny, store):
    config, _, student = tiny
    mesh = partitioning.make_mesh({"data": -1, "model": 1})
    plain, sharded = _mixed(store, config, 0.3), _mixed(store, config, 0.3, mesh=mesh)
    for t in range(2):  # 2 or 3 online rows, padded to 8 under the mesh
        _equal(sharded.next_batch(t, student), plain.next_batch(t, student))
    # A whole online batch under the mesh: global arrays sharded over the data axis.
    online = [
        regimes.make_source(
            "online_student", batch_size=B, seed=SEED, prompts=_prompts(),
            student_config=config, max_decode_len=LY, mesh=m,
        )
        for m in (None, mesh)
    ]  # fmt: skip
    want, got = (s.next_batch(0, student) for s in online)
    _equal(got, want)
    assert got["inputs"].sharding.spec[0] is not None


# ----------------------------------------------------------------------------- errors


def test_bad_inputs(tiny, store):
    config, teacher, _ = tiny
    with pytest.raises(ValueError, match="offline, online_teacher, online_student, mixed"):
        regimes.make_source("onilne", batch_size=B, seed=0, offline_store=store)
    with pytest.raises(ValueError, match="1.5"):
        _mixed(store, config, 1.5)
    with pytest.raises(ValueError, match="online_fraction"):
        _mixed(store, config, None)
    with pytest.raises(ValueError, match="needs offline_store"):
        regimes.make_source("offline", batch_size=B, seed=0)
    with pytest.raises(ValueError, match="teacher=\\(config, params\\)"):
        regimes.make_source("online_teacher", batch_size=B, seed=0, offline_store=store)
    with pytest.raises(ValueError, match="student_config"):
        regimes.make_source("online_student", batch_size=B, seed=0, offline_store=store)
    with pytest.raises(ValueError, match="needs prompts"):
        regimes.make_source("online_student", batch_size=B, seed=0, student_config=config)
    with pytest.raises(ValueError, match="only applies to regime 'mixed'"):
        regimes.make_source(
            "offline", batch_size=B, seed=0, offline_store=store, online_fraction=0.1
        )
    pool = regimes.PromptPool(_prompts(), B, 0)
    with pytest.raises(ValueError, match="temperature"):
        regimes.OnlineSource(
            "teacher", pool, config, teacher, LY, 0, temperature=0.7, provide_teacher_logprobs=True
        )
    with pytest.raises(ValueError, match="params=None"):
        regimes.OnlineSource("student", pool, config, teacher, LY, 0)
    with pytest.raises(ValueError, match="max_decode_len"):
        regimes.OnlineSource("teacher", pool, config, teacher, 10_000, 0)
    with pytest.raises(ValueError, match="do not match"):
        regimes.make_source(
            "mixed",
            batch_size=B,
            seed=0,
            offline_store=store,
            student_config=config,
            online_fraction=0.1,
            max_decode_len=LY + 1,
        )

"""Tests of the model-completion sources: the offline store builder (layout, per-chunk
determinism, resume after a kill, refusal of another model or temperature) and the online
sources (teacher log-probs against scoring, the student's passed params, exact resume)."""

import shutil

import jax
import numpy as np
import pytest
from _fake_gcs import memory_bucket_fixture  # noqa: F401
from _regimes_common import (
    LY,
    SEED,
    B,
    C,
    N,
    V,
    build,
    build_store,
    make_prompts,
    resume_check,
    tiny_models,
)

from thack_jax.core import storage
from thack_jax.data import generation, regimes
from thack_jax.data.offline_store import OfflineStore, StoreIntegrityError, StoreMismatchError
from thack_jax.data.row_streams import PromptPool
from thack_jax.decoding import sampling, scoring
from thack_jax.decoding.settings import SamplingConfig


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory)


# ----------------------------------------------------------------------------- offline


def test_build_store_layout_and_determinism(tiny, store):
    config, teacher, _ = tiny
    assert store.is_complete and store.targets.shape == (N * C, LY)
    np.testing.assert_array_equal(store.prompts, make_prompts())
    # Chunk 0 (prompts 0..4) is sampled with fold_in(key(seed), 0), prompt-major rows.
    rng = jax.random.fold_in(jax.random.key(SEED), 0)
    out = sampling.sample(
        config, teacher, make_prompts()[:5], rng, num_samples=C, max_decode_len=LY
    )
    np.testing.assert_array_equal(store.targets[: 5 * C], np.asarray(out.tokens))
    assert store.spec.generating_model.startswith("teacher|params=")
    assert generation.params_fingerprint(teacher) in store.spec.generating_model
    assert len(np.unique(np.asarray(store.targets), axis=0)) > N  # completions vary


def test_build_store_resume_after_interruption(tiny, store, tmp_path):
    config, teacher, _ = tiny

    class Killed(Exception):
        pass

    def kill_after_first(p):
        if p["chunk"] == 1:
            raise Killed

    with pytest.raises(Killed):
        build(tmp_path / "r", config, teacher, progress=kill_after_first)
    partial = OfflineStore.open(str(tmp_path / "r"))
    assert partial.chunks_done == 1 and not partial.is_complete
    seen = []
    resumed = build(tmp_path / "r", config, teacher, progress=seen.append)
    assert [p["chunk"] for p in seen] == [2, 3]  # only the missing chunks were generated
    assert {"chunks_per_s", "eta_s"} <= set(seen[0])
    np.testing.assert_array_equal(resumed.targets, store.targets)
    np.testing.assert_array_equal(resumed.inputs, store.inputs)


def test_store_of_another_model_is_refused(tiny, store):
    config, teacher, student = tiny
    fp = generation.params_fingerprint
    assert fp(teacher) == fp(jax.tree.map(np.array, teacher)) != fp(student)
    with pytest.raises(StoreMismatchError, match="generating_model"):
        build(store.directory, config, student)
    with pytest.raises(StoreMismatchError, match="generating_model"):
        build(store.directory, config, teacher, temperature=0.5)
    assert build(store.directory, config, teacher).is_complete  # same model: reopened


def test_tampered_store_is_refused(tiny, store, tmp_path):
    """The regimes' path (build_offline_store on a complete store) verifies the checksums."""
    config, teacher, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(store.directory, copy)
    targets = np.load(copy / "targets.npy", mmap_mode="r+")
    targets[3] = (targets[3] + 1) % V
    targets.flush()
    del targets
    with pytest.raises(StoreIntegrityError, match=r"copy/targets\.npy: the targets array"):
        build(copy, config, teacher)


def test_build_store_in_a_bucket(tiny, store, memory_bucket):
    config, teacher, _ = tiny
    remote = build(f"{memory_bucket}/run/offline_data", config, teacher)
    assert storage.listdir(remote.directory) == ["inputs.npy", "manifest.json", "targets.npy"]
    for name in ("inputs.npy", "targets.npy", "manifest.json"):
        got = storage.read_bytes(storage.join(remote.directory, name))
        assert got == storage.read_bytes(storage.join(store.directory, name)), name


def test_every_process_waits_for_the_writer_whether_it_filled_or_found_the_store(
    tiny, memory_bucket, monkeypatch
):
    """A non-writer that goes on while process 0 still finishes a remote store (whole
    arrays, manifest, chunk objects deleted) reads deleted chunk objects: the two-process
    bucket test failed that way under load. Both paths out of the builder pass the
    barrier (a process that arrives late finds the store complete)."""
    config, teacher, _ = tiny
    names = []
    monkeypatch.setattr(generation.distributed, "barrier", names.append)
    directory = f"{memory_bucket}/run/offline_data"
    filled = build(directory, config, teacher)  # (the per-chunk stop checks barrier too)
    assert filled.is_complete and names[-1] == "offline_store_filled"
    assert names.count("offline_store_filled") == 1
    assert build(directory, config, teacher).is_complete  # found complete
    assert names.count("offline_store_filled") == 2 and names[-1] == "offline_store_filled"


# ----------------------------------------------------------------------------- online


def _response_mask(targets):
    """Positions up to and including the first EOS (the sampler's positional mask)."""
    eos_before = np.cumsum(targets == 1, axis=1) - (targets == 1)
    return eos_before == 0


def test_online_teacher_logprobs_match_score(tiny):
    config, teacher, _ = tiny
    source = regimes.make_source(
        "online_teacher",
        regimes.SourceConfig(batch_size=B, seed=SEED),
        prompts=make_prompts(),
        teacher=(config, teacher),
        sampling=SamplingConfig(max_decode_len=LY),
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
        regimes.SourceConfig(batch_size=B, seed=SEED),
        prompts=make_prompts(5),
        teacher=(config, teacher),
        sampling=SamplingConfig(max_decode_len=LY),
    )
    resume_check(make, steps=3, cut=2)


def test_online_student_uses_passed_params(tiny):
    config, teacher, student = tiny
    make = lambda: regimes.make_source(
        "online_student",
        regimes.SourceConfig(batch_size=B, seed=SEED),
        prompts=make_prompts(),
        student_config=config,
        sampling=SamplingConfig(max_decode_len=LY),
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
    resume_check(make, steps=3, cut=1, params=student)
    with pytest.raises(ValueError, match="student_params"):
        make().next_batch(0, None)


# ----------------------------------------------------------------------------- errors


def test_online_source_bad_inputs(tiny):
    config, teacher, _ = tiny
    pool = PromptPool(make_prompts(), B, 0)
    tempered = SamplingConfig(max_decode_len=LY, temperature=0.7)
    # The sampler's log-probs are the step's targets only at the same temperature, untruncated.
    for settings, target_t in ((tempered, 1.0), (SamplingConfig(max_decode_len=LY), 0.7)):
        with pytest.raises(ValueError, match="targets_temperature"):
            generation.OnlineSource(
                "teacher", pool, config, teacher, settings, 0, targets_temperature=target_t
            )
    top_k = SamplingConfig(max_decode_len=LY, top_k=4)
    with pytest.raises(ValueError, match="without top-k"):
        generation.OnlineSource("teacher", pool, config, teacher, top_k, 0, targets_temperature=1)
    with pytest.raises(ValueError, match="targets_temperature needs role='teacher'"):
        generation.OnlineSource(
            "student", pool, config, None, SamplingConfig(max_decode_len=LY), 0,
            targets_temperature=1.0,
        )  # fmt: skip
    ok = generation.OnlineSource("teacher", pool, config, teacher, tempered, 0,
                                 targets_temperature=0.7)  # fmt: skip
    assert ok.provide_teacher_logprobs and ok.max_decode_len == LY
    with pytest.raises(ValueError, match="params=None"):
        generation.OnlineSource(
            "student", pool, config, teacher, SamplingConfig(max_decode_len=LY), 0
        )
    with pytest.raises(ValueError, match="max_decode_len"):
        generation.OnlineSource(
            "teacher", pool, config, teacher, SamplingConfig(max_decode_len=10_000), 0
        )
    with pytest.raises(ValueError, match="num_samples=1"):
        generation.OnlineSource(
            "teacher", pool, config, teacher, SamplingConfig(max_decode_len=LY, num_samples=2), 0
        )
    with pytest.raises(ValueError, match="SamplingConfig"):
        generation.OnlineSource("teacher", pool, config, teacher, LY, 0)


def test_generation_config_names_the_bad_field():
    good = dict(
        generating_model="teacher",
        completions_per_prompt=C,
        max_decode_len=LY,
        seed=SEED,
        vocab_fingerprint="v",
    )
    for kw, field in (
        (dict(generating_model=""), "generating_model"),
        (dict(completions_per_prompt=0), "completions_per_prompt"),
        (dict(max_decode_len=True), "max_decode_len"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(seed="1"), "seed"),
        (dict(temperature=-1.0), "temperature"),
    ):
        with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
            generation.GenerationConfig(**{**good, **kw})
    settings = generation.GenerationConfig(**good, temperature=0.5).sampling()
    assert (settings.num_samples, settings.max_decode_len, settings.temperature) == (C, LY, 0.5)

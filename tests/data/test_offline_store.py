"""Tests of the offline store (numpy only): round trip, resume, mismatch, iterator."""

import json
import os

import numpy as np
import pytest

from thack_jax.data.offline_store import (
    OfflineIterator,
    OfflineSpec,
    OfflineStore,
    StoreIntegrityError,
    StoreMismatchError,
    prompts_checksum,
)

N, C, LX, LY = 10, 3, 5, 4


def _prompts():
    return np.arange(N * LX, dtype=np.int32).reshape(N, LX) % 50 + 3


def _spec(**overrides):
    kw = dict(
        num_prompts=N,
        completions_per_prompt=C,
        max_input_length=LX,
        max_target_length=LY,
        vocab_fingerprint="synthetic-abc",
        generating_model="teacher-1234",
        seed=0,
        prompts_checksum=prompts_checksum(_prompts()),
    )
    kw.update(overrides)
    return OfflineSpec(**kw)


def _generate(prompts, chunk_index):
    """Deterministic fake generator: completion j of prompt p depends on (p, j, chunk)."""
    b = prompts.shape[0]
    out = np.zeros((b * C, LY), np.int32)
    for i in range(b):
        for j in range(C):
            out[i * C + j] = (prompts[i, :LY] + 7 * j + chunk_index) % 60
    return out


def _silent(_):
    pass


def test_round_trip(tmp_path):
    d = str(tmp_path / "store")
    store = OfflineStore.create_or_open(d, _spec(), _prompts())
    assert not store.is_complete and store.chunks_done == 0
    store.fill(_generate, chunk_size=4, progress=_silent)
    assert store.is_complete and store.chunks_done == 3
    reopened = OfflineStore.open(d, verify_checksums=True)
    assert reopened.spec == _spec()
    np.testing.assert_array_equal(reopened.prompts, _prompts())
    np.testing.assert_array_equal(reopened.inputs, np.repeat(_prompts(), C, axis=0))
    # Prompt-major rows: completion j of prompt i is row i * C + j.
    expected = np.concatenate([_generate(_prompts()[k : k + 4], k // 4) for k in (0, 4, 8)])
    np.testing.assert_array_equal(reopened.targets, expected)
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    assert manifest["complete"] and set(manifest["checksums"]) == {"inputs", "targets"}
    assert manifest["arrays"]["targets"] == {"shape": [N * C, LY], "dtype": "int32"}
    assert OfflineSpec.from_dict(json.loads(json.dumps(_spec().to_dict()))) == _spec()
    # create_or_open of a complete store with the same spec reuses it.
    again = OfflineStore.create_or_open(d, _spec())
    np.testing.assert_array_equal(again.targets, expected)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    full = OfflineStore.create_or_open(str(tmp_path / "a"), _spec(), _prompts())
    full.fill(_generate, chunk_size=3, progress=_silent)

    calls = []

    def failing(prompts, k):
        calls.append(k)
        if k == 2:
            raise KeyboardInterrupt("simulated kill")
        return _generate(prompts, k)

    d = str(tmp_path / "b")
    store = OfflineStore.create_or_open(d, _spec(), _prompts())
    with pytest.raises(KeyboardInterrupt):
        store.fill(failing, chunk_size=3, progress=_silent)
    assert json.load(open(os.path.join(d, "manifest.json")))["chunks_done"] == 2
    calls.clear()
    resumed = OfflineStore.create_or_open(d, _spec(), _prompts())
    assert resumed.chunks_done == 2 and not resumed.is_complete
    with pytest.raises(StoreMismatchError, match="chunk_size: stored 3 vs requested 5"):
        resumed.fill(_generate, chunk_size=5, progress=_silent)
    seen = []

    def recording(prompts, k):
        seen.append(k)
        return _generate(prompts, k)

    resumed.fill(recording, chunk_size=3, progress=_silent)
    assert seen == [2, 3]  # only the unfinished chunks
    np.testing.assert_array_equal(resumed.targets, full.targets)
    assert (
        json.load(open(os.path.join(d, "manifest.json")))["checksums"]
        == (full.manifest["checksums"])
    )


def test_mismatch_is_refused_naming_fields(tmp_path):
    d = str(tmp_path / "store")
    OfflineStore.create_or_open(d, _spec(), _prompts())
    with pytest.raises(StoreMismatchError) as e:
        OfflineStore.create_or_open(d, _spec(generating_model="teacher-9999", seed=1))
    msg = str(e.value)
    assert "generating_model: stored 'teacher-1234' vs requested 'teacher-9999'" in msg
    assert "seed: stored 0 vs requested 1" in msg
    assert "num_prompts" not in msg
    with pytest.raises(StoreMismatchError, match="prompts_checksum"):
        OfflineStore.create_or_open(d, _spec(), _prompts() + 1)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="num_prompts"):
        _spec(num_prompts=0)
    with pytest.raises(ValueError, match="needs prompts"):
        OfflineStore.create_or_open(str(tmp_path / "x"), _spec())
    with pytest.raises(ValueError, match=r"prompts must be integer \(10, 5\)"):
        OfflineStore.create_or_open(str(tmp_path / "x"), _spec(), _prompts()[:3])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        OfflineStore.create_or_open(str(other), _spec(), _prompts())
    store = OfflineStore.create_or_open(str(tmp_path / "y"), _spec(), _prompts())
    with pytest.raises(ValueError, match=r"chunk 0, expected integer \(12, 4\)"):
        store.fill(lambda p, k: np.zeros((1, LY), np.int32), chunk_size=4, progress=_silent)
    with pytest.raises(ValueError, match="not complete"):
        OfflineIterator(store, batch_size=2, seed=0)


def test_checksum_detects_tampering(tmp_path):
    d = str(tmp_path / "store")
    OfflineStore.create_or_open(d, _spec(), _prompts()).fill(_generate, 5, progress=_silent)
    t = np.load(os.path.join(d, "targets.npy"), mmap_mode="r+", allow_pickle=False)
    t[0, 0] += 1
    t.flush()
    del t
    OfflineStore.open(d, verify_checksums=False)  # shapes only
    with pytest.raises(StoreIntegrityError, match="targets.npy: the targets array's sha256"):
        OfflineStore.open(d, verify_checksums=True)


def test_progress_callback(tmp_path):
    store = OfflineStore.create_or_open(str(tmp_path / "s"), _spec(), _prompts())
    reports = []
    store.fill(_generate, chunk_size=4, progress=reports.append)
    assert [r["chunk"] for r in reports] == [1, 2, 3]
    assert all(r["num_chunks"] == 3 and r["chunks_per_s"] > 0 for r in reports)
    assert reports[-1]["eta_s"] == 0


@pytest.fixture
def full_store(tmp_path):
    store = OfflineStore.create_or_open(str(tmp_path / "s"), _spec(), _prompts())
    store.fill(_generate, chunk_size=4, progress=_silent)
    return store


def _rows(batch):
    return [tuple(i) + tuple(t) for i, t in zip(batch["inputs"], batch["targets"], strict=True)]


def test_iterator_epochs_determinism_and_exhaustion(full_store):
    it = OfflineIterator(full_store, batch_size=7, seed=3, num_epochs=2)
    batches = list(it)
    assert len(batches) == 2 * (N * C // 7) and it.exhausted
    assert all(b["inputs"].shape == (7, LX) and b["targets"].shape == (7, LY) for b in batches)
    assert all(b["inputs"].dtype == np.int32 for b in batches)
    # Rows stay aligned: the batch row is a real (prompt, completion) row of the store.
    store_rows = set(_rows({"inputs": full_store.inputs, "targets": full_store.targets}))
    assert all(set(_rows(b)) <= store_rows for b in batches)
    per_epoch = N * C // 7
    epoch0 = [r for b in batches[:per_epoch] for r in _rows(b)]
    epoch1 = [r for b in batches[per_epoch:] for r in _rows(b)]
    assert len(set(epoch0)) == len(epoch0) == per_epoch * 7  # no repeats within an epoch
    assert epoch0 != epoch1  # reshuffled each epoch
    again = list(OfflineIterator(full_store, batch_size=7, seed=3, num_epochs=2))
    assert all(_rows(a) == _rows(b) for a, b in zip(batches, again, strict=True))
    other = next(OfflineIterator(full_store, batch_size=7, seed=4))
    assert _rows(other) != _rows(batches[0])
    with pytest.raises(StopIteration):
        next(it)


def test_iterator_exact_resume(full_store):
    ref = list(OfflineIterator(full_store, batch_size=4, seed=1, num_epochs=3))
    it = OfflineIterator(full_store, batch_size=4, seed=1, num_epochs=3)
    for _ in range(9):  # crosses the epoch boundary (7 batches per epoch)
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    assert state == {"epoch": 1, "index": 2}
    resumed = OfflineIterator(full_store, batch_size=4, seed=1, num_epochs=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(ref) - 9
    assert all(_rows(a) == _rows(b) for a, b in zip(ref[9:], rest, strict=True))
    with pytest.raises(ValueError, match="out of range"):
        resumed.load_state_dict({"epoch": 0, "index": 99})


def test_iterator_infinite_epochs(full_store):
    it = OfflineIterator(full_store, batch_size=10, seed=0, num_epochs=None)
    for _ in range(20):
        next(it)
    assert it.state_dict() == {"epoch": 6, "index": 2} and not it.exhausted

"""Tests of the row sources: row streams, the prompt pool and the offline source (order equal
to OfflineIterator's, reshuffled epochs, epochs straddled, exhaustion, exact resume)."""

import numpy as np
import pytest
from _regimes_common import B, C, N, build_store, equal, make_prompts, resume_check

from thack_jax.data import row_streams
from thack_jax.data.offline_store import OfflineIterator


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory)


def test_row_stream_straddles_epochs_and_stops():
    stream = row_streams.RowStream(5, seed=4, salt=(row_streams.POOL_SALT,), num_epochs=2)
    got = np.concatenate([stream.take(3) for _ in range(3)])  # 9 of the 10 rows
    perm = [np.random.default_rng([4, e, row_streams.POOL_SALT]).permutation(5) for e in (0, 1)]
    np.testing.assert_array_equal(got, np.concatenate(perm)[:9])
    with pytest.raises(StopIteration):
        stream.take(2)
    assert stream.state_dict() == {"epoch": 1, "index": 4}  # unchanged by the refused draw
    with pytest.raises(ValueError, match="out of range"):
        stream.load_state_dict({"epoch": 0, "index": 6})


def test_offline_source_iterates_and_reshuffles(store):
    source = row_streams.OfflineSource(store, B, seed=5, num_epochs=2)
    iterator = OfflineIterator(store, B, seed=5, num_epochs=2)
    batches = []
    for t in range(6):  # 24 rows / 8 = 3 batches per epoch
        batch = source.next_batch(t, None)
        equal(batch, next(iterator))  # B divides the rows: same order as OfflineIterator
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
    source = row_streams.OfflineSource(store, 7, seed=5)
    got = np.concatenate([source.next_batch(t)["targets"] for t in range(6)])  # 42 rows
    perm = [np.random.default_rng([5, e]).permutation(N * C) for e in (0, 1)]
    np.testing.assert_array_equal(got, np.asarray(store.targets)[np.concatenate(perm)[:42]])
    assert source.state_dict() == {"epoch": 1, "index": 42 - N * C}


def test_offline_source_resume(store):
    resume_check(lambda: row_streams.OfflineSource(store, 5, seed=1), steps=8, cut=5)


def test_prompt_pool_epochs_and_resume():
    prompts = make_prompts(10)
    pool = row_streams.PromptPool(prompts, 4, seed=2)
    drawn = np.concatenate([pool.next_prompts() for _ in range(5)])  # 2 epochs of 10
    for e in (drawn[:10], drawn[10:]):
        np.testing.assert_array_equal(np.sort(e, axis=0), np.sort(prompts, axis=0))
    assert not np.array_equal(drawn[:10], drawn[10:])
    state = pool.state_dict()
    after = pool.next_prompts()
    again = row_streams.PromptPool(prompts, 4, seed=2)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.next_prompts(), after)

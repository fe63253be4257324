"""Tests of the reference store: the task's own (inputs, references) as an offline store
with one completion per prompt; round trip, reopen, refusal of another spec or other
references, resume after SIGTERM between chunks, a gs:// directory."""

import os
import signal

import numpy as np
import pytest

from thack_jax.core import interrupt, storage
from thack_jax.data import references, synthetic
from thack_jax.data.offline_store import OfflineStore, StoreMismatchError

N, LX, LY = 11, 14, 8


def _examples(seed=0):
    inputs = synthetic.synthetic_prompts(N, seed=seed, max_length=LX)
    return inputs, synthetic.synthetic_references(inputs, seed=seed, max_length=LY)


def _build(directory, inputs, targets, **kw):
    args = dict(vocab_fingerprint="synthetic:64", source="synthetic", seed=0, chunk_size=4)
    return references.build_reference_store(
        directory, inputs=inputs, targets=targets, **{**args, **kw}
    )


def _sigterm_after_first_chunk(p):
    if p["chunk"] == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: only sets the stop flag


def _interrupted_build(directory, inputs, targets):
    """A build stopped by SIGTERM after its first chunk; the flag is cleared again (as in
    the rerun's process: the next `interrupt.handling()` block starts without it)."""
    with interrupt.handling():
        with pytest.raises(interrupt.Interrupted, match="reference store .* at chunk 1"):
            _build(directory, inputs, targets, progress=_sigterm_after_first_chunk)
    with interrupt.handling():
        assert interrupt.requested() is None


def _check_round_trip_and_resume(directory):
    inputs, targets = _examples()
    _interrupted_build(directory, inputs, targets)
    partial = OfflineStore.open(directory)
    assert partial.chunks_done == 1 and not partial.is_complete
    store = _build(directory, inputs, targets)
    assert store.is_complete and store.manifest["num_chunks"] == 3
    opened = OfflineStore.open(directory)  # verifies the checksums
    np.testing.assert_array_equal(opened.inputs, inputs)
    np.testing.assert_array_equal(opened.targets, targets)
    np.testing.assert_array_equal(opened.prompts, inputs)
    spec = opened.spec
    assert spec.generating_model == "references:synthetic" and spec.completions_per_prompt == 1
    assert (spec.num_prompts, spec.max_input_length, spec.max_target_length) == (N, LX, LY)
    return store


def test_round_trip_resume_and_reopen(tmp_path):
    d = str(tmp_path / "refs")
    _check_round_trip_and_resume(d)
    before = os.path.getmtime(os.path.join(d, "manifest.json"))
    inputs, targets = _examples()
    again = _build(d, inputs, targets)  # reopened, not rewritten
    assert again.is_complete and os.path.getmtime(os.path.join(d, "manifest.json")) == before
    assert not again.targets.flags.writeable


def test_another_spec_or_other_references_are_refused(tmp_path):
    d = str(tmp_path / "refs")
    inputs, targets = _examples()
    _build(d, inputs, targets)
    with pytest.raises(StoreMismatchError, match="generating_model: stored 'references:synthetic'"):
        _build(d, inputs, targets, source="xsum")
    with pytest.raises(StoreMismatchError, match="seed: stored 0 vs requested 1"):
        _build(d, inputs, targets, seed=1)
    with pytest.raises(StoreMismatchError, match="prompts_checksum"):
        _build(d, *_examples(seed=3))
    other = targets.copy()
    other[5, :2] = targets[5, 1::-1]  # a determiner and the next word swapped
    with pytest.raises(
        StoreMismatchError, match="other references .*1 of its 11 rows differ, first row 5"
    ):
        _build(d, inputs, other)


def test_a_partial_store_of_other_references_is_refused(tmp_path):
    d = str(tmp_path / "refs")
    inputs, targets = _examples()
    _interrupted_build(d, inputs, targets)
    other = targets.copy()
    other[2, 0] = other[2, 1]  # inside the finished first chunk (rows 0-3)
    with pytest.raises(StoreMismatchError, match="1 of its 4 rows differ, first row 2"):
        _build(d, inputs, other)
    other = targets.copy()
    other[9, 0] = other[9, 1]  # not written yet: the resume writes the given row
    np.testing.assert_array_equal(_build(d, inputs, other).targets, other)


def test_bad_arrays_are_named(tmp_path):
    inputs, targets = _examples()
    d = str(tmp_path / "refs")
    no_eos = targets.copy()
    no_eos[3] = 5
    with pytest.raises(ValueError, match=r"targets row 3 has no EOS \(1\)"):
        _build(d, inputs, no_eos)
    with pytest.raises(ValueError, match="differ in rows"):
        _build(d, inputs, targets[:5])
    with pytest.raises(ValueError, match="reference inputs must be a non-empty integer"):
        _build(d, inputs.astype(np.float32), targets)
    with pytest.raises(ValueError, match="source"):
        _build(d, inputs, targets, source="")
    with pytest.raises(ValueError, match="chunk_size"):
        _build(d, inputs, targets, chunk_size=0)
    assert not os.path.exists(d)  # nothing written for a refused call


def test_gcs_round_trip_resume_and_reopen(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local folder 'gs:' would show an os.path bug
    d = f"{gcs_bucket}/wd/reference_data"
    store = _check_round_trip_and_resume(d)
    assert store.remote
    assert storage.listdir(d) == ["inputs.npy", "manifest.json", "targets.npy"]  # no chunks/
    inputs, targets = _examples()
    assert _build(d, inputs, targets).is_complete
    with pytest.raises(StoreMismatchError, match="generating_model"):
        _build(d, inputs, targets, source="wmt14_ende")
    assert not os.path.exists(tmp_path / "gs:")

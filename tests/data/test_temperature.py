"""The distillation temperature reaches the batch source: at T != 1 `online_teacher` and
`offline` train on the same targets (the step's tempered teacher) for the same responses.

Before the fix the online teacher source always handed the step the sampler's T=1 log-probs
as 'teacher_logprobs', so at T=2 online_teacher trained on untempered targets while offline
trained on tempered ones; `test_old_t1_logprobs_would_give_other_targets` shows this test
tells the two apart."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _regimes_common import LX, LY, SEED, B, make_prompts, tiny_models

from thack_jax.data import regimes
from thack_jax.data.offline_store import OfflineSpec, OfflineStore, prompts_checksum
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.training import train_step
from thack_jax.training.train_state import create_train_state

T = 2.0
OPT = optax.sgd(0.5)


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


def _online(tiny, distill_temperature, sampling=None):
    config, teacher, _ = tiny
    return regimes.make_source(
        "online_teacher",
        regimes.SourceConfig(batch_size=B, seed=SEED, distill_temperature=distill_temperature),
        prompts=make_prompts(),
        teacher=(config, teacher),
        sampling=sampling or SamplingConfig(max_decode_len=LY),
    )


def _offline_copy(directory, batch) -> regimes.OfflineSource:
    """An offline source over a store holding exactly the rows of `batch`."""
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    assert len({r.tobytes() for r in inputs}) == B  # one completion per distinct prompt
    spec = OfflineSpec(
        num_prompts=B,
        completions_per_prompt=1,
        max_input_length=LX,
        max_target_length=LY,
        vocab_fingerprint="test-vocab",
        generating_model="online-teacher-copy",
        seed=SEED,
        prompts_checksum=prompts_checksum(inputs),
    )
    store = OfflineStore.create_or_open(str(directory), spec, inputs)
    store.fill(lambda prompts, chunk: targets, B, progress=lambda _: None)
    return regimes.make_source(
        "offline", regimes.SourceConfig(batch_size=B, seed=SEED), offline_store=store
    )


def _step(tiny, batch, temperature=T):
    """One distillation step at `temperature` from the same student state: (loss, params)."""
    config, teacher, student = tiny
    step = train_step.make_train_step(
        config, OPT, train_step.StepConfig(temperature=temperature), config
    )
    state = create_train_state(jax.tree.map(jnp.array, student), OPT, 0)  # a copy: donated
    state, metrics = step(state, batch, teacher)
    return float(metrics["train/loss"]), jax.tree.leaves(jax.device_get(state.params))


def _rows(batch) -> list[bytes]:
    """The sorted (prompt, response) rows of a batch."""
    rows = np.concatenate([np.asarray(batch["inputs"]), np.asarray(batch["targets"])], axis=1)
    return sorted(map(bytes, rows))


def _close(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_online_teacher_and_offline_train_on_the_same_targets_at_t2(tiny, tmp_path):
    online = _online(tiny, T).next_batch(0, None)
    assert "teacher_logprobs" not in online  # T=1 samples are not the T=2 targets
    offline = _offline_copy(tmp_path / "store", online).next_batch(0, None)
    # The same responses (the offline source shuffles the rows).
    assert _rows(online) == _rows(offline)
    _close(_step(tiny, online), _step(tiny, offline))


def test_old_t1_logprobs_would_give_other_targets(tiny):
    """The old behaviour (the sampler's T=1 log-probs as targets of a T=2 step) trains on
    other targets: the loss and the update differ, so the test above can fail."""
    old = _online(tiny, 1.0).next_batch(0, None)
    assert "teacher_logprobs" in old  # at T=1 they are still provided, as before
    new = _online(tiny, T).next_batch(0, None)
    np.testing.assert_array_equal(np.asarray(old["targets"]), np.asarray(new["targets"]))
    loss_old, _ = _step(tiny, old)
    loss_new, _ = _step(tiny, new)
    assert abs(loss_old - loss_new) > 1e-2 * abs(loss_new)


def test_tempered_sampler_logprobs_are_the_step_targets(tiny):
    """Sampling at the distillation temperature (untruncated): the sampler's log-probs come
    along and give the same step as the teacher forward; with top-k they do not come."""
    tempered = SamplingConfig(max_decode_len=LY, temperature=T)
    batch = _online(tiny, T, tempered).next_batch(0, None)
    assert "teacher_logprobs" in batch
    without = {k: batch[k] for k in ("inputs", "targets")}
    _close(_step(tiny, batch), _step(tiny, without))
    top_k = SamplingConfig(max_decode_len=LY, temperature=T, top_k=4)
    assert "teacher_logprobs" not in _online(tiny, T, top_k).next_batch(0, None)

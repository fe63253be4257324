"""Tests of thack_jax.training.train_step: the step config and the jitted step (SFT, distillation,
teacher log-probs in the batch, microbatches, bad batches, meshes, bfloat16 activations).

Shared setup (one optimizer object, so compiled steps are reused) is in _train_common.py.
"""

import jax
import numpy as np
import optax
import pytest
from _train_common import (
    CFG,
    DISTILL,
    INPUTS,
    OPT,
    SCHEDULE,
    SFT,
    STUDENT,
    TARGETS,
    TEACHER,
    np_leaves,
    teacher_logprobs,
)

from thack_jax.parallel import partitioning
from thack_jax.training import optim, train_state, train_step


def _step_fn(step_config=DISTILL, teacher=True, mesh=None):
    return train_step.make_train_step(
        CFG, OPT, step_config, CFG if teacher else None, mesh, SCHEDULE
    )


def _fresh_state(mesh=None):
    sh = train_state.state_shardings(mesh, CFG, OPT)
    return jax.device_put(train_state.create_train_state(STUDENT, OPT, 0), sh)


def _batch(i=0, batch_size=8):
    rows = slice(i * batch_size, (i + 1) * batch_size)
    return {"inputs": INPUTS[rows], "targets": TARGETS[rows]}


def _run_steps(step, state, num_steps, teacher_params=TEACHER, batches=None):
    history = []
    for i in range(num_steps):
        batch = batches[i] if batches else _batch(i % 8)
        state, metrics = step(state, batch, teacher_params)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


# ------------------------------------------------------------------------------- config


def test_step_config_validation():
    assert train_step.StepConfig("distill", "jsd", {"beta": 0.1}).loss_kwargs == (("beta", 0.1),)
    hash(train_step.StepConfig("distill", "jsd", {"beta": 0.1}))
    with pytest.raises(ValueError, match="StepConfig.objective='rl' must be one of sft, distill"):
        train_step.StepConfig("rl")
    with pytest.raises(ValueError, match="StepConfig.temperature"):
        train_step.StepConfig("distill", loss_kwargs={"temperature": 2.0})
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        train_step.StepConfig("distill", "l2")
    with pytest.raises(ValueError, match="num_microbatches"):
        train_step.StepConfig("sft", num_microbatches=0)


# ----------------------------------------------------------------------------- the step


def test_sft_reduces_the_loss():
    state, history = _run_steps(_step_fn(SFT, teacher=False), _fresh_state(), 30, None)
    losses_ = [h["train/loss"] for h in history]
    assert losses_[-1] < 0.7 * losses_[0]
    assert history[0]["train/tokens"] == float((_batch(0)["targets"] != 0).sum())
    np.testing.assert_allclose(history[0]["train/learning_rate"], 5e-3, rtol=1e-6)
    np.testing.assert_allclose(history[5]["train/learning_rate"], 1e-2, rtol=1e-6)
    assert int(state.step) == 30


def test_distillation_from_a_frozen_teacher_reduces_the_loss():
    teacher_before = np_leaves(TEACHER)
    _, history = _run_steps(_step_fn(), _fresh_state(), 30)
    first, last = history[0]["train/loss"], history[-1]["train/loss"]
    assert last < 0.5 * first
    assert all(h["train/grad_norm"] > 0 for h in history)
    for before, after in zip(teacher_before, np_leaves(TEACHER), strict=True):
        np.testing.assert_array_equal(before, after)  # frozen: never updated


def test_teacher_logprobs_in_the_batch_equal_the_teacher_forward():
    batches = [_batch(i) for i in range(3)]
    with_logprobs = [
        {**b, "teacher_logprobs": teacher_logprobs(b, DISTILL.temperature)} for b in batches
    ]
    state_a, hist_a = _run_steps(_step_fn(), _fresh_state(), 3, TEACHER, batches)
    step_b = _step_fn(teacher=False)
    state_b, hist_b = _run_steps(step_b, _fresh_state(), 3, None, with_logprobs)
    for a, b in zip(hist_a, hist_b, strict=True):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
    for a, b in zip(np_leaves(state_a.params), np_leaves(state_b.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_microbatching_equals_one_big_batch():
    """(sum, count) accumulation over microbatches with different token counts gives the
    full batch's per-token mean gradient, not the mean of microbatch means. Plain SGD with
    learning rate 1, so the parameter change is the gradient itself."""
    sgd = optax.sgd(1.0)
    batch = _batch(0)
    counts = [(batch["targets"][j::2] != 0).sum() for j in range(2)]
    assert counts[0] != counts[1]  # the test would not tell the two ways apart otherwise
    results = []
    for m in (1, 2):
        config = train_step.StepConfig("distill", temperature=2.0, num_microbatches=m)
        step = train_step.make_train_step(CFG, sgd, config, CFG)
        state = train_state.create_train_state(STUDENT, sgd, 0)
        results.append(step(state, batch, TEACHER))
    (state_a, metrics_a), (state_b, metrics_b) = results
    assert float(metrics_a["train/tokens"]) == float(metrics_b["train/tokens"])
    np.testing.assert_allclose(metrics_a["train/loss"], metrics_b["train/loss"], rtol=1e-6)
    leaves = zip(
        np_leaves(state_a.params), np_leaves(state_b.params), np_leaves(STUDENT), strict=True
    )
    for a, b, p in leaves:
        # a and b are p + update rounded to float32, so a - b carries up to an ulp of the
        # parameters (1.2e-7 near 1) each; a gradient element is a sum over tokens whose
        # rounding (summation order) scales with the leaf's largest updates, not its own.
        ulps = np.spacing(np.maximum(np.abs(p), np.maximum(np.abs(a), np.abs(b))))
        excess = np.abs(a - b) - (2 * ulps + 1e-4 * np.abs(b - p).max())
        assert np.all(excess <= 0), f"updates differ by {excess.max():.3g} beyond tolerance"


def test_bad_batches_are_named():
    step = _step_fn()
    with pytest.raises(ValueError, match="batch has no 'targets'"):
        step(_fresh_state(), {"inputs": INPUTS[:8]}, TEACHER)
    with pytest.raises(ValueError, match="not divisible by num_microbatches 3"):
        cfg3 = train_step.StepConfig("distill", temperature=2.0, num_microbatches=3)
        _step_fn(cfg3)(_fresh_state(), _batch(0), TEACHER)
    with pytest.raises(ValueError, match="needs teacher_config"):
        _step_fn(teacher=False)(_fresh_state(), _batch(0), None)


@pytest.mark.slow
def test_meshes_give_the_same_training_as_one_device():
    """Meshes (8,1), (4,2), (2,4) vs one device, 3 AdamW steps in f32 at the highest matmul
    precision: losses agree to rtol 1e-5, parameters to rtol 1e-5 / atol 1e-6 (sharded
    reductions only change the summation order). Adam's eps is 1e-3 here: with eps 1e-8 a
    near-zero gradient element gets an update of ~lr * sign(g), which turns rounding noise
    into differences of up to lr."""
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", SCHEDULE, eps=1e-3))
    results = {}
    for shape in (None, {"data": 8, "model": 1}, {"data": 4, "model": 2}, {"data": 2, "model": 4}):
        mesh = partitioning.make_mesh(shape) if shape else None
        state = train_state.create_train_state(STUDENT, opt, 0)
        state = jax.device_put(state, train_state.state_shardings(mesh, CFG, opt))
        step = train_step.make_train_step(CFG, opt, DISTILL, CFG, mesh, SCHEDULE)
        results[str(shape)] = _run_steps(step, state, 3)
    ref_state, ref_hist = results.pop("None")
    for shape, (state, hist) in results.items():
        kernel = state.params["decoder"]["logits_dense"]["kernel"]
        assert len(kernel.sharding.device_set) == 8
        for a, b in zip(ref_hist, hist, strict=True):
            np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
        for a, b in zip(np_leaves(ref_state.params), np_leaves(state.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=shape)
        # Training moved the parameters well beyond the tolerance.
        pairs = zip(np_leaves(STUDENT), np_leaves(state.params), strict=True)
        assert max(np.abs(a - b).max() for a, b in pairs) > 1e-3


@pytest.mark.slow
def test_bfloat16_activations_train():
    """bf16 activations (student_config.dtype), f32 parameters and optimizer state."""
    cfg = CFG.replace(dtype="bfloat16")
    step = train_step.make_train_step(cfg, OPT, SFT, None, None, SCHEDULE)
    state = train_state.create_train_state(STUDENT, OPT, 0)
    state, history = _run_steps(step, state, 20, None)
    assert history[-1]["train/loss"] < 0.8 * history[0]["train/loss"]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))

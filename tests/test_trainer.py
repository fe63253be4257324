"""Tests of thack_jax.trainer: the jitted step (SFT, distillation, microbatches, meshes) and
the loop (resume, metrics, evaluation, hooks, NaN, SIGTERM, SIGKILL).

Compilations dominate the run time, so tests share one optimizer object and step configs
(`make_train_step` is cached on its arguments).
"""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from _train_worker import fast_init_params, toy_data

from thack_jax import checkpoints, losses, models, optim, partitioning, train_state, trainer
from thack_jax.metrics_io import read_metrics

CFG = models.get_config("tiny")
SCHEDULE = optim.make_schedule(1e-2, warmup_steps=2)
OPT = optim.make_optimizer("adamw", SCHEDULE)
SFT = trainer.StepConfig("sft")
DISTILL = trainer.StepConfig("distill", "forward_kl", temperature=2.0)
INPUTS, TARGETS = toy_data(CFG, num_examples=64)
STUDENT = fast_init_params(CFG, 0)
TEACHER = fast_init_params(CFG, 1)
WORKER = os.path.join(os.path.dirname(__file__), "_train_worker.py")


def _step_fn(step_config=DISTILL, teacher=True, mesh=None):
    return trainer.make_train_step(CFG, OPT, step_config, CFG if teacher else None, mesh, SCHEDULE)


def _fresh_state(mesh=None):
    sh = train_state.state_shardings(mesh, CFG, OPT)
    return jax.device_put(train_state.create_train_state(STUDENT, OPT, 0), sh)


def _batch(i=0, batch_size=8):
    rows = slice(i * batch_size, (i + 1) * batch_size)
    return {"inputs": INPUTS[rows], "targets": TARGETS[rows]}


def _teacher_logprobs(batch, temperature):
    logits = jax.jit(models.logits, static_argnums=0)(
        CFG, TEACHER, batch["inputs"], batch["targets"]
    )
    return np.array(losses.log_softmax_with_temperature(logits, temperature))  # writable


def _run_steps(step, state, num_steps, teacher_params=TEACHER, batches=None):
    history = []
    for i in range(num_steps):
        batch = batches[i] if batches else _batch(i % 8)
        state, metrics = step(state, batch, teacher_params)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------- config, source


def test_step_config_validation():
    assert trainer.StepConfig("distill", "jsd", {"beta": 0.1}).loss_kwargs == (("beta", 0.1),)
    hash(trainer.StepConfig("distill", "jsd", {"beta": 0.1}))
    with pytest.raises(ValueError, match="unknown objective 'rl'"):
        trainer.StepConfig("rl")
    with pytest.raises(ValueError, match="StepConfig.temperature"):
        trainer.StepConfig("distill", loss_kwargs={"temperature": 2.0})
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        trainer.StepConfig("distill", "l2")
    with pytest.raises(ValueError, match="num_microbatches"):
        trainer.StepConfig("sft", num_microbatches=0)


def test_array_source_epochs_and_exact_resume():
    source = trainer.ArraySource(INPUTS[:20], TARGETS[:20], batch_size=8, seed=3)
    epoch0 = [source.next_batch(i)["inputs"] for i in range(2)]  # 16 of 20 rows, then new epoch
    first = source.next_batch(2)["inputs"]
    assert source.state_dict()["epoch"] == 1
    rows0 = {tuple(r) for b in epoch0 for r in b}
    assert len(rows0) == 16 and rows0 <= {tuple(r) for r in INPUTS[:20]}
    saved = json.loads(json.dumps(source.state_dict()))
    later = [source.next_batch(i)["inputs"] for i in range(3, 8)]
    resumed = trainer.ArraySource(INPUTS[:20], TARGETS[:20], batch_size=8, seed=3)
    resumed.load_state_dict(saved)
    for i, want in enumerate(later):
        np.testing.assert_array_equal(resumed.next_batch(i + 3)["inputs"], want)
    # Each epoch is a fresh permutation.
    assert not np.array_equal(first, epoch0[0])
    with pytest.raises(ValueError, match="seed=3, this source has 4"):
        trainer.ArraySource(INPUTS[:20], TARGETS[:20], 8, seed=4).load_state_dict(saved)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.ArraySource(INPUTS[:4], TARGETS[:4], batch_size=8)


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
    teacher_before = _leaves(TEACHER)
    _, history = _run_steps(_step_fn(), _fresh_state(), 30)
    first, last = history[0]["train/loss"], history[-1]["train/loss"]
    assert last < 0.5 * first
    assert all(h["train/grad_norm"] > 0 for h in history)
    for before, after in zip(teacher_before, _leaves(TEACHER), strict=True):
        np.testing.assert_array_equal(before, after)  # frozen: never updated


def test_teacher_logprobs_in_the_batch_equal_the_teacher_forward():
    batches = [_batch(i) for i in range(3)]
    with_logprobs = [
        {**b, "teacher_logprobs": _teacher_logprobs(b, DISTILL.temperature)} for b in batches
    ]
    state_a, hist_a = _run_steps(_step_fn(), _fresh_state(), 3, TEACHER, batches)
    step_b = _step_fn(teacher=False)
    state_b, hist_b = _run_steps(step_b, _fresh_state(), 3, None, with_logprobs)
    for a, b in zip(hist_a, hist_b, strict=True):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
    for a, b in zip(_leaves(state_a.params), _leaves(state_b.params), strict=True):
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
        config = trainer.StepConfig("distill", temperature=2.0, num_microbatches=m)
        step = trainer.make_train_step(CFG, sgd, config, CFG)
        state = train_state.create_train_state(STUDENT, sgd, 0)
        results.append(step(state, batch, TEACHER))
    (state_a, metrics_a), (state_b, metrics_b) = results
    assert float(metrics_a["train/tokens"]) == float(metrics_b["train/tokens"])
    np.testing.assert_allclose(metrics_a["train/loss"], metrics_b["train/loss"], rtol=1e-6)
    leaves = zip(_leaves(state_a.params), _leaves(state_b.params), _leaves(STUDENT), strict=True)
    for a, b, p in leaves:
        np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-7)


def test_bad_batches_are_named():
    step = _step_fn()
    with pytest.raises(ValueError, match="batch has no 'targets'"):
        step(_fresh_state(), {"inputs": INPUTS[:8]}, TEACHER)
    with pytest.raises(ValueError, match="not divisible by num_microbatches 3"):
        cfg3 = trainer.StepConfig("distill", temperature=2.0, num_microbatches=3)
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
    opt = optim.make_optimizer("adamw", SCHEDULE, eps=1e-3)
    results = {}
    for shape in (None, {"data": 8, "model": 1}, {"data": 4, "model": 2}, {"data": 2, "model": 4}):
        mesh = partitioning.make_mesh(shape) if shape else None
        state = train_state.create_train_state(STUDENT, opt, 0)
        state = jax.device_put(state, train_state.state_shardings(mesh, CFG, opt))
        step = trainer.make_train_step(CFG, opt, DISTILL, CFG, mesh, SCHEDULE)
        results[str(shape)] = _run_steps(step, state, 3)
    ref_state, ref_hist = results.pop("None")
    for shape, (state, hist) in results.items():
        kernel = state.params["decoder"]["logits_dense"]["kernel"]
        assert len(kernel.sharding.device_set) == 8
        for a, b in zip(ref_hist, hist, strict=True):
            np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
        for a, b in zip(_leaves(ref_state.params), _leaves(state.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=shape)
        # Training moved the parameters well beyond the tolerance.
        pairs = zip(_leaves(STUDENT), _leaves(state.params), strict=True)
        assert max(np.abs(a - b).max() for a, b in pairs) > 1e-3


@pytest.mark.slow
def test_bfloat16_activations_train():
    """bf16 activations (student_config.dtype), f32 parameters and optimizer state."""
    cfg = CFG.replace(dtype="bfloat16")
    step = trainer.make_train_step(cfg, OPT, SFT, None, None, SCHEDULE)
    state = train_state.create_train_state(STUDENT, OPT, 0)
    state, history = _run_steps(step, state, 20, None)
    assert history[-1]["train/loss"] < 0.8 * history[0]["train/loss"]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))


# ----------------------------------------------------------------------------- the loop


def _train(workdir, num_steps, source=None, teacher=True, **kwargs):
    return trainer.train(
        workdir=str(workdir),
        student_config=CFG,
        init_params=STUDENT,
        optimizer=OPT,
        step_config=DISTILL,
        source=source or trainer.ArraySource(INPUTS, TARGETS, batch_size=8, seed=0),
        num_steps=num_steps,
        teacher_config=CFG if teacher else None,
        teacher_params=TEACHER if teacher else None,
        progress=False,
        learning_rate_fn=SCHEDULE,
        **kwargs,
    )


def test_loop_resume_eval_and_corrupted_checkpoint(tmp_path, caplog):
    evals = []

    def eval_fn(step, params):
        evals.append(step)
        return {
            "eval/norm": float(
                np.linalg.norm(np.asarray(params["encoder"]["encoder_norm"]["scale"]))
            )
        }

    result = _train(tmp_path, 4, checkpoint_every=2, eval_every=3, eval_fn=eval_fn)
    assert evals == [0, 3, 4] and not result.stopped_early
    assert checkpoints.all_steps(str(tmp_path / "checkpoints")) == [2, 4]
    # Corrupt the newest checkpoint: the next run resumes from step 2 and redoes 3..6.
    os.remove(str(tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt"))
    with caplog.at_level(logging.WARNING, logger="thack_jax.checkpoints"):
        result = _train(tmp_path, 6, checkpoint_every=2, eval_every=3, eval_fn=eval_fn)
    assert any("checkpoints/4" in r.getMessage() for r in caplog.records)
    assert evals == [0, 3, 4, 3, 6]
    assert int(result.state.step) == 6
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == list(range(7))  # each step exactly once
    assert "eval/norm" in rows[0] and "train/loss" not in rows[0]
    assert "eval/norm" in rows[3] and "eval/norm" not in rows[4]
    assert {"train/loss", "train/tokens", "train/grad_norm", "train/learning_rate"} <= set(rows[5])


def test_sigterm_handler_sets_a_flag_and_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with trainer._StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not stop.received and time.time() < deadline:
            time.sleep(0.01)
        assert stop.received
    assert signal.getsignal(signal.SIGTERM) is before


def test_hook_stops_after_an_eval(tmp_path):
    calls = []

    def hook(step, metrics):
        calls.append(step)
        return step >= 2

    result = _train(
        tmp_path,
        10,
        checkpoint_every=5,
        eval_every=2,
        eval_fn=lambda s, p: {"eval/x": 1.0},
        hooks=(hook,),
    )
    assert result.stopped_early and int(result.state.step) == 2 and calls == [0, 2]
    assert checkpoints.latest_step(str(tmp_path / "checkpoints")) == 2


class _NaNAt(trainer.ArraySource):
    """Teacher log-probs in the batch, NaN in the batch of step `bad`."""

    def __init__(self, bad):
        super().__init__(INPUTS, TARGETS, batch_size=8, seed=0)
        self.bad = bad

    def next_batch(self, step, student_params=None):
        batch = super().next_batch(step, student_params)
        logprobs = _teacher_logprobs(batch, DISTILL.temperature)
        if step == self.bad:
            logprobs[:] = np.nan
        return {**batch, "teacher_logprobs": logprobs}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(trainer.NonFiniteLossError, match="non-finite loss at step 3") as info:
        _train(tmp_path, 6, source=_NaNAt(bad=2), teacher=False, checkpoint_every=2)
    assert info.value.step == 3 and info.value.last_checkpoint == 2
    assert "last good checkpoint is step 2" in str(info.value)
    assert checkpoints.all_steps(str(tmp_path / "checkpoints")) == [2]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]


def test_wrong_init_params_are_named(tmp_path):
    bad = fast_init_params(CFG.replace(d_ff=16), 0)
    with pytest.raises(ValueError, match=r"init_params do not match(.|\n)*wi_0.*float32\[32, 64\]"):
        trainer.train(
            workdir=str(tmp_path),
            student_config=CFG,
            init_params=bad,
            optimizer=OPT,
            step_config=SFT,
            source=trainer.ArraySource(INPUTS, TARGETS, 8),
            num_steps=1,
            progress=False,
        )


# --------------------------------------------------------------- crashes (subprocesses)


def _start_worker(workdir, cache, *args):
    env = dict(os.environ, THACK_TEST_COMPILATION_CACHE=str(cache))
    return subprocess.Popen(
        [sys.executable, WORKER, "--workdir", str(workdir), "--num_steps", "12", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _wait_for_step(proc, workdir, step, timeout=600):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"worker exited early:\n{proc.stderr.read()[-3000:]}"
        if os.path.exists(path):
            steps = [r["step"] for r in read_metrics(path)]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"worker did not reach step {step}")


def _final_params(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return checkpoints.restore_params(directory, 12, models.param_shapes(CFG))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step worker run: its final parameters and the compile cache."""
    root = tmp_path_factory.mktemp("reference")
    cache = root / "compilation_cache"
    assert _finish(_start_worker(root / "run", cache)) == {"step": 12, "stopped_early": False}
    return _leaves(_final_params(str(root / "run"))), cache


def _assert_bitwise(params, reference_leaves):
    for a, b in zip(_leaves(params), reference_leaves, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)  # bitwise, not approximately


@pytest.mark.slow
def test_sigkill_then_restart_is_bitwise_identical(tmp_path, reference):
    ref_leaves, cache = reference
    kill_after = random.Random().randint(2, 10)
    proc = _start_worker(tmp_path, cache, "--step_sleep", "0.3")
    _wait_for_step(proc, str(tmp_path), kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _finish(_start_worker(tmp_path, cache)) == {"step": 12, "stopped_early": False}
    _assert_bitwise(_final_params(str(tmp_path)), ref_leaves)
    steps = [r["step"] for r in read_metrics(str(tmp_path))]
    assert steps == list(range(1, 13)), f"killed after step {kill_after}: {steps}"


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes(tmp_path, reference):
    ref_leaves, cache = reference
    proc = _start_worker(tmp_path, cache, "--step_sleep", "0.3", "--checkpoint_every", "100")
    _wait_for_step(proc, str(tmp_path), 4)
    proc.send_signal(signal.SIGTERM)
    result = _finish(proc)
    assert result["stopped_early"] and 4 <= result["step"] < 12
    assert checkpoints.latest_step(str(tmp_path / "checkpoints")) == result["step"]
    assert _finish(_start_worker(tmp_path, cache)) == {"step": 12, "stopped_early": False}
    _assert_bitwise(_final_params(str(tmp_path)), ref_leaves)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(1, 13))

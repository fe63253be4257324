"""Runs launch/eval.py in subprocesses: bad input, and a watcher killed and restarted."""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_divergences import LX, V, random_params  # noqa: E402

from thack_jax import models
from thack_jax.evaluation import watcher
from thack_jax.models import hf
from thack_jax.training import checkpoints
from thack_jax.training.metrics_io import read_metrics

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "eval.py"


def save_orbax(directory, step, params):
    ckpt = checkpoints.Checkpointer(str(directory), max_to_keep=None, async_save=False)
    ckpt.save(step, {"params": params})
    ckpt.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Oracle as a Hugging Face dir, teacher as an orbax dir + config JSON, prompts .npy."""
    root = tmp_path_factory.mktemp("cli")
    config = models.get_config("tiny", vocab_size=V)
    hf.save_hf_checkpoint(root / "oracle", config, random_params(config, 0))
    save_orbax(root / "teacher", 7, random_params(config, 1))
    (root / "tiny.json").write_text(json.dumps(dataclasses.asdict(config)))
    np.save(root / "prompts.npy", np.random.default_rng(0).integers(2, V, (6, LX)))
    return root, config


def args_for(root, workdir, **overrides):
    flags = {
        "workdir": workdir,
        "oracle_ckpt": root / "oracle",
        "teacher_ckpt": root / "teacher",
        "teacher_config": root / "tiny.json",
        "student_config": root / "tiny.json",
        "prompts": root / "prompts.npy",
        "num_samples": 2,
        "max_decode_len": 4,
        "batch_size": 4,
        "poll_seconds": 0.2,
    }
    flags.update(overrides)
    return [sys.executable, str(SCRIPT)] + [f"--{k}={v}" for k, v in flags.items()]


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"oracle_ckpt": "MISSING"}, "--oracle_ckpt=.*MISSING: the directory does not exist"),
        ({"teacher_ckpt": "EMPTY"}, "--teacher_ckpt=.*EMPTY holds no checkpoint"),
        ({"teacher_config": ""}, "is an orbax checkpoint: pass --teacher_config"),
        ({"student_config": "small"}, "vocab_size 32128 .*vocab_size 5|vocab_size 5 .*32128"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(setup, tmp_path, overrides, message):
    root, _ = setup
    (tmp_path / "EMPTY").mkdir()
    for key in ("oracle_ckpt", "teacher_ckpt"):
        if overrides.get(key) in ("MISSING", "EMPTY"):
            overrides[key] = tmp_path / overrides[key]
    result = run(args_for(root, tmp_path / "run", timeout=0, **overrides))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "eval.py: error:" in result.stderr
    assert re.search(message, result.stderr), result.stderr[-2000:]


def wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"eval.py exited early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def evaluated(workdir):
    path = workdir / watcher.EVAL_STATE_FILE
    if not path.exists():
        return []
    return json.loads(path.read_text())["evaluated_steps"]


@pytest.mark.slow
def test_killed_and_restarted_watcher_evaluates_each_step_exactly_once(setup, tmp_path):
    root, config = setup
    workdir = tmp_path / "run"
    for step in (1, 2):
        save_orbax(workdir / "checkpoints", step, random_params(config, 10 + step))
    cmd = args_for(root, workdir, stop_after_step=3)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: 1 in evaluated(workdir), 300, first)
    finally:
        first.kill()  # SIGKILL: no cleanup, possibly in the middle of step 2
        first.communicate()
    save_orbax(workdir / "checkpoints", 3, random_params(config, 13))
    second = run(cmd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "evaluated steps: [1, 2, 3]" in second.stdout
    rows = read_metrics(str(workdir / watcher.EVAL_METRICS_FILE))
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert evaluated(workdir) == [1, 2, 3]
    for row in rows:
        assert row["golden/forward_kl"] > 0 and row["proxy/js_stderr"] > 0

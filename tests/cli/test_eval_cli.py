"""Runs launch/eval.py in subprocesses: bad input, a watcher killed and restarted, field
mode with references, and a run of a tiny experiment evaluated separately with the run's
own settings (equal to the inline metrics, at another batch size too)."""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _experiment_common import tiny_config
from test_divergences import LX, V, random_params  # noqa: E402

from thack_jax import models
from thack_jax.cli import eval_inputs
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


def test_field_mode_with_references_measures_proxy_and_reference_only(setup, tmp_path):
    root, config = setup
    workdir = tmp_path / "run"
    save_orbax(workdir / "checkpoints", 1, random_params(config, 11))
    refs = np.array([[3, 1, 0], [2, 0, 4], [1, 0, 0], [4, 4, 1], [2, 1, 0], [3, 3, 3]])
    np.save(tmp_path / "refs.npy", refs)
    cmd = args_for(root, workdir, stop_after_step=1, mode="field", references=tmp_path / "refs.npy")
    cmd.remove(f"--oracle_ckpt={root / 'oracle'}")
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "settings from" not in result.stdout  # not a run of an experiment
    # Library INFO lines (orbax's checkpoint reads, absl's) are hidden without --verbosity.
    noise = [line for line in result.stderr.splitlines() if re.match(r"(I\d{4} |INFO:absl)", line)]
    assert noise == [] and "orbax" not in result.stderr, result.stderr[-3000:]
    (row,) = read_metrics(str(workdir / watcher.EVAL_METRICS_FILE))
    prefixes = {key.split("/")[0] for key in row if "/" in key}
    assert prefixes == {"proxy", "reference"}
    assert row["reference/cross_entropy"] > 0 and "reference/teacher_cross_entropy" in row
    # An oracle in field mode is refused, so is a reference set of the wrong shape.
    result = run(args_for(root, tmp_path / "r2", mode="field", timeout=0))
    assert result.returncode == 1 and "given in field mode" in result.stderr
    np.save(tmp_path / "short.npy", refs[:4])
    result = run(args_for(root, tmp_path / "r3", references=tmp_path / "short.npy", timeout=0))
    assert result.returncode == 1, result.stderr[-2000:]
    assert re.search(r"references must have shape \[num_prompts=6.*\(4, 3\)", result.stderr)


def test_run_settings_of_a_run_directory(tmp_path):
    experiment = tmp_path / "exp"
    (experiment / "runs" / "offline").mkdir(parents=True)
    run_dir = str(experiment / "runs" / "offline")
    assert eval_inputs.run_settings(run_dir) is None  # no settings file yet
    record = {
        "num_samples": 2, "max_decode_len": 6, "seed": 3, "batch_size": 8,
        "estimator": "plain", "mode": "field", "prompts": "eval_prompts.npy",
        "references": "eval_references.npy",
    }  # fmt: skip
    (experiment / "eval_settings.json").write_text(json.dumps(record))
    path, values = eval_inputs.run_settings(run_dir + "/")
    assert path == str(experiment / "eval_settings.json")
    assert values["oracle_ckpt"] is None and values["mode"] == "field"
    assert values["references"] == str(experiment / "eval_references.npy")
    assert values["teacher_ckpt"] == str(experiment / "teacher" / "model")
    assert values["student_config"] == str(experiment / "student_init/model/config.json")
    assert values["ckpt_subdir"] == "train/checkpoints" and values["batch_size"] == 8
    assert eval_inputs.run_settings(str(experiment / "runs")) is None  # not runs/<name>
    (experiment / "eval_settings.json").write_text(json.dumps(record | {"seed": "3"}))
    with pytest.raises(eval_inputs.EvalCliError, match="eval_settings.json: seed='3' must be"):
        eval_inputs.run_settings(run_dir)


def _write_settings_if_missing(cfg, workdir: Path) -> bool:
    """The runner writes eval_settings.json; until it does, the test writes what it would."""
    path = workdir / eval_inputs.EVAL_SETTINGS
    if path.exists():
        return False
    ev = cfg.evaluation
    refs = "eval_references.npy" if (workdir / "eval_references.npy").exists() else None
    record = {
        "num_samples": ev.num_samples, "max_decode_len": cfg.max_target_length,
        "seed": ev.seed, "batch_size": ev.batch_size, "estimator": ev.estimator,
        "mode": "oracle", "prompts": "eval_prompts.npy", "references": refs,
    }  # fmt: skip
    path.write_text(json.dumps(record))
    return True


def _evaluate_run(run_dir: Path, *flags: str):
    """launch/eval.py on a run directory (fresh outputs); its metrics rows and stdout."""
    for name in (watcher.EVAL_METRICS_FILE, watcher.EVAL_STATE_FILE):
        (run_dir / name).unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), f"--workdir={run_dir}", "--timeout=0", *flags]
    result = run(cmd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(str(run_dir / watcher.EVAL_METRICS_FILE)), result.stdout


@pytest.mark.slow
def test_a_run_evaluated_separately_equals_the_inline_evaluation(tmp_path):
    from thack_jax.experiment import runner
    from thack_jax.experiment.config import EvalConfig, RunConfig

    base = tiny_config()
    cfg = tiny_config(
        runs=(RunConfig(name="offline", regime="offline", num_prompts=16),),
        # every == the distillation's checkpoint_every: each checkpoint is an eval step.
        evaluation=EvalConfig(
            num_prompts=8, num_samples=2, every=base.distill.checkpoint_every, batch_size=8
        ),
    )
    workdir = tmp_path / "exp"
    runner.Experiment(cfg, str(workdir), progress=False).run()
    wrote = _write_settings_if_missing(cfg, workdir)
    run_dir = workdir / "runs" / "offline"
    ckpt_steps = checkpoints.list_finalized_steps(str(run_dir / "train" / "checkpoints"))
    inline = {
        row["step"]: row
        for row in read_metrics(str(run_dir / "train" / "metrics.jsonl"))
        if "proxy/forward_kl" in row
    }
    assert len(ckpt_steps) >= 2 and set(ckpt_steps) <= set(inline), (ckpt_steps, sorted(inline))
    for flags in ((), ("--batch_size=3",)):
        rows, stdout = _evaluate_run(run_dir, *flags)
        assert f"settings from {workdir / 'eval_settings.json'}" in stdout, (wrote, stdout)
        assert [row["step"] for row in rows] == ckpt_steps, flags
        for row in rows:
            want = inline[row["step"]]
            keys = {k for k in want if k.split("/")[0] in ("proxy", "golden", "reference")}
            assert any(k.startswith("golden/") for k in keys) and set(row) >= keys
            for key in keys:
                assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (flags, key)

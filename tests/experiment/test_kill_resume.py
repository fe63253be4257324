"""Killed anywhere, the first rerun finishes and ends bitwise equal to an uninterrupted run
(issue 14, item 2): the kill-anywhere soak of tests/_kill_soak.py at a small size, and the
comparison it relies on.

The full soak (20 kills, ~15-25 min on 2 cores): `python tests/_kill_soak.py --kills=20`.
"""

import json
import os
import shutil

import jax.numpy as jnp
import pytest
from _kill_soak import SoakConfig, compare_workdirs, format_table, soak

from thack_jax.training.checkpoints import Checkpointer

REPORT = """# Report

Built by `python launch/report.py` from `{workdir}`.

| run | verdict | wall | metrics file |
|---|---|---|---|
| offline | ok | {wall} | `runs/a/train/metrics.jsonl` |
"""


def _save_checkpoint(directory: str, step: int, weights) -> None:
    ckpt = Checkpointer(directory, max_to_keep=3, async_save=False)
    state = {"params": {"w": jnp.asarray(weights, jnp.float32)}, "step": jnp.int32(step)}
    ckpt.save(step, state, {"epoch": 0, "index": step})
    ckpt.wait_until_finished()
    ckpt.close()


def _workdir(root: str, wall: float) -> str:
    """A small workdir of the layout the soak compares: metrics, a checkpoint, a marker with
    a wall time, a report with a wall column."""
    train = os.path.join(root, "runs", "a", "train")
    os.makedirs(train)
    with open(os.path.join(train, "metrics.jsonl"), "w") as f:
        for step in range(3):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / (step + 1)}) + "\n")
    _save_checkpoint(os.path.join(train, "checkpoints"), 2, [1.0, 2.0, 3.0])
    with open(os.path.join(root, "runs", "a", "COMPLETE.json"), "w") as f:
        json.dump({"fingerprint": "abc", "wall_seconds": wall}, f)
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(REPORT.format(workdir=root, wall=f"{wall:.0f} s"))
    return root


def _edit_metrics(path: str, edit) -> None:
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(edit(lines))


def test_comparison_finds_a_changed_metric_a_repeated_step_a_changed_param(tmp_path):
    reference = _workdir(str(tmp_path / "reference"), wall=12.0)
    fresh = iter(range(100))

    def candidate():
        path = str(tmp_path / f"candidate_{next(fresh)}")
        shutil.copytree(reference, path)
        with open(os.path.join(path, "report.md"), "w") as f:  # it names its workdir
            f.write(REPORT.format(workdir=path, wall="12 s"))
        return path

    # Equal up to the wall-clock fields (another wall time, another workdir path).
    other = _workdir(str(tmp_path / "other"), wall=99.0)
    assert compare_workdirs(reference, other) == []

    metrics = os.path.join("runs", "a", "train", "metrics.jsonl")
    changed = candidate()
    _edit_metrics(
        os.path.join(changed, metrics),
        lambda ls: ls[:1] + [ls[1].replace("0.5", "0.5001")] + ls[2:],
    )
    assert compare_workdirs(reference, changed) == [f"{metrics}: lines differ at steps [1]"]

    repeated = candidate()
    _edit_metrics(os.path.join(repeated, metrics), lambda ls: ls[:2] + ls[1:])
    problems = compare_workdirs(reference, repeated)
    assert any("steps logged more than once: [1]" in p for p in problems), problems

    param = candidate()
    checkpoints = os.path.join(param, "runs", "a", "train", "checkpoints")
    shutil.rmtree(checkpoints)
    _save_checkpoint(checkpoints, 2, [1.0, 2.0, 3.0000002])
    problems = compare_workdirs(reference, param)
    assert problems == [
        "runs/a/train/checkpoints/2: state arrays differ: [\"['params']['w']\"] (1)"
    ], problems

    # A SIGTERM saves its step off the schedule: another set of kept steps, the same newest
    # one (and the same arrays in it), is a difference unless asked to note it.
    off_schedule = candidate()
    checkpoints = os.path.join(off_schedule, "runs", "a", "train", "checkpoints")
    shutil.rmtree(checkpoints)
    _save_checkpoint(checkpoints, 1, [0.0, 0.0, 0.0])
    _save_checkpoint(checkpoints, 2, [1.0, 2.0, 3.0])
    kept = "runs/a/train/checkpoints: kept steps ['1', '2'], reference ['2']"
    assert compare_workdirs(reference, off_schedule) == [kept]
    notes = []
    assert compare_workdirs(reference, off_schedule, notes) == [] and notes == [kept]

    leftover = candidate()
    open(os.path.join(leftover, "runs", "a", "run.json.tmp.123"), "w").close()
    problems = compare_workdirs(reference, leftover)
    assert problems == ["leftover temporary: runs/a/run.json.tmp.123"], problems

    marker = candidate()
    with open(os.path.join(marker, "runs", "a", "COMPLETE.json"), "w") as f:
        json.dump({"fingerprint": "abd", "wall_seconds": 12.0}, f)
    assert compare_workdirs(reference, marker) == ["runs/a/COMPLETE.json: differs"]


@pytest.mark.slow
def test_killed_anywhere_the_first_rerun_finishes_bitwise_equal(tmp_path):
    """2 SIGKILLs and 1 SIGTERM at random times of the CI-sized experiment, each followed
    by exactly one rerun, which must exit 0 and leave a workdir equal to the reference. (A
    CI-time guard against regressions; the evidence is the 20 + 10 kills of
    docs/reliability.md.)"""
    result = soak(
        SoakConfig(
            root=str(tmp_path),
            signals=("KILL", "KILL", "TERM"),
            seed=14,
            verbose=False,
        )
    )
    table = format_table(result["kills"])
    print(table)
    assert result["baseline_differences"] == [], result["baseline_differences"]
    failed = [r for r in result["kills"] if not r["equal"]]
    assert not failed, table + "\n" + json.dumps(failed, indent=1)[:6000]

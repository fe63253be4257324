"""The event files of `metrics_io.MetricsWriter` read by TensorBoard's own reader, the way
`tensorboard --logdir <workdir>/runs` loads them (every `<run>/train/tensorboard/` folder
is one TensorBoard run):
- a tiny experiment's distillation run holds every metric the report reads, at the steps
  and values (float32) of its metrics.jsonl;
- a resumed writer's events (local, and uploaded to gs://) read back as each step once,
  with the resumed values: the earlier file's later steps are hidden by the purge step.
"""

import math
import os
import sys
import types

import numpy as np
import pytest
from _experiment_common import tiny_config

try:
    from tensorboard.backend.event_processing import event_accumulator, event_multiplexer
except ImportError as e:  # the test extra installs it
    raise ImportError(
        f"{__file__} needs TensorBoard's reader: pip install -e '.[test]' (or '.[tensorboard]')"
    ) from e

from thack_jax.core import storage
from thack_jax.experiment import runner
from thack_jax.experiment.config import RunConfig
from thack_jax.reporting import reference, summary
from thack_jax.training import metrics_io
from thack_jax.training.metrics_io import MetricsWriter, read_metrics

# Every metric the report reads: the divergences with their stderrs (summary.KEYS, what a
# run summary keeps for the report) and the reference cross-entropies (reference.KEYS).
REPORT_KEYS = summary.KEYS + reference.KEYS


def _tensorboard_scalars(logdir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run -> tag -> [(step, value)] of every scalar TensorBoard loads from `logdir` (each
    sub-folder with event files is a run, named by its path below `logdir`)."""
    mux = event_multiplexer.EventMultiplexer(size_guidance={event_accumulator.SCALARS: 0})
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    return {
        run: {tag: [(e.step, e.value) for e in mux.Scalars(run, tag)] for tag in tags["scalars"]}
        for run, tags in mux.Runs().items()
    }


def _jsonl_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of metrics.jsonl rows, as the writer sends them to TensorBoard:
    finite values only, a later line of a step replacing an earlier one."""
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                by_key.setdefault(key, {})[row["step"]] = value
    return {key: sorted(steps.items()) for key, steps in by_key.items()}


def _assert_same_series(events: dict, jsonl: dict, where: str) -> None:
    """The same tags, and per tag the same steps and values up to float32 rounding (event
    scalars are float32)."""
    assert sorted(events) == sorted(jsonl), f"{where}: tags differ from metrics.jsonl's keys"
    for tag, series in jsonl.items():
        got_steps = [step for step, _ in events[tag]]
        assert got_steps == [step for step, _ in series], f"{where}: steps of {tag!r}"
        np.testing.assert_allclose(
            [v for _, v in events[tag]],
            [v for _, v in series],
            rtol=2**-23,
            err_msg=f"{where}: values of {tag!r}",
        )


@pytest.mark.slow
def test_a_distillation_run_s_events_hold_every_report_metric(tmp_path):
    workdir = str(tmp_path / "wd")
    cfg = tiny_config(runs=(RunConfig(name="offline", regime="offline", num_prompts=16),))
    runner.Experiment(cfg, workdir, progress=False).run()
    runs = _tensorboard_scalars(os.path.join(workdir, "runs"))
    run = f"offline/train/{metrics_io.TENSORBOARD_DIR}"
    assert list(runs) == [run], f"TensorBoard runs under {workdir}/runs: {list(runs)}"
    events = runs[run]
    missing = [key for key in REPORT_KEYS if key not in events]
    assert not missing, f"report metrics not in the TensorBoard events of {run}: {missing}"
    rows = read_metrics(os.path.join(workdir, "runs", "offline", "train"))
    _assert_same_series(events, _jsonl_scalars(rows), run)
    # Evaluations at 0, 3 and 6 (EvalConfig.every=3 of 6 steps), each loss step 1..6.
    assert [step for step, _ in events["golden/forward_kl"]] == [0, 3, 6]
    assert [step for step, _ in events["train/loss"]] == list(range(1, 7))


def _write_resumed_run(workdir: str, monkeypatch) -> None:
    """Steps 0-5, then a resume from the checkpoint at step 3 that writes steps 4-7 with
    other values, both writers started in the same second (a fast restart); step 2's
    proxy is NaN (not an event)."""
    metrics_io._import_summary_writer()  # tensorboardX, imported without torch
    clock = types.SimpleNamespace(time=lambda: 1_700_000_000.0)  # names the event files
    monkeypatch.setattr(sys.modules["tensorboardX.event_file_writer"], "time", clock)
    first = MetricsWriter(workdir, enabled=True)
    first.truncate_after(-1)
    for step in range(6):
        proxy = float("nan") if step == 2 else 10.0 - step
        first.write(step, {"train/loss": 1.0 + step / 8, "proxy/forward_kl": proxy})
    first.close()
    again = MetricsWriter(workdir, enabled=True)
    again.truncate_after(3)
    for step in range(4, 8):
        again.write(step, {"train/loss": 2.0 + step / 8, "proxy/forward_kl": 20.0 - step})
    again.close()


def test_a_resumed_run_reads_back_as_each_step_once(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    _write_resumed_run(workdir, monkeypatch)
    tb_dir = os.path.join(workdir, metrics_io.TENSORBOARD_DIR)
    assert len(os.listdir(tb_dir)) == 2, f"one event file per writer in {tb_dir}"
    runs = _tensorboard_scalars(workdir)
    assert list(runs) == [metrics_io.TENSORBOARD_DIR]
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == list(range(8))
    events = runs[metrics_io.TENSORBOARD_DIR]
    _assert_same_series(events, _jsonl_scalars(rows), tb_dir)
    assert events["train/loss"][4] == (4, 2.5)  # the resumed value


def test_uploaded_events_of_a_resumed_gcs_run_read_back_as_each_step_once(
    gcs_bucket, tmp_path, monkeypatch
):
    workdir = gcs_bucket + "/run"
    _write_resumed_run(workdir, monkeypatch)
    # The bucket's event files, copied as they are into a local folder for the reader.
    remote_dir = storage.join(workdir, metrics_io.TENSORBOARD_DIR)
    local_dir = tmp_path / "copy" / metrics_io.TENSORBOARD_DIR
    local_dir.mkdir(parents=True)
    names = storage.listdir(remote_dir)
    assert len(names) == 2, f"one event file per writer in {remote_dir}: {names}"
    for name in names:
        (local_dir / name).write_bytes(storage.read_bytes(storage.join(remote_dir, name)))
    runs = _tensorboard_scalars(str(tmp_path / "copy"))
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == list(range(8))
    _assert_same_series(runs[metrics_io.TENSORBOARD_DIR], _jsonl_scalars(rows), remote_dir)

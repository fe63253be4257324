"""Tests of training.metrics_io: JSON lines, truncation on resume, TensorBoard, progress."""

import io
import json
import os

import numpy as np
import pytest

from thack_jax.training import metrics_io
from thack_jax.training.metrics_io import MetricsWriter, Progress, read_metrics


def test_write_and_read_round_trip(tmp_path):
    with MetricsWriter(str(tmp_path), tensorboard=False, enabled=True) as w:
        w.write(1, {"train/loss": np.float32(0.5), "train/tokens": np.array(7)})
        w.write(2, {"train/loss": 0.25, "eval/flag": np.bool_(True)})
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert rows == [
        {"step": 1, "train/loss": 0.5, "train/tokens": 7},
        {"step": 2, "train/loss": 0.25, "eval/flag": 1},
    ]
    assert read_metrics(str(tmp_path)) == rows  # a workdir is accepted too


def test_rejects_non_scalars_and_reserved_step(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
    with pytest.raises(ValueError, match="'train/loss' must be a scalar"):
        w.write(1, {"train/loss": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
        w.write(1, {"step": 3})


def test_truncate_after_keeps_each_step_once(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
    for step in range(6):
        w.write(step, {"x": step})
    # A crash while writing leaves half a line behind.
    with open(w.path, "a") as f:
        f.write('{"step": 6, "x"')
    assert w.truncate_after(3) == 2
    for step in range(4, 8):  # the resumed run writes its steps again
        w.write(step, {"x": step * 10})
    rows = read_metrics(w.path)
    assert [r["step"] for r in rows] == list(range(8))
    assert rows[4]["x"] == 40 and rows[3]["x"] == 3


def test_truncate_from_scratch_and_missing_file(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
    assert w.truncate_after(-1) == 0  # no file yet
    w.write(0, {"x": 1})
    assert w.truncate_after(-1) == 1
    assert read_metrics(w.path) == []


def test_read_ignores_half_written_last_line_but_not_a_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x"')
    assert read_metrics(str(path)) == [{"step": 1, "x": 1}]
    path.write_text('{"step": 1, "x": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON line"):
        read_metrics(str(path))


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "w"), enabled=False)
    w.write(1, {"x": 1.0})
    assert w.truncate_after(0) == 0
    assert not os.path.exists(tmp_path / "w")


def test_non_finite_values_stay_in_the_json(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=True, enabled=True)
    w.write(1, {"train/loss": float("nan")})
    w.close()
    assert np.isnan(read_metrics(w.path)[0]["train/loss"])


def test_tensorboard_events_are_written(tmp_path):
    w = MetricsWriter(str(tmp_path), enabled=True)
    w.write(3, {"train/loss": 1.5})
    w.close()
    tb_dir = tmp_path / metrics_io.TENSORBOARD_DIR
    files = os.listdir(tb_dir)
    assert files and all(name.startswith("events.out.tfevents") for name in files)
    assert os.path.getsize(tb_dir / files[0]) > 0


def test_lines_are_plain_json(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
    w.write(5, {"a": 1.0})
    with open(w.path) as f:
        assert json.loads(f.readline()) == {"step": 5, "a": 1.0}


def test_progress_reports_rate_and_eta(monkeypatch):
    clock = iter([100.0, 102.0, 102.5, 110.0])
    monkeypatch.setattr(metrics_io.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    p = Progress(total_steps=100, start_step=0, every_secs=5.0, stream=out)
    assert p.update(10, {"train/loss": 2.0}) is None  # 2 s after start: too early
    line = p.update(20, {"train/loss": 1.25}, force=True)  # 2.5 s, 20 steps
    assert line == "step 20/100 | loss 1.25 | 8.00 steps/s | ETA 0:10"
    line = p.update(95)  # 7.5 s later, 75 steps
    assert line == "step 95/100 | 10.00 steps/s | ETA 0:00"
    assert out.getvalue().count("\n") == 2

"""Tests of training.metrics_io: JSON lines, truncation on resume, TensorBoard, progress."""

import io
import json
import os
import struct

import numpy as np
import pytest

from thack_jax.core import storage
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
    clock = iter([0.0, 100.0, 102.0, 102.5, 110.0])
    monkeypatch.setattr(metrics_io.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    p = Progress(total_steps=100, start_step=0, every_secs=5.0, stream=out)
    # Step 0 done 100 s after the start (compilation): the rates start from here, so the
    # first ETA is the steady one, not 100 s per step.
    assert p.update(0, {"train/loss": 3.0}, force=True) is None
    assert p.update(10, {"train/loss": 2.0}) is None  # 2 s later: too early
    line = p.update(20, {"train/loss": 1.25}, force=True)  # 2.5 s, 20 steps
    assert line == "step 20/100 | loss 1.25 | 8.00 steps/s | ETA 0:10"
    line = p.update(95)  # 7.5 s later, 75 steps
    assert line == "step 95/100 | 10.00 steps/s | ETA 0:00"
    assert out.getvalue().count("\n") == 2


# ------------------------------------------------------------- gs:// (tests/_gcs.py)


def _steps(path):
    return [row["step"] for row in read_metrics(path)]


def test_remote_writer_uploads_at_flush_points_only(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = gcs_bucket + "/run"
    w = MetricsWriter(workdir, tensorboard=False, enabled=True)
    assert w.truncate_after(-1) == 0
    w.write(0, {"x": 0.5})
    w.write(1, {"x": 1.5})
    assert not storage.exists(w.path)  # no append on GCS: nothing until a flush
    w.flush()
    assert _steps(w.path) == [0, 1] and read_metrics(workdir)[1] == {"step": 1, "x": 1.5}
    w.write(2, {"x": 2.5})
    assert _steps(w.path) == [0, 1]  # lines after the last flush are not there yet
    w.close()
    assert _steps(w.path) == [0, 1, 2]
    assert not os.path.exists(tmp_path / "gs:")


def test_remote_and_local_files_have_the_same_bytes(gcs_bucket, tmp_path):
    rows = [(0, {"a": 1.0}), (1, {"a": np.float32(0.25), "b": np.int64(3)}), (2, {"c": 1e-9})]
    for workdir in (str(tmp_path), gcs_bucket):
        with MetricsWriter(workdir, tensorboard=False, enabled=True) as w:
            for step, metrics in rows:
                w.write(step, metrics)
    assert storage.read_bytes(gcs_bucket + "/metrics.jsonl") == (
        (tmp_path / "metrics.jsonl").read_bytes()
    )


def test_remote_resume_truncates_then_rewrites(gcs_bucket):
    workdir = gcs_bucket + "/run"
    with MetricsWriter(workdir, tensorboard=False, enabled=True) as w:
        for step in range(6):
            w.write(step, {"x": step})
    resumed = MetricsWriter(workdir, tensorboard=False, enabled=True)
    assert resumed.truncate_after(3) == 2
    assert _steps(resumed.path) == [0, 1, 2, 3]  # rewritten at once, not at the first flush
    for step in range(4, 8):
        resumed.write(step, {"x": step * 10})
    resumed.close()
    rows = read_metrics(resumed.path)
    assert [r["step"] for r in rows] == list(range(8))
    assert rows[3]["x"] == 3 and rows[4]["x"] == 40


def test_remote_writer_without_truncate_keeps_the_existing_lines(gcs_bucket):
    storage.write_atomic(gcs_bucket + "/eval.jsonl", '{"step": 10, "x": 1}\n')
    with MetricsWriter(gcs_bucket, tensorboard=False, enabled=True, filename="eval.jsonl") as w:
        w.write(20, {"x": 2})
    assert _steps(gcs_bucket + "/eval.jsonl") == [10, 20]


def _scalars(data: bytes) -> list[tuple]:
    """(step, tag, value) of every scalar in an event file's bytes (TFRecord framing: length
    u64, its crc u32, the Event proto, its crc u32), plus ('purge', step) for a restart."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 16 + length
        if event.session_log.status == SessionLog.START:
            out.append(("purge", event.step))
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_remote_events_hold_what_summary_writer_writes_locally(gcs_bucket, tmp_path):
    for workdir in (str(tmp_path), gcs_bucket):
        w = MetricsWriter(workdir, enabled=True)
        w.truncate_after(2)  # a resume: purge_step 3
        w.write(3, {"train/loss": 1.5, "eval/kl": 0.25})
        w.write(4, {"train/loss": float("nan")})  # not finite: JSON only
        w.close()
    (local,) = os.listdir(tmp_path / metrics_io.TENSORBOARD_DIR)
    remote_dir = gcs_bucket + "/" + metrics_io.TENSORBOARD_DIR
    (remote,) = storage.listdir(remote_dir)
    want = [("purge", 3), (3, "train/loss", 1.5), (3, "eval/kl", 0.25)]
    assert _scalars((tmp_path / metrics_io.TENSORBOARD_DIR / local).read_bytes()) == want
    assert _scalars(storage.read_bytes(storage.join(remote_dir, remote))) == want


def test_remote_tensorboard_events_are_uploaded_and_a_resume_adds_a_file(gcs_bucket):
    workdir = gcs_bucket + "/run"
    tb_dir = storage.join(workdir, metrics_io.TENSORBOARD_DIR)
    w = MetricsWriter(workdir, enabled=True)
    w.write(1, {"train/loss": 1.5})
    w.flush()
    (first,) = storage.listdir(tb_dir)
    assert first.startswith("events.out.tfevents")
    assert _scalars(storage.read_bytes(storage.join(tb_dir, first))) == [(1, "train/loss", 1.5)]
    size = len(storage.read_bytes(storage.join(tb_dir, first)))
    w.write(2, {"train/loss": 1.25})
    w.close()
    assert len(storage.read_bytes(storage.join(tb_dir, first))) > size  # re-uploaded whole
    assert w._tb_local is None  # the local scratch folder is gone
    # A resumed run (same second, same host) writes a file of its own beside the first.
    again = MetricsWriter(workdir, enabled=True)
    again.truncate_after(1)
    again.write(2, {"train/loss": 1.0})
    again.close()
    files = storage.listdir(tb_dir)
    assert len(files) == 2 and first in files
    assert len(storage.read_bytes(storage.join(tb_dir, first))) > size

"""Metric files: JSON lines (`workdir/metrics.jsonl`), TensorBoard scalars, progress lines.

Each line of metrics.jsonl is one JSON object `{"step": int, "<name>": float, ...}`. Lines are
flushed and fsynced when written, so a crash loses at most the line being written. After a
restart from a checkpoint at step s, `truncate_after(s)` drops every line with step > s (and
a half-written last line), so that once the run finishes each step appears exactly once.

A remote workdir (gs://...) cannot be appended to: the writer keeps the file's lines in
memory and rewrites the whole object at each `flush()` (the trainer flushes at every
evaluation and checkpoint step) and at `close()`. A crash loses the lines written since
the last flush; that is harmless, since the resumed run truncates the metrics after its
restored checkpoint step and writes those steps again. TensorBoard cannot write to gs://
without TensorFlow: its events go to a local scratch folder and the event files are
uploaded to `<workdir>/tensorboard/` at the same flush points.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import TextIO

import numpy as np

from thack_jax.core import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _import_summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch when it is installed (only to accept torch tensors), which
    costs seconds and hundreds of MB in a JAX process; an absent `torch` entry in
    sys.modules makes that optional import fail fast, and it is removed again afterwards.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _event_file_suffix() -> str:
    """The end of an event file's name: the creation time in ns, then a random part.

    tensorboardX names the file by the second and the host only, and opens it with "wb": a
    writer started in the same second as the previous one (a fast resume) would replace
    that writer's events, locally or in the bucket. TensorBoard reads a folder's files in
    name order and a resumed file's purge step hides only the events of the files before
    it, so the names must also sort as the writers started: the nanoseconds do that (19
    digits until 2286)."""
    return f".{time.time_ns()}.{uuid.uuid4().hex[:8]}"


def _to_python(name: str, value):
    """A metric value as a JSON-able Python int or float."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    scalar = array.reshape(()).item()
    if isinstance(scalar, (bool, np.bool_)):
        return int(scalar)
    if isinstance(scalar, (int, float)):
        return scalar
    raise TypeError(f"metric {name!r} has non-numeric value {value!r}")


def json_object(path: str, number: int, line: str) -> dict:
    """One line of a JSON-lines file as a dict; ValueError naming `path:number` otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e}): {line[:200]!r}") from e
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {line[:200]!r}")
    return row


def _parse_lines(path: str, text: str) -> list[dict]:
    """Parses metrics.jsonl text. A last line without its newline (a write cut short by a
    crash) is dropped; any other unreadable line is an error naming the file and line."""
    rows = []
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail is "" when the text ends with "\n"
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        row = json_object(path, number, line)
        if not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an int 'step': {line!r}")
        rows.append(row)
    del tail  # half-written: never trusted
    return rows


def read_metrics(path: str) -> list[dict]:
    """All complete lines of a metrics.jsonl file (or of `<dir>/metrics.jsonl`), in order."""
    if storage.isdir(path):
        path = storage.join(path, METRICS_FILE)
    return _parse_lines(path, storage.read_text(path))


class _EventFile:
    """TensorBoard scalars written synchronously to one event file in a local folder, as
    tensorboardX's SummaryWriter writes them (for a remote workdir, whose event files are
    uploaded at flush points: SummaryWriter queues events for a thread and its flush() does
    not wait for that queue, so an upload right after it could miss the newest scalars)."""

    def __init__(self, folder: str, purge_step: int | None):
        _import_summary_writer()  # tensorboardX, imported without torch
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._writer = EventsWriter(os.path.join(folder, "events"), _event_file_suffix())
        if purge_step is not None:  # what SummaryWriter(purge_step=...) writes first
            self._writer.write_event(Event(step=purge_step, file_version="brain.Event:2"))
            start = SessionLog(status=SessionLog.START)
            self._writer.write_event(Event(step=purge_step, session_log=start))

    def add_scalar(self, name: str, value: float, global_step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        event = Event(wall_time=time.time(), step=int(global_step), summary=scalar(name, value))
        self._writer.write_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Appends metric lines to `workdir/<filename>` (default metrics.jsonl) and scalars to
    `workdir/tensorboard`.

    Only process 0 writes (`enabled` defaults to `jax.process_index() == 0`); the other
    processes get a writer whose methods do nothing. A remote `workdir` is written at
    `flush()` and `close()` only (see the module doc).
    """

    def __init__(
        self,
        workdir: str,
        tensorboard: bool = True,
        enabled: bool | None = None,
        filename: str = METRICS_FILE,
    ):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.workdir = workdir
        self.path = storage.join(workdir, filename)
        self.enabled = enabled
        self.remote = storage.is_remote(workdir)
        self._use_tensorboard = tensorboard
        self._tb = None
        self._tb_local: str | None = None  # remote: the scratch folder of the events
        self._uploaded: dict[str, int] = {}  # remote: event file -> bytes uploaded
        self._purge_step: int | None = None
        self._lines: list[str] | None = None  # remote: the object's lines, once read
        self._dirty = False
        if enabled:
            storage.makedirs(workdir)

    def truncate_after(self, step: int) -> int:
        """Removes the lines with step > `step` (and a half-written last line).

        Call it on resume with the restored step (-1 when starting from scratch) before
        writing. Returns the number of lines removed. The file is replaced atomically.
        TensorBoard events after `step` are hidden through the writer's `purge_step`.
        """
        if not self.enabled:
            return 0
        self._purge_step = step + 1
        self._lines = None if not self.remote else []
        if not storage.exists(self.path):
            return 0
        text = storage.read_text(self.path)
        rows = _parse_lines(self.path, text)
        kept = [json.dumps(row) + "\n" for row in rows if row["step"] <= step]
        if self.remote:
            self._lines = kept
        removed = len(rows) - len(kept)
        if removed == 0 and (not text or text.endswith("\n")):
            return 0  # nothing to drop, no half-written line
        storage.write_atomic(self.path, "".join(kept))
        return removed

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        """Appends `{"step": step, **metrics}` (scalars); fsynced locally, kept for the next
        `flush()` remotely."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for name, value in metrics.items():
            if name == "step":
                raise ValueError("'step' is reserved; pass it as the step argument")
            row[name] = _to_python(name, value)
        line = json.dumps(row) + "\n"
        if self.remote:
            self._remote_lines().append(line)
            self._dirty = True
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        if self._use_tensorboard:
            tb = self._tensorboard()
            for name, value in row.items():
                if name != "step" and math.isfinite(value):
                    tb.add_scalar(name, value, global_step=row["step"])

    def _remote_lines(self) -> list[str]:
        """The lines of the remote file: read once (complete lines only) when the writer
        did not start with `truncate_after`, so that earlier lines are kept."""
        if self._lines is None:
            self._lines = []
            if storage.exists(self.path):
                rows = _parse_lines(self.path, storage.read_text(self.path))
                self._lines = [json.dumps(row) + "\n" for row in rows]
        return self._lines

    def _tensorboard(self):
        if self._tb is None:
            if self.remote:
                self._tb_local = tempfile.mkdtemp(prefix="thack-tensorboard-")
                self._tb = _EventFile(self._tb_local, self._purge_step)
            else:
                self._tb = _import_summary_writer()(
                    logdir=storage.join(self.workdir, TENSORBOARD_DIR),
                    purge_step=self._purge_step,
                    filename_suffix=_event_file_suffix(),
                )
        return self._tb

    def _upload_events(self) -> None:
        """Remote: copies each event file that grew since the last upload (whole: GCS has
        no append) to `<workdir>/tensorboard/`."""
        if self._tb_local is None:
            return
        for name in sorted(os.listdir(self._tb_local)):
            local = os.path.join(self._tb_local, name)
            size = os.path.getsize(local) if os.path.isfile(local) else None
            if size is not None and self._uploaded.get(name) != size:
                with open(local, "rb") as f:
                    storage.write_atomic(
                        storage.join(self.workdir, TENSORBOARD_DIR, name), f.read()
                    )
                self._uploaded[name] = size

    def flush(self) -> None:
        """Makes everything written so far durable: TensorBoard's buffer, and for a remote
        workdir one upload of the metrics file (when it changed) and of the event files."""
        if self._tb is not None:
            self._tb.flush()
        if not self.enabled or not self.remote:
            return
        if self._dirty:
            storage.write_atomic(self.path, "".join(self._remote_lines()))
            self._dirty = False
        self._upload_events()

    def close(self) -> None:
        """Flushes, closes TensorBoard and (remote) removes the local scratch folder."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.flush()
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Prints `step N/T | loss x | steps/s | ETA` at most every `every_secs` seconds.

    The rate (and the ETA) is measured over the steps since the previous line, starting
    from the first step seen: that step's call only marks the start, so the compilation
    before it (or a resume's restore) never enters a rate or an ETA.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        every_secs: float = 5.0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ):
        self.total_steps = total_steps
        self.every_secs = every_secs
        self.stream = stream
        self.enabled = enabled
        self._last_time = time.monotonic()
        self._last_step = start_step
        self._started = False

    def update(self, step: int, metrics: Mapping[str, float] | None = None, force=False):
        """Returns the printed line, or None when it is not yet time for one."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if not self._started:  # the first step: compiled and run; rates start here
            self._started = True
            self._last_time, self._last_step = now, step
            return None
        elapsed = now - self._last_time
        if not force and elapsed < self.every_secs:
            return None
        rate = (step - self._last_step) / elapsed if elapsed > 0 else float("nan")
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.total_steps}"]
        if metrics and "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4g}")
        parts += [f"{rate:.2f} steps/s", f"ETA {_format_duration(eta)}"]
        line = " | ".join(parts)
        print(line, file=self.stream or sys.stderr, flush=True)
        self._last_time, self._last_step = now, step
        return line

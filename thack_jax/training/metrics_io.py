"""Metric files: JSON lines (`workdir/metrics.jsonl`), TensorBoard scalars, progress lines.

Each line of metrics.jsonl is one JSON object `{"step": int, "<name>": float, ...}`. Lines are
flushed and fsynced when written, so a crash loses at most the line being written. After a
restart from a checkpoint at step s, `truncate_after(s)` drops every line with step > s (and
a half-written last line), so that once the run finishes each step appears exactly once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import numpy as np

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
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        return _parse_lines(path, f.read())


class MetricsWriter:
    """Appends metric lines to `workdir/<filename>` (default metrics.jsonl) and scalars to
    `workdir/tensorboard`.

    Only process 0 writes (`enabled` defaults to `jax.process_index() == 0`); the other
    processes get a writer whose methods do nothing.
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
        self.path = os.path.join(workdir, filename)
        self.enabled = enabled
        self._use_tensorboard = tensorboard
        self._tb = None
        self._purge_step: int | None = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)

    def truncate_after(self, step: int) -> int:
        """Removes the lines with step > `step` (and a half-written last line).

        Call it on resume with the restored step (-1 when starting from scratch) before
        writing. Returns the number of lines removed. The file is replaced atomically.
        TensorBoard events after `step` are hidden through the writer's `purge_step`.
        """
        if not self.enabled:
            return 0
        self._purge_step = step + 1
        if not os.path.exists(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        rows = _parse_lines(self.path, text)
        kept = [row for row in rows if row["step"] <= step]
        removed = len(rows) - len(kept)
        if removed == 0 and (not text or text.endswith("\n")):
            return 0  # nothing to drop, no half-written line
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return removed

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        """Appends `{"step": step, **metrics}` (scalars) and fsyncs it."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for name, value in metrics.items():
            if name == "step":
                raise ValueError("'step' is reserved; pass it as the step argument")
            row[name] = _to_python(name, value)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._use_tensorboard:
            tb = self._tensorboard()
            for name, value in row.items():
                if name != "step" and math.isfinite(value):
                    tb.add_scalar(name, value, global_step=row["step"])

    def _tensorboard(self):
        if self._tb is None:
            SummaryWriter = _import_summary_writer()
            self._tb = SummaryWriter(
                logdir=os.path.join(self.workdir, TENSORBOARD_DIR), purge_step=self._purge_step
            )
        return self._tb

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

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

    The rate is measured over the steps since the previous line, so compilation time only
    slows the first line down.
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

    def update(self, step: int, metrics: Mapping[str, float] | None = None, force=False):
        """Returns the printed line, or None when it is not yet time for one."""
        if not self.enabled:
            return None
        now = time.monotonic()
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

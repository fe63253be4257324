"""SIGTERM / SIGINT as a request to stop cleanly, shared by the whole process.

Preemptible and spot VMs, schedulers and `timeout` send SIGTERM and give the process a
grace period; Ctrl-C sends SIGINT. Inside `handling()`, the first of either signal only sets
a flag: the training loop finishes its current step and checkpoints it, other long stages
stop at their next safe point, and `Interrupted` travels up to the entry point, which exits
non-zero with "interrupted, rerun to resume". Nothing that saw the flag writes a completion
marker. A second signal restores the default handler and re-sends itself, so a user who
presses Ctrl-C twice stops at once (work is still safe: every artifact is written
atomically and resumable).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []  # signal numbers received while handling() is active
_depth = [0]  # nesting of handling(): only the outermost installs and restores


class Interrupted(Exception):
    """The process was asked to stop (SIGTERM / SIGINT); the work so far is saved."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} {where}; rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process stopped by that signal."""
        return 128 + self.signum


def requested() -> int | None:
    """The first signal received inside handling(), or None."""
    return _received[0] if _received else None


def check(where: str) -> None:
    """Raises Interrupted if a stop was requested; call it at a stage's safe points."""
    signum = requested()
    if signum is not None:
        raise Interrupted(signum, where)


def _handle(signum, frame):
    if _received:
        logger.warning("%s again: stopping now", signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    logger.warning(
        "%s received: finishing the current step, saving, then stopping "
        "(send it again to stop at once)",
        signal.Signals(signum).name,
    )


@contextmanager
def handling():
    """Turns SIGTERM / SIGINT into a stop request inside the block (main thread only:
    Python delivers signals there; elsewhere the default handlers stay)."""
    outermost = _depth[0] == 0
    installed = {}
    if outermost:
        _received.clear()
        if threading.current_thread() is threading.main_thread():
            installed = {s: signal.signal(s, _handle) for s in SIGNALS}
        else:
            logger.warning("not in the main thread: SIGTERM/SIGINT will not checkpoint")
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for s, old in installed.items():
            signal.signal(s, old)

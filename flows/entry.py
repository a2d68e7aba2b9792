"""The ``segpipe`` console script: a Ctrl-C or a SIGTERM while the command line is still
importing (numba, Prefect: a second or more) ends it with one line, as one later does;
and the main thread's waits, which hear such a signal within `STEP` seconds."""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

__all__ = ["STEP", "Terminated", "main", "terminate", "wait"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command stops as after Ctrl-C."""


def terminate(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: raise `Terminated`, once (a second SIGTERM is ignored while
    the clean-up finishes)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


STEP = 0.2  # seconds the main thread may take to hear a signal that another thread caught


def wait(done: threading.Event, timeout: float | None = None) -> bool:
    """Wait for ``done`` in steps of `STEP` seconds; whether it was set in ``timeout``.

    Linux hands a signal to any thread of the process that does not block it, and
    Python runs the handler when the main thread next runs: a wait without a timeout
    hears a Ctrl-C that another thread caught only when it ends.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done.wait(STEP):
        if deadline is not None and time.monotonic() >= deadline:
            return False
    return True


def main() -> None:
    """Import the command line, then run it."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    try:
        from flows.cli import main as run
    except KeyboardInterrupt as err:
        sys.stderr.write("interrupted\n")
        raise SystemExit(143 if isinstance(err, Terminated) else 130) from None
    run()

"""The ``segpipe`` console script: a Ctrl-C or a SIGTERM while the command line is still
importing (numba, Prefect: a second or more) ends it with one line, as one later does."""

from __future__ import annotations

import signal
import sys
from types import FrameType

__all__ = ["Terminated", "main", "terminate"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command stops as after Ctrl-C."""


def terminate(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: raise `Terminated`, once (a second SIGTERM is ignored while
    the clean-up finishes)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


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

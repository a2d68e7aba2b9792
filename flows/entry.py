"""The ``segpipe`` console script: a Ctrl-C or a SIGTERM while the command line is still
importing (numba, Prefect: a second or more) ends it with one line, as one later does."""

from __future__ import annotations

import signal
import sys
from types import FrameType

__all__ = ["main"]


class _Terminated(KeyboardInterrupt):
    pass


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def main() -> None:
    """Import the command line, then run it."""
    ours = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        from flows.cli import main as run
    except KeyboardInterrupt as err:
        sys.stderr.write("interrupted\n")
        raise SystemExit(143 if isinstance(err, _Terminated) else 130) from None
    if ours:  # `flows.cli.main` installs its own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run()

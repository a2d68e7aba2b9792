"""The ``segpipe`` console script: a Ctrl-C while the command line is still importing
(numba, Prefect: a second or more) ends it with one line, as one later does."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Import the command line, then run it."""
    try:
        from flows.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    run()

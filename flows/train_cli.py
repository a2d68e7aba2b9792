"""``segpipe train``: registered on the CLI by `register`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

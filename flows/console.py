"""The CLI's consoles and its one way to fail: shared by every command module."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console(stderr=True)  # progress, errors
out = Console()  # results


def fail(err: BaseException, code: int = 1) -> NoReturn:
    """Print ``error: <err>`` as one line on stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

"""The CLI's consoles and its ways to end: one line on stderr for every error and interrupt."""

from __future__ import annotations

import datetime as dt
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn, TextIO

import typer
from rich.console import Console

console = Console(stderr=True)  # progress, errors
out = Console()  # results

INTERRUPTED = "interrupted; rerun with --resume to continue"
KEEP_LOGS = 20
"""Traceback logs kept in `log_dir`; older ones are removed when a new one is written."""


class _CurrentStderr:
    """``sys.stderr`` as it is at each write, not as it was when a handler was built.

    Prefect's console log handler keeps the stream it was configured with; a stream
    swapped in for a while (a test runner's capture) is closed when it is swapped out,
    and a later log record then fails with "I/O operation on closed file".
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stderr, name)


stderr: TextIO = _CurrentStderr()  # type: ignore[assignment]
"""What Prefect's console handler writes to (``PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM``)."""


def fail(err: BaseException, code: int = 1) -> NoReturn:
    """Print ``error: <err>`` as one line on stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def interrupted(code: int = 130, *, resume: bool = True) -> NoReturn:
    """Print the one line of an interrupted command (with how to go on from there if
    ``resume``) and exit with ``code`` (128 + the signal's number)."""
    console.print(f"[bold red]{INTERRUPTED if resume else 'interrupted'}[/]", highlight=False)
    raise typer.Exit(code)


def log_dir() -> Path:
    """Where tracebacks of unexpected errors go: ``SEGPIPE_LOG_DIR``, else ``~/.segpipe/logs``."""
    return Path(os.environ.get("SEGPIPE_LOG_DIR") or Path.home() / ".segpipe" / "logs")


def write_traceback(err: BaseException) -> Path:
    """Write ``err``'s traceback (and the command line) to a new file of `log_dir`.

    The directory is made 0700 and the file 0600: a traceback shows paths and
    parameters. Only the newest `KEEP_LOGS` files are kept.
    """
    directory = log_dir().expanduser()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"segpipe-{stamp}-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"segpipe {' '.join(sys.argv[1:])}\n\n")
        fh.write("".join(traceback.format_exception(err)))
    logs = sorted(directory.glob("segpipe-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-KEEP_LOGS]:
        old.unlink(missing_ok=True)
    return path


def crash(err: BaseException, code: int = 1) -> NoReturn:
    """The last resort for an error segpipe did not expect: one line on stderr,
    ``error: <type>: <message> (traceback in <log file>)``, and exit with ``code``."""
    kind = type(err).__qualname__
    if type(err).__module__ not in ("builtins", "__main__"):
        kind = f"{type(err).__module__.split('.')[0]}.{kind}"
    message = " ".join(str(err).split())
    if len(message) > 400:
        message = message[:400] + "…"
    try:
        where = f"traceback in {write_traceback(err)}"
    except OSError as again:  # the disk that failed the run, perhaps
        where = f"no traceback saved: {again.strerror or again}"
    text = f"{kind}: {message}" if message else kind
    console.print(f"[bold red]error:[/] {text} ({where})", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

"""Prefect flows and the ``segpipe`` command line: orchestration around the ``segpipe`` library.

Prefect reads its settings at import: defaults that keep a laptop run
self-contained are set here, before any flow module imports Prefect.
"""

from __future__ import annotations

import functools
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

_DEFAULT_HOME = Path.home() / ".segpipe" / "prefect"
os.environ.setdefault("PREFECT_HOME", str(_DEFAULT_HOME))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The embedded API migrates a new SQLite database at first start: on a busy
# 2-core machine that can exceed Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The terminal shows a progress bar and one line per error: Prefect's run logs (with
# their tracebacks) go to its API and UI, and its two terminal handlers (the console,
# which is the root logger's, and "debug", its internal errors such as an unreachable
# API's) print only what is critical (`segpipe -v` shows the rest). Both write to
# sys.stderr as it is at each record, not to the stream they found at set-up, which
# may be closed since (a test runner's).
for _handler in ("CONSOLE", "DEBUG"):
    os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{_handler}_LEVEL", "CRITICAL")
    os.environ.setdefault(
        f"PREFECT_LOGGING_HANDLERS_{_handler}_STREAM", "ext://flows.console.stderr"
    )


def _private_home(home: Path) -> None:
    """Create PREFECT_HOME (without it an embedded API fails to start); keep the API's
    database, which holds every run's parameters, readable by this user only."""
    default = home == _DEFAULT_HOME.expanduser()
    for directory in ([home.parent] if default else []) + [home]:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if default:  # a PREFECT_HOME of the user's choice keeps its mode
            _chmod(directory, 0o700)
    for path in home.glob("prefect.db*"):  # the database and its -wal/-shm journals
        _chmod(path, 0o600)


def _chmod(path: Path, mode: int) -> None:
    try:
        if stat.S_IMODE(path.stat().st_mode) != mode and path.stat().st_uid == os.getuid():
            path.chmod(mode)
    except OSError:
        pass  # another user's file, or gone: nothing of ours to protect


_private_home(Path(os.environ["PREFECT_HOME"]).expanduser())

# The embedded API's process: files it creates are this user's only (umask 077), it
# asks the kernel to stop it when the thread that started it exits (PR_SET_PDEATHSIG,
# Linux), and it quits at once if that already happened. Then it becomes uvicorn.
_WITH_PARENT = """\
import ctypes, os, signal, sys
os.umask(0o077)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


def start_embedded_api() -> None:
    """Start Prefect's embedded API now, unless ``PREFECT_API_URL`` names one.

    Prefect starts the same server on first use, in the process group of the command:
    a Ctrl-C in the terminal then stops the API while the flow still reports to it
    (minutes of retries, a screen of tracebacks), and a killed command leaves it
    running. Started here, it runs in a session of its own (no terminal signal reaches
    it), stops when this process exits (Prefect's atexit, or the kernel on Linux after
    SIGKILL), and creates its database 0600. Call it from the main thread: the kernel
    signal follows the thread that started the server.
    """
    from prefect.server.api import server as api
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    running = api.SubprocessASGIServer._instances.get(None)
    if running is not None and running.running:
        return
    api.SubprocessASGIServer._instances.pop(None, None)
    # Prefect keeps one server per port (None: any free one): its own calls get this one
    _embedded_api_class()().start()


@functools.cache
def _embedded_api_class() -> type[Any]:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class EmbeddedAPI(SubprocessASGIServer):
        """Prefect's ephemeral API server (as ``SubprocessASGIServer`` runs it in Prefect
        3.9), started by `_WITH_PARENT` in a new session."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect

            env = {
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            uvicorn = [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ]
            return subprocess.Popen(
                [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *uvicorn],
                env=env,
                start_new_session=True,
            )

    return EmbeddedAPI

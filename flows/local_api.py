"""Prefect's API for the runs of one machine: started by the first run, shared by the next.

With no ``PREFECT_API_URL``, Prefect starts an API server inside each command,
and every run waits seconds for its imports and database checks before the
first block. ``segpipe run`` instead starts one server per ``PREFECT_HOME``, in
a session of its own (a Ctrl-C in the terminal never reaches it), and later
runs reuse it. The server exits once no segpipe process has used it for
`idle_seconds` (``SEGPIPE_API_IDLE``, default 600 s).

Files in ``PREFECT_HOME``, all this user's only:

- ``segpipe-api.json``: the server's address, process id and versions;
- ``segpipe-api.lock``: held while one run checks for or starts the server;
- ``segpipe-api-users/<pid>``: one per process using it (a run may send no
  request for minutes while a large block computes; the server waits for it);
- ``segpipe-api.log``: what the server printed.

Server side: ``python -m flows.local_api PORT``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LocalApi", "configured", "idle_seconds", "status", "use"]

STATE = "segpipe-api.json"
LOCK = "segpipe-api.lock"
USERS = "segpipe-api-users"
LOG = "segpipe-api.log"


def idle_seconds() -> float:
    """How long the server stays up with no segpipe process using it."""
    return float(os.environ.get("SEGPIPE_API_IDLE", "600"))


def _home() -> Path:
    return Path(os.environ["PREFECT_HOME"]).expanduser()


def _versions() -> dict[str, str]:
    """What a reused server must share with this process (read without importing Prefect)."""
    from importlib.metadata import version

    return {"prefect": version("prefect"), "python": sys.executable}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's
        return False
    return True


def _ours(pid: int) -> bool:
    """Whether ``pid`` is a local API server (a process id in a state file that outlived
    a reboot may name anything)."""
    import psutil

    try:
        return "flows.local_api" in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalApi:
    """The machine's local API as this process found it: reused, or started by it."""

    url: str
    pid: int
    started: bool

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def wait(self, timeout: float = 120.0) -> None:
        """Until the API answers (short waits: a Ctrl-C still interrupts).

        A reused server that exits meanwhile (it had been idle for `idle_seconds`) is
        started again on its port: Prefect already holds its address.

        Raises
        ------
        RuntimeError
            If its process ended or it did not answer within ``timeout`` seconds,
            with the last line of its log.
        """
        deadline = time.monotonic() + timeout
        while not _healthy(self.url, timeout=0.5):
            if not _alive(self.pid) and not self.started:
                with _locked(_home()):
                    self.pid = _start(_home(), _versions(), port=self.port).pid
                self.started = True
            elif not _alive(self.pid) or time.monotonic() > deadline:
                why = "exited" if not _alive(self.pid) else f"did not answer in {timeout:.0f} s"
                raise RuntimeError(
                    f"Prefect's local API ({self.url}, pid {self.pid}) {why}: "
                    f"{_last_line(_home() / LOG)} (see {_home() / LOG}); "
                    "or set PREFECT_API_URL to a running Prefect server"
                )
            time.sleep(0.1)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """The start-up lock: one process at a time checks for or starts the server."""
    with open(home / LOCK, "a") as lock:
        os.chmod(home / LOCK, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no output"


def _register(home: Path) -> None:
    """Note this process as a user of the server until it exits."""
    import atexit

    users = home / USERS
    users.mkdir(mode=0o700, exist_ok=True)
    mine = users / str(os.getpid())
    mine.touch(mode=0o600)
    atexit.register(lambda: mine.unlink(missing_ok=True))


def configured() -> bool:
    """Whether Prefect is told of an API server, so no local one is wanted: by
    ``PREFECT_API_URL``, the active profile (``profiles.toml`` in ``PREFECT_HOME``),
    ``prefect.toml`` or ``pyproject.toml`` here, or, once Prefect is imported (a test
    harness, a notebook), its settings. Read without importing Prefect."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())
    import tomllib

    def table(path: Path) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            return {}

    profiles_path = os.environ.get("PREFECT_PROFILES_PATH") or _home() / "profiles.toml"
    profiles = table(Path(profiles_path).expanduser())
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    if profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"):
        return True
    here = table(Path("prefect.toml")).get("api", {})
    project = table(Path("pyproject.toml")).get("tool", {}).get("prefect", {}).get("api", {})
    return bool(here.get("url") or project.get("url"))


def _running(home: Path, versions: dict[str, str]) -> LocalApi | None:
    """The server the state file names, if it is one of these versions and alive."""
    try:
        state = json.loads((home / STATE).read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if state.get("versions") != versions or not isinstance(pid, int) or not _ours(pid):
        return None
    return LocalApi(str(state["url"]), pid, started=False)


def status() -> str:
    """What a run would find, starting nothing: ``remote`` (``PREFECT_API_URL`` names a
    server), ``running`` (the local API, to reuse), ``stopped`` (its database is there)
    or ``new`` (no database yet)."""
    if configured():
        return "remote"
    home = _home()
    if _running(home, _versions()) is not None:
        return "running"
    return "stopped" if (home / "prefect.db").exists() else "new"


def use() -> LocalApi:
    """The local API of ``PREFECT_HOME``: the running one if it is of these versions,
    else one started now, in the background (`LocalApi.wait` for it).

    Sets ``PREFECT_API_URL`` for this process: call it before Prefect is imported.
    """
    home = _home()
    _register(home)
    versions = _versions()
    with _locked(home):  # a second run waits here while the first starts it
        api = _running(home, versions) or _start(home, versions)
    os.environ["PREFECT_API_URL"] = api.url
    return api


# The server is started by a launcher that exits at once: it is no child of the run
# (which may end first), and in a session of its own no terminal signal reaches it.
_LAUNCH = """\
import subprocess, sys
server = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=2, stderr=2,
                          start_new_session=True)
print(server.pid)
"""


def _start(home: Path, versions: dict[str, str], *, port: int | None = None) -> LocalApi:
    port = port or _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    log = os.open(home / LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        launched = subprocess.run(
            [
                sys.executable,
                "-S",
                "-c",
                _LAUNCH,
                sys.executable,
                "-m",
                "flows.local_api",
                str(port),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            check=True,
        )
    finally:
        os.close(log)
    pid = int(launched.stdout)
    url = f"http://127.0.0.1:{port}/api"
    state = {"url": url, "pid": pid, "versions": versions}
    tmp = home / f"{STATE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    tmp.replace(home / STATE)
    return LocalApi(url, pid, started=True)


# --- the server process ---------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Touched:
    """The Prefect app, noting when it last had a request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.last = time.monotonic()
        await self.app(scope, receive, send)


def _users(home: Path) -> int:
    """Processes registered as users that are still alive (stale entries removed)."""
    count = 0
    for entry in (home / USERS).glob("*"):
        if entry.name.isdigit() and _alive(int(entry.name)):
            count += 1
        else:
            entry.unlink(missing_ok=True)
    return count


def _serve(port: int) -> None:
    os.umask(0o077)  # its database holds every run's parameters
    os.environ.update(
        {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    )
    import uvicorn
    from prefect.server.api.server import create_app

    home = _home()
    touched = _Touched(create_app(ephemeral=True, final=True))
    server = uvicorn.Server(
        uvicorn.Config(touched, host="127.0.0.1", port=port, log_level="error", lifespan="on")
    )
    idle = idle_seconds()

    def watch() -> None:
        while not server.should_exit:
            time.sleep(min(1.0, idle / 4))
            if _users(home) == 0 and time.monotonic() - touched.last > idle:
                server.should_exit = True

    threading.Thread(target=watch, name="idle", daemon=True).start()
    try:
        server.run()
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((home / STATE).read_text()).get("pid") == os.getpid():
                (home / STATE).unlink()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))

"""Shared fixtures: one real LocalCluster and one Prefect test API per session."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# A suite started in the background by a non-interactive shell (as CI may start it)
# inherits SIGINT ignored, and so would every process it starts: the Ctrl-C tests'
# runs would not hear theirs. Python's own handler is put back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Prefect reads its settings at import: give the session its own home first, and
# tracebacks of unexpected errors a folder of their own.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="segpipe-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SEGPIPE_LOG_DIR", tempfile.mkdtemp(prefix="segpipe-logs-"))
# `segpipe run` subprocesses share the session's local Prefect API; it exits a minute
# after the last of them, not ten
os.environ.setdefault("SEGPIPE_API_IDLE", "60")
# segpipe's Prefect defaults (flows/__init__.py) before any test module imports Prefect:
# its console log handler then follows sys.stderr instead of keeping the stream it
# found, which pytest and CliRunner close after a test.
import flows  # noqa: F401


@pytest.fixture(scope="session")
def cluster_address() -> Iterator[str]:
    """Address of a real LocalCluster (one worker process, two threads) on loopback."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def client(cluster_address: str) -> Iterator[object]:
    from distributed import Client

    with Client(cluster_address) as c:
        yield c


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """Prefect's test harness (a real, temporary API on SQLite), started once."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def run_cli(prefect_api: None, cluster_address: str):  # type: ignore[no-untyped-def]
    """Invoke ``segpipe`` in-process (real Prefect API, real cluster); returns the Result."""
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()

    def invoke(*args: str, cluster: bool = True):  # type: ignore[no-untyped-def]
        argv = ["run", "--quiet", *args]
        if cluster and args and args[0] != "--config":
            argv += ["--cluster", cluster_address]
        return runner.invoke(app, argv, catch_exceptions=False)

    invoke.cluster_address = cluster_address  # type: ignore[attr-defined]
    return invoke


@pytest.fixture
def tiff(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write an array as a TIFF in tmp_path and return the path."""
    import tifffile

    def write(name: str, data: np.ndarray, **kwargs: object) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, data, **kwargs)
        return path

    return write


@pytest.fixture
def tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Mount a small tmpfs of ``size`` (e.g. "3m") in tmp_path; unmounted after the test."""
    import subprocess

    mounts: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounts)}"
        mnt.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

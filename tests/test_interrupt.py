"""Ctrl-C, SIGTERM and SIGKILL of a running ``segpipe run``, as real processes.

A Ctrl-C (SIGINT to the terminal's process group) or a SIGTERM stops the run in
seconds with one line, releases the output, and leaves no process of its own
behind: no Dask worker. Prefect's local API (`flows.local_api`, in a session of
its own) records the run's end, stays for the runs that follow, and exits once
idle. After a SIGKILL, which nothing can catch, the workers still go with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from flows.console import INTERRUPTED
from segpipe import synthetic

pytestmark = pytest.mark.integration

SEGPIPE = str(Path(sys.executable).parent / "segpipe")
WATERSHED = ("-s", "watershed", "--tile", "512")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 Mpx of watershed: some 10 s of compute on 2 cores, the signal comes at ~1 s
    return synthetic.write_tiff(tmp_path_factory.mktemp("in") / "big.tif", (4096, 4096), seed=3)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home of its own: segpipe's default PREFECT_HOME (~/.segpipe/prefect) in it."""
    return tmp_path_factory.mktemp("home")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SEGPIPE_"))}
    env["HOME"] = str(home)  # no PREFECT_API_URL: the local API, as on a laptop
    env["SEGPIPE_API_IDLE"] = str(IDLE)
    return env


IDLE = 3  # seconds the local API stays up unused


def _local_api(home: Path) -> tuple[str, psutil.Process]:
    """The address and process of the local API the runs of ``home`` share."""
    state = json.loads((home / ".segpipe" / "prefect" / "segpipe-api.json").read_text())
    return state["url"], psutil.Process(state["pid"])


class Run:
    """``segpipe run`` in a session of its own (its own process group, as in a terminal)."""

    def __init__(self, image: Path, out: Path, home: Path) -> None:
        self.out, self.home = out, home
        # files, not pipes: a process that outlived the run would hold a pipe open
        self.stderr = out.with_name("stderr.txt")
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [SEGPIPE, "run", "-q", "-i", str(image), "-o", str(out), *WATERSHED],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_env(home),
                start_new_session=True,
            )
        self.children: list[psutil.Process] = []

    def wait_until_working(self) -> None:
        """Until the image's first stage runs; then note every process the run started."""
        deadline = time.monotonic() + 180  # a new Prefect database migrates first
        while not (self.out / "big").exists():
            assert self.proc.poll() is None, self.stderr.read_text()
            assert time.monotonic() < deadline, "the run never started its first stage"
            time.sleep(0.1)
        time.sleep(1.0)
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in self.children]
        assert any("spawn_main" in c for c in commands), commands  # a Dask worker
        _, api = _local_api(self.home)
        assert "flows.local_api" in api.cmdline()
        assert api not in self.children and os.getsid(api.pid) != os.getsid(self.proc.pid)

    def signal(self, signum: int, *, group: bool = False) -> tuple[int, str, float]:
        """Send ``signum``; the exit code, stderr and the seconds the run took to end."""
        t0 = time.monotonic()
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.stderr.read_text(), time.monotonic() - t0

    def survivors(self, timeout: float) -> list[str]:
        """Processes the run started that are still alive after ``timeout`` seconds."""
        _, alive = psutil.wait_procs(self.children, timeout=timeout)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        names = [" ".join(p.cmdline()[:4]) for p in alive]
        for p in alive:
            p.kill()
        return names

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.survivors(0)


@pytest.fixture
def run(image: Path, home: Path, tmp_path: Path) -> Iterator[Run]:
    r = Run(image, tmp_path / "out.zarr", home)
    yield r
    r.close()


def _stopped_cleanly(r: Run, code: int, err: str, seconds: float, expected: int) -> None:
    assert code == expected, err
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    lines = err.strip().splitlines()
    assert lines[-1] == INTERRUPTED, err
    # the run's header, how long it took to start, that the image states no pixel size,
    # and the one line: no traceback
    assert len(lines) == 4 and lines[0].startswith("segpipe: 1 image(s)"), err
    assert lines[1].startswith("started in "), err
    assert lines[2].endswith(": no pixel size stated; scales and tables are in pixels "
        "(--pixel-size or pixel_size: in run.yaml gives one)"), err  # fmt: skip
    assert not (r.out / "_segpipe" / "lock.json").exists()  # the output is free again
    assert r.survivors(5) == []


def test_ctrl_c_stops_in_seconds_with_one_line(run: Run, home: Path) -> None:
    run.wait_until_working()
    url, api = _local_api(home)
    code, err, seconds = run.signal(signal.SIGINT, group=True)  # what a terminal's Ctrl-C does
    _stopped_cleanly(run, code, err, seconds, 130)
    # the local API outlived the Ctrl-C and recorded the end of the run
    runs = httpx.post(f"{url}/flow_runs/filter", json={"limit": 5}, timeout=10).json()
    assert runs and all(r["state_type"] not in ("RUNNING", "PENDING") for r in runs), runs
    # then, unused, it exits and says so
    assert psutil.wait_procs([api], timeout=IDLE + 15)[1] == []
    assert not (home / ".segpipe" / "prefect" / "segpipe-api.json").exists()
    # the Prefect database holds every run's parameters: this user's only
    prefect = home / ".segpipe" / "prefect"
    assert oct((home / ".segpipe").stat().st_mode & 0o777) == "0o700"
    assert oct(prefect.stat().st_mode & 0o777) == "0o700"
    databases = list(prefect.glob("prefect.db*"))
    assert databases
    for path in databases:
        assert oct(path.stat().st_mode & 0o777) == "0o600", path


@pytest.mark.parametrize("after", [0.0, 0.7])
def test_sigterm_while_the_run_starts_stops_it_in_seconds(run: Run, after: float) -> None:
    """While the LocalCluster and the local API start: no half-started cluster, the
    output free again, one line."""
    deadline = time.monotonic() + 60
    while "segpipe: 1 image(s)" not in run.stderr.read_text():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.stderr.read_text()
        time.sleep(0.02)
    time.sleep(after)
    run.children = psutil.Process(run.proc.pid).children(recursive=True)
    code, err, seconds = run.signal(signal.SIGTERM)
    assert (code, err.strip().splitlines()[-1]) == (143, INTERRUPTED), err
    assert seconds < 10 and "Traceback" not in err, err
    assert not (run.out / "_segpipe" / "lock.json").exists()
    assert run.survivors(5) == []


@pytest.mark.slow
def test_sigterm_stops_in_seconds_with_one_line(run: Run) -> None:
    run.wait_until_working()
    code, err, seconds = run.signal(signal.SIGTERM)
    _stopped_cleanly(run, code, err, seconds, 143)


@pytest.mark.slow
def test_sigkill_takes_the_workers_along_and_the_api_idles_out(run: Run, home: Path) -> None:
    run.wait_until_working()
    _, api = _local_api(home)
    code, _, _ = run.signal(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert run.survivors(10) == []
    assert psutil.wait_procs([api], timeout=IDLE + 15)[1] == []

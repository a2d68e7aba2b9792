"""Workers that cannot run segpipe are named before any compute, and so are workers
that join later: real `dask scheduler` / `dask worker` processes, one of them from an
environment where segpipe cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client

from segpipe import synthetic
from segpipe.workers import WorkerMismatchError, check_workers
from tests.helpers import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
WITHOUT_SEGPIPE = Path(__file__).with_name("data") / "worker_without_segpipe.py"


class Cluster:
    """A scheduler and the workers started on it; all stopped at the end."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen[bytes]] = []
        port = self.address.rsplit(":", 1)[1]
        self._start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port])

    def _start(self, cmd: list[str]) -> None:
        out = subprocess.DEVNULL
        self.procs.append(
            subprocess.Popen([*cmd, "--no-dashboard"], cwd=self.cwd, stdout=out, stderr=out)
        )

    def worker(self, *, segpipe: bool) -> None:
        """Start a worker, with segpipe or without it, and wait until it has joined."""
        launcher = (
            [str(BIN / "dask"), "worker"] if segpipe else [sys.executable, str(WITHOUT_SEGPIPE)]
        )
        with Client(self.address, timeout="30s") as client:
            before = len(client.scheduler_info()["workers"])
            self._start([*launcher, self.address, "--nthreads", "1", "--host", "127.0.0.1"])
            client.wait_for_workers(before + 1, timeout=60)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    deadline = time.monotonic() + 60
    while True:  # the scheduler answers
        try:
            Client(c.address, timeout="2s").close()
            break
        except OSError:
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.3)
    yield c
    c.stop()


def test_a_worker_without_segpipe_is_named_before_any_compute(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.worker(segpipe=True)
    cluster.worker(segpipe=False)
    image = synthetic.write_tiff(tmp_path / "img.tif", (300, 260), seed=1)
    t0 = time.monotonic()
    done = subprocess.run(
        [
            str(BIN / "segpipe"),
            "run",
            "-q",
            "-i",
            str(image),
            "-o",
            str(tmp_path / "o.zarr"),
            "--cluster",
            cluster.address,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - t0 < 60
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: 1 of 2 Dask worker(s) do not match"), done.stderr
    assert "cannot run segpipe (ModuleNotFoundError: No module named 'segpipe')" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "o.zarr").glob("img/0")), "computed on an unfit cluster"


def test_a_worker_that_joins_later_is_checked(cluster: Cluster) -> None:
    cluster.worker(segpipe=True)
    with Client(cluster.address, timeout="30s") as client:
        checked = check_workers(client)
        assert len(checked) == 1
        assert check_workers(client, checked) == checked  # nothing new: nothing asked
        cluster.worker(segpipe=False)
        with pytest.raises(WorkerMismatchError, match=r"^1 of 1 Dask worker\(s\)") as err:
            check_workers(client, checked)
        assert next(iter(checked)) not in str(err.value)  # only the newcomer is named


def test_losing_the_scheduler_is_one_line_and_resume_finishes(
    cluster: Cluster, tmp_path: Path
) -> None:
    import signal

    import zarr

    cluster.worker(segpipe=True)
    image = synthetic.write_tiff(tmp_path / "img.tif", (2048, 2048), seed=2)
    out = tmp_path / "o.zarr"
    args = [str(BIN / "segpipe"), "run", "-q", "-i", str(image), "-o", str(out)]
    args += ["-s", "watershed", "--tile", "256", "--cluster", cluster.address]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    markers = out / "_segpipe" / "blocks" / "img"
    deadline = time.monotonic() + 120
    while not list(markers.glob("*/*.npz")):  # blocks are finishing
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.1)
    cluster.procs[0].send_signal(signal.SIGKILL)  # the scheduler dies
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    # the run's header, its start-up, that the image states no pixel size, one line
    lines = err.strip().splitlines()
    assert (
        len(lines) == 4
        and "no pixel size stated" in lines[2]
        and lines[-1]
        == (
            f"error: lost the Dask scheduler {cluster.address} (it stopped answering); the "
            "blocks and images that finished are kept: rerun with --resume once it is back"
        )
    ), err
    assert not (out / "_segpipe" / "lock.json").exists()  # the output is free again

    # a scheduler at the same address again, and a worker: --resume finishes the image
    port = cluster.address.rsplit(":", 1)[1]
    cluster._start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port])
    cluster.worker(segpipe=True)
    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert zarr.open_group(str(out / "img"), mode="r").attrs["segpipe"]["complete"] is True


def _segpipe(cluster: Cluster, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    image = synthetic.write_tiff(tmp_path / "img.tif", (512, 512), seed=5)
    args = [str(BIN / "segpipe"), "run", "-q", "-i", str(image), "-o", str(tmp_path / "o.zarr")]
    args += ["--tile", "256", "--cluster", cluster.address, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until_line(run: subprocess.Popen[str], start: str) -> list[str]:
    """stderr's lines up to the first that starts with ``start``."""
    assert run.stderr is not None
    lines: list[str] = []
    while not (lines and lines[-1].startswith(start)):
        line = run.stderr.readline()
        assert line, (run.wait(), lines)
        lines.append(line.rstrip("\n"))
    return lines


def test_a_cluster_without_workers_is_waited_for_within_a_bound(
    cluster: Cluster, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("worker_wait: 3\n")
    run = _segpipe(cluster, tmp_path, "--config", str(config))
    waiting = f"no Dask worker on {cluster.address}: waiting up to 3 s for one (worker_wait)"
    assert _until_line(run, "no Dask worker")[-1] == waiting
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1, err
    assert err.strip().splitlines() == [
        f"error: no Dask worker on {cluster.address} for 3 s (worker_wait); the blocks and "
        f"images that finished are kept: start workers, e.g. `dask worker {cluster.address}`, "
        "and rerun with --resume"
    ], err
    assert not (tmp_path / "o.zarr" / "_segpipe" / "lock.json").exists()


def test_a_worker_that_joins_ends_the_wait_and_sigterm_ends_it_in_seconds(
    cluster: Cluster, tmp_path: Path
) -> None:
    import signal

    import zarr

    from flows.console import INTERRUPTED

    first = tmp_path / "first"
    run = _segpipe(cluster, first.mkdir() or first)
    _until_line(run, "no Dask worker")
    cluster.worker(segpipe=True)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0 and f"a Dask worker joined {cluster.address}; going on" in err
    assert zarr.open_group(str(first / "o.zarr" / "img"), mode="r").attrs["segpipe"]["complete"]

    for proc in cluster.procs[1:]:  # no worker again: SIGTERM while the run waits
        proc.kill()
    with Client(cluster.address) as client:
        while client.scheduler_info()["workers"]:
            time.sleep(0.1)
    second = tmp_path / "second"
    run = _segpipe(cluster, second.mkdir() or second)
    _until_line(run, "no Dask worker")
    t0 = time.monotonic()
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert (run.returncode, err.strip().splitlines()[-1]) == (143, INTERRUPTED), err
    assert time.monotonic() - t0 < 10
    assert not (second / "o.zarr" / "_segpipe" / "lock.json").exists()

"""`--cluster tcp://...` on real `dask scheduler` and `dask worker` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tifffile
import zarr
from skimage import filters, measure

from segpipe import synthetic
from tests.helpers import free_port, same_up_to_renumbering

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    cwd = tmp_path_factory.mktemp(
        "workers"
    )  # workers resolve paths elsewhere: inputs must be absolute
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [
                str(bin_dir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                [
                    str(bin_dir / "dask"),
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                ],
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
            )
        )
    from distributed import Client

    deadline = time.time() + 60
    while True:
        try:
            with Client(address, timeout="2s") as c:
                if len(c.scheduler_info()["workers"]) == 2:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("dask scheduler/workers did not start")
        time.sleep(0.5)
    yield address
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def test_run_on_existing_scheduler(run_cli, scheduler: str, tmp_path: Path, monkeypatch) -> None:
    path = synthetic.write_tiff(tmp_path / "in" / "img.tif", (900, 800), seed=8)
    monkeypatch.chdir(tmp_path)  # relative paths on the command line
    result = run_cli(
        "--input",
        "in/img.tif",
        "--output",
        "out.zarr",
        "--tile",
        "128",
        "--cluster",
        scheduler,
        cluster=False,
    )
    assert result.exit_code == 0, result.output
    labels = zarr.open_array(str(tmp_path / "out.zarr/img/labels/instances/0"))[:]
    smooth = filters.gaussian(tifffile.imread(path).astype("float32"), sigma=2, preserve_range=True)
    ref = measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)
    assert same_up_to_renumbering(labels, ref)
    from distributed import Client

    with Client(scheduler) as c:  # the cluster was used, and is still up (not ours to close)
        assert len(c.scheduler_info()["workers"]) == 2


def test_a_run_uses_its_own_cluster_beside_another_current_client(
    run_cli, client, scheduler: str, tmp_path: Path
) -> None:
    """A process that already has a current client (a notebook's) to another scheduler:
    the run's tasks go to the run's cluster, none to the other."""
    from distributed import Client, get_task_stream

    path = synthetic.write_tiff(tmp_path / "img.tif", (300, 260), seed=4)
    with Client(scheduler) as notebook, get_task_stream(notebook) as other:
        with get_task_stream(client) as ours:
            result = run_cli("-i", str(path), "-o", str(tmp_path / "out.zarr"), "--tile", "128")
        assert result.exit_code == 0, result.output
    assert other.data == [] and len(ours.data) >= 4 * 5, (len(other.data), len(ours.data))


@pytest.mark.slow  # waits out the client's 15 s connect timeout
def test_unreachable_scheduler(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (200, 200), seed=1)
    result = run_cli(
        "--input",
        str(path),
        "--output",
        str(tmp_path / "o.zarr"),
        "--cluster",
        f"tcp://127.0.0.1:{free_port()}",
        cluster=False,
    )
    assert result.exit_code != 0
    assert "scheduler" in result.output

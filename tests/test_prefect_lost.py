"""A run whose Prefect API goes away: a real `prefect server`, killed while a real
``segpipe run`` computes, then started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zarr

from segpipe import synthetic
from tests.helpers import free_port, start_prefect_server

pytestmark = pytest.mark.integration

SEGPIPE = str(Path(sys.executable).parent / "segpipe")


def test_losing_the_prefect_api_is_one_line_and_the_next_run_settles_it(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SEGPIPE_"))}
    # one retry of each call to the API, not five with backoff (some 90 s in all)
    env.update(PREFECT_API_URL=api, PREFECT_CLIENT_MAX_RETRIES="1")
    home = tmp_path / "prefect"
    server = start_prefect_server(home, port, env)
    image = synthetic.write_tiff(tmp_path / "img.tif", (1024, 1024), seed=6)
    out = tmp_path / "out.zarr"
    args = [SEGPIPE, "run", "-q", "-i", str(image), "-o", str(out), "-s", "watershed"]
    args += ["--tile", "256"]
    try:
        run = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
        markers = out / "_segpipe" / "blocks" / "img"
        deadline = time.monotonic() + 120
        while not list(markers.glob("*/*.npz")):  # blocks are finishing
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the API goes away for good
        server.wait()
        _, err = run.communicate(timeout=300)
        assert run.returncode == 1, err
        # the run's header, its start-up, that the image states no pixel size, one line
        lines = err.strip().splitlines()
        assert (
            len(lines) == 4
            and "no pixel size stated" in lines[2]
            and lines[-1].startswith(f"error: the Prefect API {api} stopped answering (")
        ), err
        assert lines[-1].endswith(
            "); the blocks and images that finished are kept: rerun with --resume once it is back"
        ), err
        # the compute went on without the API: the image is complete, the output free
        assert zarr.open_group(str(out / "img"), mode="r").attrs["segpipe"]["complete"] is True
        assert not (out / "_segpipe" / "lock.json").exists()
        assert (out / "_segpipe" / "unreported.json").exists()

        server = start_prefect_server(home, port, env)  # back; the next run settles the first
        again = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert not (out / "_segpipe" / "unreported.json").exists()
        runs = httpx.post(
            f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC"}, timeout=10
        ).json()
        assert [r["state_type"] for r in runs] == ["CRASHED", "COMPLETED"], runs
        assert "Prefect API was unreachable" in runs[0]["state"]["message"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

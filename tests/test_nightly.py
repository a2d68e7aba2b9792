"""A nightly deployment on real services: `prefect server`, `dask scheduler`, two `dask worker`s,
`segpipe serve`, runs triggered through the API, and the run's page in headless Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
import zarr

from segpipe import synthetic
from tests.helpers import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
CRON = "0 2 * * *"


def _wait(check: Callable[[], Any], what: str, timeout: float, proc: Any = None) -> Any:
    deadline = time.time() + timeout
    while True:
        try:
            found = check()
            if found:
                return found
        except (httpx.HTTPError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def _start(args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, **kwargs)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs[::-1]:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Prefect server (API + UI) and a Dask scheduler with two workers, all on loopback."""
    root = tmp_path_factory.mktemp("services")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PYTHONPATH=str(Path(__file__).parents[1]),
    )
    port, dask_port, dash_port = free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{port}/api"
    scheduler = f"tcp://127.0.0.1:{dask_port}"
    procs = [
        _start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            root / "prefect.log",
            env={**env, "PREFECT_UI_API_URL": api},  # the UI's pages call this API
        ),
        _start(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(dask_port),
                "--dashboard-address",
                f"127.0.0.1:{dash_port}",
            ],
            root / "dask.log",
            env=env,
            cwd=root,
        ),
    ]
    for _ in range(2):
        procs.append(
            _start(
                [
                    str(BIN / "dask"),
                    "worker",
                    scheduler,
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                ],
                root / "dask.log",
                env=env,
                cwd=root,
            )
        )
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, "prefect", 90)
        from distributed import Client

        def two_workers() -> bool:
            with Client(scheduler, timeout="2s") as c:
                return len(c.scheduler_info()["workers"]) == 2

        _wait(two_workers, "dask workers", 60)
        yield {"api": api, "ui": api.removesuffix("/api"), "scheduler": scheduler, "env": env}
    finally:
        _stop(procs)


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    for _ in range(10):  # SQLite under a busy machine: the server answers 503 and asks again
        r = httpx.post(f"{api}{path}", json=body, timeout=10)
        if r.status_code != 503:
            break
        time.sleep(1)
    r.raise_for_status()
    return r.json()


def _trigger(api: str, deployment: str, timeout: float = 240) -> dict[str, Any]:
    run = _post(api, f"/deployments/{deployment}/create_flow_run", {})

    def finished() -> dict[str, Any] | None:
        r = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()
        return r if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    done: dict[str, Any] = _wait(finished, "flow run", timeout)
    return done


def _artifacts(api: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's artifacts by key, less its ``segpipe-`` prefix."""
    found = _post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {a["key"].removeprefix("segpipe-"): a for a in found}


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed (.ci/run installs it)"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        "--window-size=1500,1100",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_nightly_deployment_runs_incrementally_and_shows_in_the_ui(
    services: dict[str, Any], tmp_path: Path
) -> None:
    api = services["api"]
    collection = tmp_path / "plates"
    for i in range(2):
        synthetic.write_tiff(collection / f"well-{i}.tif", (600, 500), seed=i)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(collection),
                "output": str(tmp_path / "out.zarr"),
                "cluster": services["scheduler"],
                "tile": 256,
            }
        )
    )
    env = {**services["env"], "PREFECT_API_URL": api}
    serve = _start(
        [
            str(BIN / "segpipe"),
            "serve",
            "--config",
            str(config),
            "--cron",
            CRON,
            "--timezone",
            "Europe/Berlin",
        ],
        tmp_path / "serve.log",
        env=env,
        cwd=tmp_path,
    )
    try:

        def registered() -> dict[str, Any] | None:
            r = httpx.get(f"{api}/deployments/name/segpipe-run/nightly", timeout=5)
            return r.json() if r.status_code == 200 else None

        deployment = _wait(registered, "deployment registered by segpipe serve", 120, serve)
        schedule = deployment["schedules"][0]["schedule"]
        assert schedule["cron"] == CRON and schedule["timezone"] == "Europe/Berlin"
        assert {"segmenter:otsu", "cluster:tcp"} <= set(deployment["tags"])

        first = _trigger(api, deployment["id"])
        assert first["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert first["name"].startswith("plates-" + time.strftime("%Y-%m-%d"))
        assert {"segmenter:otsu", "cluster:tcp"} <= set(first["tags"])
        for i in range(2):
            group = zarr.open_group(str(tmp_path / "out.zarr" / f"well-{i}"), mode="r")
            assert group.attrs["segpipe"]["complete"] is True
        # it ran on that Dask cluster, and the log says where its dashboard is
        logs = _post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [first["id"]]}}})
        text = "\n".join(entry["message"] for entry in logs)
        assert f"scheduler {services['scheduler']}" in text and "Dask dashboard: http" in text

        arts = _artifacts(api, first["id"])
        assert set(arts) == {"progress", "previews", "summary", "report"}
        assert arts["progress"]["data"] == 100.0
        rows = arts["summary"]["data"]
        rows = yaml.safe_load(rows) if isinstance(rows, str) else rows
        assert sorted(r["status"] for r in rows) == ["done", "done"]
        assert all(r["objects"] > 0 for r in rows)
        assert "2 processed, 0 unchanged, 0 failed" in arts["summary"]["description"]
        assert arts["previews"]["data"].count("data:image/png;base64,") == 2
        assert "## well-0 — done" in arts["report"]["data"]

        # a new night over the unchanged collection: nothing to do
        mtime = (tmp_path / "out.zarr" / "well-0" / "zarr.json").stat().st_mtime_ns
        second = _trigger(api, deployment["id"])
        assert second["state_type"] == "COMPLETED"
        arts2 = _artifacts(api, second["id"])
        rows2 = arts2["summary"]["data"]
        rows2 = yaml.safe_load(rows2) if isinstance(rows2, str) else rows2
        assert sorted(r["status"] for r in rows2) == ["unchanged", "unchanged"]
        assert "0 processed, 2 unchanged" in arts2["summary"]["description"]
        # the unchanged images' previews, from the night before
        assert arts2["previews"]["data"].count("data:image/png;base64,") == 2
        assert (tmp_path / "out.zarr" / "well-0" / "zarr.json").stat().st_mtime_ns == mtime

        _screenshots(services["ui"], first, arts, tmp_path)
    finally:
        _stop([serve])


def _screenshots(ui: str, run: dict[str, Any], arts: dict[str, Any], tmp_path: Path) -> None:
    """The run's page and its table, report and previews artifacts, as Chromium draws
    them."""
    shots = Path(os.environ.get("SEGPIPE_SCREENSHOTS", tmp_path / "screens"))
    shots.mkdir(parents=True, exist_ok=True)
    pages = {
        "flow-run": (f"{ui}/runs/flow-run/{run['id']}", [run["name"], "Completed"]),
        "summary": (f"{ui}/artifacts/artifact/{arts['summary']['id']}", ["well-0", "2 processed"]),
        "report": (f"{ui}/artifacts/artifact/{arts['report']['id']}", ["well-1", "2 processed"]),
        "previews": (f"{ui}/artifacts/artifact/{arts['previews']['id']}", ["data:image/png"]),
    }
    from PIL import Image

    for name, (url, expected) in pages.items():
        png = shots / f"{name}.png"
        shot = _chromium(f"--screenshot={png}", url, profile=tmp_path / f"chrome-{name}")
        assert png.is_file(), shot.stderr[-2000:]
        pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
        assert pixels.shape[0] >= 1000 and pixels.std() > 10  # drawn, not a blank page
        dom = _chromium("--dump-dom", url, profile=tmp_path / f"chrome-dom-{name}").stdout
        for text in expected:
            assert text in dom, f"{name}: {text!r} not on {url}"

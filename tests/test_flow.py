"""The Prefect flow as its API records it: one task per wave of images, the summary artifact."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.logging.handlers import APILogHandler

from segpipe import synthetic


def test_flow_tasks_per_wave_not_per_image_or_tile(run_cli, tmp_path: Path) -> None:
    # two images of many 64² tiles, two of one tile
    for i, shape in enumerate([(600, 500), (300, 700), (60, 50), (64, 64)]):
        synthetic.write_tiff(tmp_path / "in" / f"img{i}.tif", shape, seed=i)
    out = tmp_path / "out.zarr"
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--tile", "64")
    assert result.exit_code == 0, result.output
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        assert run.state is not None and run.state.is_completed()
        assert run.name.startswith("in-")  # says what ran: the collection and the date
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
        names = sorted(t.name for t in task_runs)
        # one task run per wave of images, although the images have 110 tiles between them
        assert names == ["wave 1 of 1"]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
        APILogHandler().flush()
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    # a line for each image of many blocks; those of one block summed up in one line
    text = "\n".join(log.message for log in logs)
    for name in ("img0", "img1"):
        assert f"{name}: " in text and " objects in " in text, text
    assert "img2" not in text and "img3" not in text, text
    assert "wave 1 of 1: 2 image(s) of one block done" in text, text
    tables = [a for a in artifacts if a.key == "segpipe-summary"]
    assert len(tables) == 1
    rows = tables[0].data
    rows = rows if isinstance(rows, list) else __import__("json").loads(rows)
    assert [r["image"] for r in rows] == ["img0", "img1", "img2", "img3"]
    assert {"image", "shape", "objects", "seconds", "Mpx/s"} <= set(rows[0])
    for r in rows:
        group = zarr.open_group(str(out / r["image"]), mode="r")
        assert group.attrs["segpipe"]["objects"] == r["objects"] > 0


def test_help_shows_examples() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "--segmenter watershed" in result.output


@pytest.mark.integration
def test_demo_from_a_fresh_prefect_home(tmp_path: Path) -> None:
    """`segpipe demo` as a user runs it: local Prefect API, LocalCluster, < 3 minutes."""
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),  # no Prefect state from earlier runs
        "SEGPIPE_API_IDLE": "5",  # its local API does not outlast the test by minutes
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "segpipe"), "demo", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "segpipe-demo/out.zarr" in " ".join(proc.stdout.split())
    for name in ("plate-a", "plate-b", "stack-c"):
        group = zarr.open_group(str(tmp_path / "segpipe-demo/out.zarr" / name), mode="r")
        assert group.attrs["segpipe"]["complete"] is True
        assert group.attrs["segpipe"]["objects"] > 50
    assert seconds < 180, f"demo took {seconds:.0f} s"


def test_flow_heartbeats_only_where_the_user_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import get_current_settings

    from flows.segment import HEARTBEAT_SETTINGS, heartbeats_as_set

    for name in HEARTBEAT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with heartbeats_as_set():  # no thread to wait for as each run context closes
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default again
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")  # read as Prefect starts
    with heartbeats_as_set():  # the user's setting stands
        assert get_current_settings().flows.heartbeat_frequency is not None

"""Faults: a worker killed mid-run, the whole run killed and resumed, two runs at once.

Outputs are compared chunk by chunk (SHA-256 of every chunk file) with a
fault-free run of the same settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dask
import pytest
import zarr
from distributed import Client, LocalCluster

from segpipe import synthetic
from tests.helpers import fill_disk

pytestmark = pytest.mark.integration

STAGES = ("ingest", "filter", "statistics", "segment", "relabel")


def digest(group: Path) -> dict[str, str]:
    """Checksums of every chunk file of an image (metadata files left out: they hold times)."""
    return {
        str(p.relative_to(group)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(group.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def markers_done(out: Path, name: str, stages: tuple[str, ...] = STAGES) -> int:
    base = out / "_segpipe" / "blocks" / name
    return sum(len(list((base / s).glob("*.npz"))) for s in stages if (base / s).exists())


def watch(out: Path, name: str, at: int, action: Callable[[], None]) -> threading.Thread:
    """Call ``action`` once ``at`` block markers of the main stages exist."""

    def run() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if markers_done(out, name) >= at:
                action()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # TIFF tiles of one block each: every stage has 256 blocks
    path = tmp_path_factory.mktemp("in") / "cells.tif"
    return synthetic.write_tiff(path, (1536, 1536), tile=96, seed=9)


ARGS = ("--segmenter", "watershed", "--tile", "96")  # 256 blocks a stage, overlap stitching
BLOCKS = 256 * len(STAGES)


@pytest.fixture(scope="module")
def reference(run_cli, image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ref") / "out.zarr"
    assert run_cli("--input", str(image), "--output", str(out), *ARGS).exit_code == 0
    return digest(out / "cells")


@pytest.fixture(scope="module")
def two_workers() -> Iterator[str]:
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 3}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
    ):
        yield cluster.scheduler_address


# a kill early and late in the run are slow variants: the middle one stays in the default suite
@pytest.mark.parametrize(
    "fraction",
    [pytest.param(0.25, marks=pytest.mark.slow), 0.5, pytest.param(0.75, marks=pytest.mark.slow)],
)
def test_worker_killed_mid_run(
    run_cli,
    image: Path,
    reference: dict[str, str],
    two_workers: str,
    tmp_path: Path,
    fraction: float,
) -> None:
    out = tmp_path / "out.zarr"
    killed: list[int] = []

    def kill_a_worker() -> None:
        with Client(two_workers) as c:
            pid = sorted(c.run(os.getpid).values())[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = watch(out, "cells", int(fraction * BLOCKS), kill_a_worker)
    result = run_cli(
        "--input", str(image), "--output", str(out), *ARGS, "--cluster", two_workers, cluster=False
    )
    watcher.join(timeout=5)
    assert killed, "the run ended before the worker could be killed"
    assert result.exit_code == 0, result.output
    assert digest(out / "cells") == reference
    with Client(two_workers) as c:  # the nanny replaced the dead worker
        c.wait_for_workers(2, timeout=30)


def _segpipe(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "segpipe"), "run", "--quiet", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its cluster and children form one group we can kill
    )


@pytest.fixture
def api_env(prefect_api: None) -> dict[str, str]:
    """Environment for `segpipe` subprocesses: report to the test session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


# killed in the filter, statistics, segment and relabel passes: no filtered image is kept
# between them (each filters its blocks again), and the resumed run still equals the
# fault-free one chunk by chunk
@pytest.mark.parametrize(
    "fraction",
    [
        0.3,
        pytest.param(0.5, marks=pytest.mark.slow),
        pytest.param(0.7, marks=pytest.mark.slow),  # 32 s: the suite stays under 20 min
        pytest.param(0.9, marks=pytest.mark.slow),
    ],
)
def test_whole_run_killed_then_resumed(
    image: Path,
    reference: dict[str, str],
    api_env: dict[str, str],
    tmp_path: Path,
    fraction: float,
) -> None:
    out = tmp_path / "out.zarr"
    args = ("--input", str(image), "--output", str(out), *ARGS)
    proc = _segpipe(*args, env=api_env)
    at = int(fraction * BLOCKS)
    watcher = watch(out, "cells", at, lambda: os.killpg(proc.pid, signal.SIGKILL))
    proc.wait(timeout=300)
    watcher.join(timeout=5)
    assert proc.returncode == -signal.SIGKILL
    assert not list((out / "_segpipe" / "scratch").rglob("filtered"))
    assert not zarr.open_group(str(out / "cells"), mode="r").attrs["segpipe"]["complete"]
    base = out / "_segpipe" / "blocks" / "cells"
    present = {s.name: len(list(s.glob("*.npz"))) for s in base.iterdir()}
    # without --resume the earlier run is not silently reused
    refused = _segpipe(*args, env=api_env)
    assert refused.wait(timeout=120) == 1
    assert "--resume" in " ".join(refused.stdout.read().split())  # type: ignore[union-attr]
    again = _segpipe(*args, "--resume", env=api_env)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    attrs = zarr.open_group(str(out / "cells"), mode="r").attrs["segpipe"]
    assert attrs["complete"] is True
    tally = attrs["blocks"]
    missing = sum(t["blocks"] - present.get(stage, 0) for stage, t in tally.items())
    recomputed = sum(t["computed"] for t in tally.values())
    assert 0 < missing < sum(t["blocks"] for t in tally.values())
    assert recomputed <= 1.1 * missing, (recomputed, missing)
    assert digest(out / "cells") == reference


def _complete(group: Path) -> bool:
    try:
        meta = json.loads((group / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("attributes", {}).get("segpipe", {}).get("complete") is True


@pytest.mark.slow  # 53 s; the in-process twin in test_collection_engine stays in the default
def test_a_collection_of_packed_fields_killed_then_resumed(
    run_cli, api_env: dict[str, str], tmp_path: Path
) -> None:
    fields = tmp_path / "fields"
    names = [f"f{i:02d}" for i in range(60)]
    for i, name in enumerate(names):  # one block each: every field runs in a pack
        synthetic.write_tiff(fields / f"{name}.tif", (160, 150), seed=i)
    ref = tmp_path / "ref.zarr"
    args = ("--input", str(fields), "--segmenter", "otsu")
    assert run_cli(*args, "--output", str(ref)).exit_code == 0
    out = tmp_path / "out.zarr"
    env = {**api_env, "SEGPIPE_PACK_DIR": str(tmp_path)}
    proc = _segpipe(*args, "--output", str(out), env=env)
    groups = [out / n for n in names]
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and sum(map(_complete, groups)) < 5:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert 5 <= sum(map(_complete, groups)) < len(names)
    # packs keep their markers and scratch in their own folders, never in the store
    assert not [p for kind in ("blocks", "scratch") for p in (out / "_segpipe" / kind).glob("f*")]
    again = _segpipe(*args, "--output", str(out), "--resume", env=env)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert all(map(_complete, groups))
    for name in names:
        assert digest(out / name) == digest(ref / name), name


@pytest.mark.slow  # 47 s; the lock's race is tested in the default suite by
# test_data_safety.py::test_of_processes_racing_for_one_output_exactly_one_holds_it
def test_two_runs_on_one_output(
    image: Path, reference: dict[str, str], api_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    args = ("--input", str(image), "--output", str(out), *ARGS)
    first, second = _segpipe(*args, env=api_env), _segpipe(*args, env=api_env)
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 1], outputs
    loser = outputs[[first.returncode, second.returncode].index(1)]
    assert "in use by another run" in " ".join(loser.split())
    assert digest(out / "cells") == reference
    assert not (out / "_segpipe" / "lock.json").exists()  # released at the end


def _kill_own_worker_on_3(i: int) -> int:
    """A block function whose block 3 kills whatever worker runs it."""
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return i * 10


def test_block_that_kills_workers_is_named(two_workers: str) -> None:
    from segpipe.engine import map_blocks
    from segpipe.errors import BlockFailedError

    done: list[int] = []
    with Client(two_workers) as client:
        with pytest.raises(BlockFailedError) as info:
            map_blocks(
                client,
                _kill_own_worker_on_3,
                [(i,) for i in range(12)],
                stage="poison",
                progress=lambda stage, n, total: done.append(n),
                names=[f"block {i} of poison.tif" for i in range(12)],
            )
        client.wait_for_workers(2, timeout=60)
    message = str(info.value)
    assert "block 3 of poison.tif" in message and "other 11 finished" in message
    assert max(done) == 11  # every other block completed


@pytest.mark.slow  # disk full, then a flow retry; whole-run kill and resume stay in the default
def test_prefect_flow_retry_resumes_after_disk_full(
    run_cli, image: Path, reference: dict[str, str], tmpfs, tmp_path: Path
) -> None:
    """The disk fills at ~50 %; Prefect retries the flow run once space is back, and the
    retry continues from the blocks already written."""
    disk = tmpfs("96m")
    out = disk / "out.zarr"
    ballast = disk / "ballast"

    def fill_then_free() -> None:
        fill_disk(ballast)  # to the last byte
        time.sleep(3)  # the run fails on the full disk meanwhile
        ballast.unlink()

    watcher = watch(out, "cells", BLOCKS // 2, fill_then_free)
    config = tmp_path / "run.yaml"
    import yaml

    config.write_text(
        yaml.safe_dump(
            {
                "input": str(image),
                "output": str(out),
                "segmenter": {"name": "watershed"},
                "tile": 96,
                "retries": 1,
                "retry_delay": 6,
                "cluster": run_cli.cluster_address,  # type: ignore[attr-defined]
            }
        )
    )
    result = run_cli("--config", str(config))
    watcher.join(timeout=30)
    assert result.exit_code == 0, result.output
    attrs = zarr.open_group(str(out / "cells"), mode="r").attrs["segpipe"]
    computed = sum(t["computed"] for t in attrs["blocks"].values())
    total = sum(t["blocks"] for t in attrs["blocks"].values())
    assert 0 < computed < 0.75 * total  # the retry did not start over
    assert digest(out / "cells") == reference

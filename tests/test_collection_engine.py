"""A collection through the engine: the same bytes as one image at a time, on 1 or 2 workers,
and a Prefect run whose task runs do not grow with the number of images."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort

from segpipe import pipeline, synthetic
from segpipe.config import block_tile
from segpipe.engine import Inline
from segpipe.image import ImagePlan
from segpipe.io.readers import open_source
from segpipe.io.store import open_output
from segpipe.segmenters import get_segmenter
from tests.helpers import free_port


def _collection(folder: Path) -> list[Path]:
    """Small fields (one block each, packed) and two images of several blocks."""
    paths = [synthetic.write_tiff(folder / f"f{i}.tif", (160, 150), seed=i) for i in range(5)]
    paths.append(synthetic.write_tiff(folder / "big.tif", (700, 650), seed=7))
    paths.append(synthetic.write_tiff(folder / "wide.tif", (260, 900), seed=8))
    return paths


def _plans(paths: list[Path], out: Path, segmenter: str) -> list[ImagePlan]:
    open_output(out, {"test": segmenter}).release()
    seg = get_segmenter(segmenter)
    plans = []
    for p in paths:
        spec = open_source(str(p))
        tile = block_tile(512 if spec.shape[0] > 200 else "auto", 2, spec.shape)
        plans.append(ImagePlan(spec, str(out), tile, seg))
    return plans


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    with warnings.catch_warnings():  # tables and previews are files beside the arrays
        warnings.simplefilter("ignore", UserWarning)
        members = list(group.members())
    for name, node in members:
        if isinstance(node, zarr.Array):
            out[prefix + name] = node[:]
        else:
            out.update(_arrays(node, f"{prefix}{name}/"))
    return out


def _same_results(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        left, right = (zarr.open_group(str(root / name), mode="r") for root in (a, b))
        arrays_a, arrays_b = _arrays(left), _arrays(right)
        assert sorted(arrays_a) == sorted(arrays_b) and len(arrays_a) >= 4, sorted(arrays_a)
        for key, value in arrays_a.items():
            assert value.dtype == arrays_b[key].dtype, (name, key)
            assert np.array_equal(value, arrays_b[key]), (name, key)
        for table in ("objects", "segments"):
            ta = pq.read_table(a / name / "tables" / f"{table}.parquet")
            tb = pq.read_table(b / name / "tables" / f"{table}.parquet")
            assert ta.equals(tb, check_metadata=True), (name, table)
        for key in ("objects", "params", "statistics", "shape", "complete"):
            assert left.attrs["segpipe"][key] == right.attrs["segpipe"][key], (name, key)


@pytest.mark.parametrize("segmenter", ["otsu", pytest.param("watershed", marks=pytest.mark.slow)])
def test_a_collection_equals_one_image_at_a_time_on_1_and_2_workers(
    client: Any, tmp_path: Path, segmenter: str
) -> None:
    from distributed import Client, LocalCluster

    paths = _collection(tmp_path / "in")
    names = [p.stem for p in paths]
    alone = tmp_path / "alone.zarr"
    for plan in _plans(paths, alone, segmenter):  # one image at a time, every block a task
        pipeline.run_image(client, plan)
    together = tmp_path / "together.zarr"
    outcomes = pipeline.run_images(client, _plans(paths, together, segmenter))
    assert [o.result.status for o in outcomes if o.result] == ["done"] * len(paths)
    _same_results(alone, together, names)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as two,
    ):
        on_two = tmp_path / "two.zarr"
        pipeline.run_images(two, _plans(paths, on_two, segmenter), in_flight=3)
    _same_results(alone, on_two, names)


def test_packs_bound_pixels_and_keep_every_thread_busy() -> None:
    from segpipe.io.readers import SourceSpec

    def plan(shape: tuple[int, int]) -> ImagePlan:
        spec = SourceSpec("/x.tif", "x", "tiff", "YX", shape, "uint16", None)
        return ImagePlan(spec, "/out", (2048, 2048), get_segmenter("otsu"))

    small = [plan((128, 128)) for _ in range(300)]
    groups = pipeline.packs(small, list(range(300)), threads=2)
    assert sorted(i for g in groups for i in g) == list(range(300))
    assert len(groups) >= 8  # several packs per worker thread
    fields = [plan((2048, 2048)) for _ in range(4)]
    assert pipeline.packs(fields, [0, 1, 2, 3], threads=2) == [[0], [1], [2], [3]]


def test_a_packed_image_is_smoothed_once_with_the_same_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skimage import filters

    from segpipe import kernels
    from segpipe.stages import statistics

    path = synthetic.write_tiff(tmp_path / "f.tif", (160, 150), seed=3)
    (plan,) = _plans([path], tmp_path / "out.zarr", "otsu")
    pipeline.run_images(Inline(), [plan])  # writes the raw image the filter reads
    calls = []
    gaussian = kernels.gaussian
    monkeypatch.setattr(kernels, "gaussian", lambda *a: calls.append(1) or gaussian(*a))
    (block,) = plan.grid()
    whole = filters.gaussian(
        tifffile.imread(path).astype(np.float32), sigma=2.0, preserve_range=True
    )
    with statistics.keeping_filtered():
        first = statistics.filtered(plan, block, (0, 0))
        first[:] = -1  # a caller's change is its own
        again = statistics.filtered(plan, plan.grid(plan.segment_halo).block((0, 0)), (5, 5))
    assert len(calls) == 1
    assert np.array_equal(again, whole.astype(np.float32))
    statistics.filtered(plan, block, (0, 0))
    statistics.filtered(plan, block, (0, 0))
    assert len(calls) == 3  # outside it nothing is kept


def test_task_runs_do_not_grow_with_the_images(run_cli, tmp_path: Path) -> None:
    folder = tmp_path / "plate"
    for i in range(40):
        synthetic.write_tiff(folder / f"w{i:03d}.tif", (96, 96), seed=i)
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(folder), "-o", str(out))
    assert result.exit_code == 0, result.output
    with get_client(sync_client=True) as api:
        run = api.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert len(tasks) == 1, [t.name for t in tasks]
    states = {
        zarr.open_group(str(out / f"w{i:03d}"), mode="r").attrs["segpipe"]["complete"]
        for i in range(40)
    }
    assert states == {True}


@pytest.mark.slow
def test_300_images_against_a_prefect_server_make_at_most_50_task_runs(tmp_path: Path) -> None:
    folder = tmp_path / "plate"
    for i in range(300):
        synthetic.write_tiff(folder / f"w{i:03d}.tif", (128, 128), seed=i)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and server.poll() is None, "prefect server did not start"
            time.sleep(0.5)
        out = tmp_path / "out.zarr"
        run = subprocess.run(
            [str(bin_dir / "segpipe"), "run", "-i", str(folder), "-o", str(out), "--quiet"],
            env={**env, "PREFECT_API_URL": api},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        flows = httpx.post(f"{api}/flow_runs/filter", json={"limit": 1}, timeout=10).json()
        flow_id = flows[0]["id"]
        count = httpx.post(
            f"{api}/task_runs/count",
            json={"flow_runs": {"id": {"any_": [flow_id]}}},
            timeout=10,
        ).json()
        assert 1 <= count <= 50, count
        done = [
            zarr.open_group(str(out / f"w{i:03d}"), mode="r").attrs["segpipe"]["complete"]
            for i in range(300)
        ]
        assert all(done)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_pack_keeps_markers_and_scratch_out_of_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe import lifecycle

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("SEGPIPE_PACK_DIR", str(work))
    stale, fresh, other = (work / n for n in ("segpipe-pack-old", "segpipe-pack-new", "old"))
    for folder in (stale, fresh, other):
        (folder / "_segpipe").mkdir(parents=True)
    day_ago = time.time() - pipeline.STALE_WORK - 60
    for folder in (stale, other):
        os.utime(folder, (day_ago, day_ago))
    paths = [
        synthetic.write_tiff(tmp_path / "in" / f"f{i}.tif", (160, 150), seed=i) for i in range(3)
    ]
    names = [p.stem for p in paths]
    alone = tmp_path / "alone.zarr"
    for plan in _plans(paths, alone, "otsu"):
        pipeline.run_image(Inline(), plan)
    out = tmp_path / "out.zarr"
    plans = _plans(paths, out, "otsu")

    # an earlier run in the store, cut short before it finished the first image
    finish = lifecycle.finish

    def cut_short(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cut short")

    monkeypatch.setattr(lifecycle, "finish", cut_short)
    with pytest.raises(RuntimeError, match="cut short"):
        pipeline.run_image(Inline(), plans[0])
    assert (out / "_segpipe" / "blocks" / "f0" / "segment").is_dir()

    seen: list[tuple[Path, list[str]]] = []

    def watched(plan: ImagePlan, *args: Any, **kwargs: Any) -> None:
        internal = out / "_segpipe"
        left = [p.name for kind in ("blocks", "scratch") for p in (internal / kind).glob("*")]
        seen.append((Path(plan.blocks), left))
        finish(plan, *args, **kwargs)

    monkeypatch.setattr(lifecycle, "finish", watched)
    outcomes = pipeline.run_pack(plans, skip=False, full=False)
    assert [o.result.status for o in outcomes if o.result] == ["done"] * 3
    # while each image ran, its markers were in the pack's folder, none in the store
    for blocks, left in seen:
        assert blocks.is_relative_to(work) and left == [], (blocks, left)
    assert len(seen) == 3 and not (out / "_segpipe" / "blocks" / "f0").exists()
    _same_results(alone, out, names)
    # the pack's own folder is gone; a stale one of a killed worker too; nothing else
    assert sorted(p.name for p in work.iterdir()) == ["old", "segpipe-pack-new"]


def test_a_pack_folder_that_cannot_be_written_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.errors import ConfigError

    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("SEGPIPE_PACK_DIR", str(missing))
    path = synthetic.write_tiff(tmp_path / "f.tif", (160, 150), seed=1)
    with pytest.raises(ConfigError) as info:
        pipeline.run_pack(_plans([path], tmp_path / "out.zarr", "otsu"), skip=True, full=False)
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "SEGPIPE_PACK_DIR" in message


def test_markers_in_a_held_folder_stay_in_memory(tmp_path: Path) -> None:
    """A pack's markers: an empty file each, their arrays read back from this process
    while the file is there and unchanged, forgotten with the folder; elsewhere an
    ``.npz`` as before."""
    from segpipe.io import markers

    folder, other = tmp_path / "pack", tmp_path / "store"
    folder.mkdir()
    values = {"v": np.arange(3.0)}
    with markers.held(str(folder)):
        inside = markers.Markers(folder / "blocks" / "segment")
        inside.save(0, values, run="r1")
        inside.save(1, values, run="r1")
        inside.save(3, values, run="r1")
        markers.Markers(other).save(0, values, run="r1")
        assert inside.path(0).stat().st_size == 0
        assert inside.load(0)["v"].tolist() == [0.0, 1.0, 2.0]
        assert inside.done(0) and inside.tally("r1") == (3, 3)
        inside.path(1).unlink()  # gone: not done, whatever this process holds
        assert not inside.done(1)
        os.utime(inside.path(0), ns=(1, 1))  # touched since: not what was saved
        assert markers.read_marker(inside.path(0)) is None
    assert markers.read_marker(inside.path(3)) is None  # forgotten with the folder
    with np.load(other / "0.npz") as npz:  # not held: a whole .npz
        assert npz["v"].tolist() == [0.0, 1.0, 2.0]
    inside.save(2, values, run="r1")  # the folder is no longer held
    assert inside.path(2).stat().st_size > 0
    assert markers.read_marker(inside.path(2)) is not None


def test_a_relative_pack_folder_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Markers are held by absolute path: a relative ``SEGPIPE_PACK_DIR`` is resolved."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGPIPE_PACK_DIR", "work")
    assert pipeline.work_folder() == str(tmp_path / "work")

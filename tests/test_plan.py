"""`segpipe plan`: its numbers against hand-computed cases and the real grid, and a
header-only plan of a 10⁶-block virtual image in seconds and bounded memory."""

from __future__ import annotations

import itertools
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import typer
import zarr
from typer.testing import CliRunner

from flows.plan_cli import register
from segpipe import synthetic
from segpipe.blocks import BlockGrid
from segpipe.config import RunConfig
from segpipe.io.readers import SourceSpec, open_source
from segpipe.plan import (
    Costs,
    SegmentCost,
    _read_extent,
    load_costs,
    neighbour_pair_counts,
    plan_image,
    plan_run,
    startup_seconds,
    wall_seconds,
)
from segpipe.segmenters import get_segmenter

MiB = 2**20


def _spec(shape: tuple[int, ...], dtype: str = "uint16") -> SourceSpec:
    axes = "ZYX"[3 - len(shape) :]
    return SourceSpec("/x.zarr", "x", "zarr", axes, shape, dtype, None, chunks=(256,) * len(shape))


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command keeps `plan` a subcommand
        pass

    return app


def test_4096_at_tile_1024_by_hand() -> None:
    est = plan_image(_spec((4096, 4096)), tile=1024, segmenter=get_segmenter("otsu", sigma=0))
    assert est.grid == (4, 4) and est.blocks == 16
    # 4 rows × 3 right + 3 × 4 down + 3 × 3 down-right + 3 × 3 down-left
    assert est.pairs == 12 + 12 + 9 + 9 == 42
    assert est.levels == 3  # 4096, 2048, 1024 (pyramids stop at the tile)
    tasks = {s.name: s.tasks for s in est.stages}
    assert tasks == {
        "ingest": 16,
        "statistics": 16,
        "segment": 16,
        "links": 4,  # one task per row of blocks: the 42 pairs, each with its first block
        "stitch": 0,
        "relabel": 16,  # also levels 1 and 2 (chunks of 512² and 256²) of all four pyramids
        "pyramid": 0,
        "panoptic": 0,
        "measure": 0,  # the client merges the relabel pass's sums
        "preview": 1,
    }
    px = 4096 * 4096
    ingest, segment, links = est.stage("ingest"), est.stage("segment"), est.stage("links")
    assert (ingest.read_bytes, ingest.write_bytes) == (2 * px, 2 * px)
    assert segment.read_bytes == 2 * px  # no halo, no filter: the uint16 image once
    # faces: 24 face pairs × 2 views × 1024 px, 18 corner pairs × 2 views × 1 px; 5 B/px
    views = (24 * 2 * 1024 + 18 * 2) * 5
    assert segment.write_bytes == px * (1 + 4) + views
    assert links.read_bytes == views
    # local ids, semantic labels and the image in; instances and panoptic out, and
    # levels 1 and 2 of image, semantic, instances and panoptic
    assert est.stage("relabel").read_bytes == px * (4 + 1 + 2)
    assert est.stage("relabel").write_bytes == px * (4 + 8) + (2048**2 + 1024**2) * (2 + 1 + 4 + 8)
    assert est.stage("pyramid").write_bytes == est.stage("panoptic").write_bytes == 0
    # at tile 512 the pass writes level 1 (chunks of 256²); tasks build 1024² and 512²
    small = plan_image(_spec((4096, 4096)), tile=512, segmenter=get_segmenter("otsu", sigma=0))
    assert small.levels == 4
    assert small.stage("pyramid").tasks == 3 * (4 + 1)  # image, semantic, instances
    assert small.stage("panoptic").tasks == 4 + 1
    assert small.stage("pyramid").write_bytes == (1024**2 + 512**2) * (2 + 1 + 4)
    assert small.stage("pyramid").read_bytes == (2048**2 + 1024**2) * (2 + 1 + 4)
    assert small.stage("panoptic").write_bytes == (1024**2 + 512**2) * 8
    assert small.stage("relabel").write_bytes == px * (4 + 8) + 2048**2 * (2 + 1 + 4 + 8)
    # segment thread peak: float32 block, otsu's declared working set (6 bytes a pixel),
    # full uint32 labels, core local + semantic
    assert est.peak_thread_bytes["segment"] == 1024**2 * (4 + 6 + 4 + 5)
    # a strip TIFF (decode unit wider than a block) is ingested in 4 full-width bands
    strips = SourceSpec(
        "/s.tif", "s", "tiff", "YX", (4096, 4096), "uint16", None, chunks=(16, 4096)
    )
    otsu = get_segmenter("otsu", sigma=0)
    assert plan_image(strips, tile=1024, segmenter=otsu).stage("ingest").tasks == 4


def test_4096_with_smoothing_and_watershed_halos_by_hand() -> None:
    otsu = plan_image(_spec((4096, 4096)), tile=1024, segmenter=get_segmenter("otsu", sigma=2))
    assert otsu.filter_halo == (8, 8)  # int(4 * 2 + 0.5), as scipy
    # per axis: 4096 core + 3 inner left halos + 3 inner right halos of 8 px
    assert otsu.stage("filter").read_bytes == (4096 + 6 * 8) ** 2 * 2
    assert otsu.stage("filter").write_bytes == 0  # no filtered image is stored:
    assert otsu.stage("statistics").read_bytes == (4096 + 6 * 8) ** 2 * 2  # each pass
    assert otsu.stage("segment").read_bytes == (4096 + 6 * 8) ** 2 * 2  # filters again
    ws = get_segmenter("watershed")
    est = plan_image(_spec((4096, 4096)), tile=1024, segmenter=ws, halo=32)
    assert est.halo == (32, 32)
    assert est.stage("segment").read_bytes == (4096 + 6 * (32 + 8)) ** 2 * 2
    # overlap windows: faces 1024 × 64 px, corners 64 × 64 px; uint32
    views = (24 * 2 * 1024 * 64 + 18 * 2 * 64 * 64) * 4
    assert est.stage("links").read_bytes == views
    assert est.peak_thread_bytes["segment"] > (1024 + 64) ** 2 * 8


@pytest.mark.parametrize(
    "shape,tile,halo",
    [
        ((4096, 4096), (1024, 1024), (8, 8)),
        ((1000, 777), (256, 100), (300, 3)),
        ((40, 300, 200), (16, 128, 64), (2, 5, 70)),
    ],
)
def test_grid_arithmetic_equals_the_real_grid(
    shape: tuple[int, ...], tile: tuple[int, ...], halo: tuple[int, ...]
) -> None:
    grid = BlockGrid.build(shape, tile=tile, halo=halo)
    read = sum(np.prod([r.stop - r.start for r in b.read]) for b in grid)
    ours = np.prod([_read_extent(s, t, h) for s, t, h in zip(shape, tile, halo, strict=True)])
    assert ours == read
    assert sum(neighbour_pair_counts(grid.grid_shape).values()) == len(list(grid.neighbour_pairs()))


def test_read_extent_and_pairs_on_many_grids() -> None:
    for size, tile, halo in itertools.product([1, 5, 64, 100], [1, 7, 32, 100], [0, 1, 9, 40]):
        grid = BlockGrid.build((size,), tile=tile, halo=halo)
        want = sum(b.read[0].stop - b.read[0].start for b in grid)
        assert _read_extent(size, grid.tile[0], halo) == want, (size, tile, halo)
    for shape in [(3, 4, 5), (1, 2, 7), (2, 2, 2)]:
        grid = BlockGrid.build(shape, tile=1)
        assert sum(neighbour_pair_counts(shape).values()) == len(list(grid.neighbour_pairs()))


def test_wall_time_model() -> None:
    est = plan_image(_spec((4096, 4096)), tile=1024, segmenter=get_segmenter("otsu", sigma=0))
    stages = dict.fromkeys(["ingest", "statistics", "relabel", "pyramid", "panoptic"], 1.0)
    costs = Costs(
        stages={**stages, "measure": 1.0},
        segment={"otsu": SegmentCost(10.0, 20.0)},
        pairs={"faces": 0.001},
        task_overhead_s=0.0,
        merge_s_per_block=0.0,
    )
    est = plan_image(_spec((4096, 4096)), tile=1024, segmenter=get_segmenter("otsu", sigma=0))
    priced = plan_image(
        _spec((4096, 4096)), tile=1024, segmenter=get_segmenter("otsu", sigma=0), costs=costs
    )
    assert est.stage("segment").compute_s is None
    px = 4096**2
    assert priced.stage("segment").compute_s == pytest.approx(10e-9 * px)
    assert priced.stage("links").compute_s == pytest.approx(0.042)
    one = wall_seconds([priced], workers=1, threads=1, costs=costs)
    assert one == pytest.approx(sum(s.compute_s or 0.0 for s in priced.stages))
    # 16 threads: every stage (16 blocks, 4 rows of links, 15 pyramid tasks...) is one
    # wave of its mean task; stitch runs on the client
    sixteen = wall_seconds([priced], workers=4, threads=4, costs=costs)
    assert sixteen is not None and one is not None
    by_hand = sum(
        (s.compute_s or 0.0) / (s.tasks if s.tasks and not s.client else 1) for s in priced.stages
    )
    assert sixteen == pytest.approx(by_hand)
    assert sixteen == pytest.approx(one / 16, rel=0.5)
    assert priced.peak_thread_bytes["segment"] == 1024**2 * (4 + 20 + 4 + 5)
    missing = plan_image(
        _spec((64, 64)), tile=32, segmenter=get_segmenter("watershed"), costs=costs
    )
    assert wall_seconds([missing], workers=1, threads=1, costs=costs) is None


def test_wall_time_of_a_collection_spreads_small_images_over_every_thread() -> None:
    costs = Costs(
        stages=dict.fromkeys(
            ["ingest", "statistics", "relabel", "pyramid", "panoptic", "measure"], 1.0
        ),
        segment={"otsu": SegmentCost(10.0, 20.0)},
        pairs={"faces": 0.001},
        task_overhead_s=0.0,
        merge_s_per_block=0.0,
    )
    seg = get_segmenter("otsu", sigma=0)
    field = plan_image(_spec((1024, 1024)), tile=2048, segmenter=seg, costs=costs)
    one = wall_seconds([field], workers=1, threads=1, costs=costs)
    assert one is not None
    # 64 packed fields on 4 threads: a quarter of their work, no per-image barriers
    many = wall_seconds([field] * 64, workers=2, threads=2, costs=costs)
    assert many == pytest.approx(64 * one / 4)
    big = plan_image(_spec((4096, 4096)), tile=1024, segmenter=seg, costs=costs)
    alone = wall_seconds([big], workers=3, threads=1, costs=costs)
    four = wall_seconds([big] * 4, workers=3, threads=1, costs=costs)
    assert alone is not None and four is not None
    assert four < 4 * alone  # images in flight fill the waves one image leaves part idle


def test_shipped_calibration_table_covers_the_builtin_segmenters() -> None:
    costs = load_costs()
    for name in ["otsu", "multiotsu", "threshold", "local", "region-growing", "watershed"]:
        assert costs.segment[name].ns_per_px > 0
    assert set(costs.pairs) == {"faces", "overlap"}
    assert costs.task_overhead_s > 0 and costs.merge_s_per_block > 0


def _virtual(tmp_path: Path) -> Path:
    """A 1 024 000² uint16 Zarr v3 array of 1024² chunks with no chunk written: 10⁶ blocks."""
    path = tmp_path / "virtual.zarr"
    zarr.create_array(
        store=str(path),
        shape=(1_024_000, 1_024_000),
        chunks=(1024, 1024),
        dtype="uint16",
        fill_value=0,
    )
    assert not any(p.name != "zarr.json" for p in path.iterdir())  # nothing but metadata
    return path


def test_virtual_million_block_image_plans_in_seconds_and_bounded_memory(
    tmp_path: Path,
) -> None:
    path = _virtual(tmp_path)
    config = RunConfig(input=str(path), output=str(tmp_path / "out.zarr"), tile=1024)
    plan_run(config)  # imports (scikit-image for the segmenter) are not the plan's cost
    tracemalloc.start()
    t = time.perf_counter()
    try:
        result = plan_run(config, costs=load_costs())
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (est,) = result.images
    assert est.blocks == 1_000_000 and est.grid == (1000, 1000)
    assert est.pairs == 2 * 1000 * 999 + 2 * 999 * 999
    assert est.stage("ingest").read_bytes == 1_024_000**2 * 2
    assert seconds < 2.0, seconds
    assert peak < 4 * MiB, peak  # counted, never one object per block
    wall = result.wall(64, 4)
    assert wall is not None and wall > 0
    assert not (tmp_path / "out.zarr").exists()  # planning writes nothing
    print(f"10^6-block plan: {seconds * 1e3:.1f} ms, tracemalloc peak {peak / MiB:.2f} MiB")


def test_cli_plans_the_virtual_image(tmp_path: Path) -> None:
    path = _virtual(tmp_path)
    run = tmp_path / "run.yaml"
    run.write_text(
        f"input: {path}\noutput: {tmp_path / 'out.zarr'}\ntile: 1024\nsegmenter: watershed\n"
    )
    runner = CliRunner()
    res = runner.invoke(
        _app(), ["plan", "--config", str(run), "-n", "1", "-n", "64", "--threads", "4"]
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "1,000,000 blocks" in text
    assert "1 Prefect task runs" in text
    assert "64 worker(s) × 4 thread(s)" in text
    assert "Planned in" in text and "header-only" in text
    res = runner.invoke(_app(), ["plan", "--config", str(run), "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    (image,) = data["images"]
    assert image["blocks"] == 1_000_000
    assert {s["name"]: s["tasks"] for s in image["stages"]}["segment"] == 1_000_000
    assert data["wall_seconds"]["1"] > data["wall_seconds"]["16"] > 0
    assert data["startup_seconds"] > 0  # a LocalCluster and Prefect's API, measured


def test_start_up_by_case() -> None:
    """`startup_seconds` adds the API's case, the cluster's and the run's end."""
    table = load_costs()
    s = table.startup
    assert s is not None and 0 < s.api_running_s < s.api_stopped_s < s.api_new_database_s
    end = s.flow_and_exit_s
    assert startup_seconds(table, api="running", cluster="none") == pytest.approx(
        s.api_running_s + end
    )
    assert startup_seconds(table, api="new", cluster="local") == pytest.approx(
        s.api_new_database_s + s.local_cluster_s + end
    )
    assert startup_seconds(table, api="remote", cluster="external") == pytest.approx(
        s.api_running_s + end
    )
    # a table from before start-up was measured plans without it; a recalibration keeps it
    old = Costs.from_json({k: v for k, v in table.to_json().items() if k != "startup"})
    assert startup_seconds(old, api="running", cluster="none") is None
    assert Costs.from_json(table.to_json()).startup == s


def test_cli_counts_the_start_up_it_would_find(tmp_path: Path) -> None:
    """One image of one block, no Prefect server anywhere (a new process, a new home): the
    plan says it needs no cluster, and adds the start of Prefect's local API on a new
    database."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SEGPIPE_"))}
    env["HOME"] = str(tmp_path / "home")
    image = synthetic.write_tiff(tmp_path / "one.tif", (300, 200))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "segpipe"), "plan", "-i", str(image), "-n", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "Prefect's local API on a new database" in text, text
    assert "one image of one block: no cluster" in text, text


def test_cli_errors_name_the_problem(tmp_path: Path) -> None:
    res = CliRunner().invoke(_app(), ["plan", "--input", str(tmp_path / "missing.tif")])
    assert res.exit_code == 1
    assert "missing.tif" in res.output


def test_calibrate_times_one_block_of_the_first_image(tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "cells.tif", (600, 500), tile=128, seed=2)
    assert open_source(path).shape == (600, 500)
    config = RunConfig(input=str(path), output=str(tmp_path / "out.zarr"), tile=256)
    result = plan_run(config, calibrate=True, workdir=tmp_path / "cal")
    assert result.costs is not None
    seg = result.costs.segment["otsu"]
    assert seg.ns_per_px > 0 and seg.working_bytes_per_px > 0
    assert set(result.costs.stages) >= {"ingest", "filter", "statistics", "relabel", "measure"}
    assert "cells.tif" in result.costs.source
    # with no table, overheads are unknown (0) but the time is still estimated
    assert result.wall(1, 1) is not None and result.wall(1, 1) > 0  # type: ignore[operator]

"""Disk footprint: the planned figures against what a run really writes, the refusal of a
run into a file system too small for it (a real tmpfs), and `segpipe plan` saying so."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from segpipe import synthetic
from segpipe.io.readers import open_source
from segpipe.plan import image_disk
from segpipe.segmenters import get_segmenter


def _disk_bytes(root: Path) -> int:
    return sum(
        os.lstat(os.path.join(folder, name)).st_blocks * 512
        for folder, _, names in os.walk(root)
        for name in names
    )


def test_the_planned_result_is_near_what_a_run_writes(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "in" / "cells.tif", (1536, 1280), seed=4)
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(path), "-o", str(out), "--tile", "512").exit_code == 0
    planned = image_disk(open_source(str(path)), (512, 512), get_segmenter("otsu"))
    written = _disk_bytes(out / "cells")
    # the figures err on the large side (the image taken as it is), by little on noise
    assert 0.9 * written <= planned.final <= 1.5 * written, (planned.final, written)
    assert planned.peak > planned.final


def test_a_run_into_too_small_a_file_system_is_refused_before_compute(
    run_cli, tmpfs, tmp_path: Path
) -> None:
    small = tmpfs("4m")
    path = synthetic.write_tiff(tmp_path / "in" / "cells.tif", (2048, 1536), seed=2)
    out = small / "out.zarr"
    result = run_cli("-i", str(path), "-o", str(out))
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    planned = image_disk(open_source(str(path)), (2048, 2048), get_segmenter("otsu"))
    assert f"{out}: the run needs about {planned.peak / 2**20:.0f} MiB free at its peak" in message
    assert f"the file system of {small} has 4 MiB free" in message
    assert "--no-space-check" in message
    assert not out.exists()  # refused before the store was made

    from flows.cli import app

    plan = CliRunner().invoke(app, ["plan", "-i", str(path), "-o", str(out)])
    assert plan.exit_code == 0, plan.output
    said = " ".join(plan.output.split())
    assert f"{planned.final / 2**20:.1f} MiB when done" in said, said
    assert "too little, `segpipe run` refuses to start" in said

    anyway = run_cli("-i", str(path), "-o", str(out), "--no-space-check")
    assert "free at its peak" not in anyway.output  # it started, and the disk filled
    assert anyway.exit_code != 0
    assert "No space left on device" in anyway.output or "disk full" in anyway.output.lower()


def test_a_resumed_run_counts_only_the_images_still_to_do(run_cli, tmpfs, tmp_path: Path) -> None:
    small = tmpfs("12m")
    folder = tmp_path / "in"
    for i in range(2):
        synthetic.write_tiff(folder / f"f{i}.tif", (1024, 1024), seed=i)
    out = small / "out.zarr"
    first = run_cli("-i", str(folder), "-o", str(out))
    assert first.exit_code == 0, first.output
    planned = image_disk(open_source(str(folder / "f0.tif")), (2048, 2048), get_segmenter("otsu"))
    assert os.statvfs(small).f_bavail * os.statvfs(small).f_frsize < 2 * planned.peak
    # both images are complete: the rerun needs no room for them
    again = run_cli("-i", str(folder), "-o", str(out), "--resume")
    assert again.exit_code == 0, again.output
    assert "free at its peak" not in again.output


def test_tile_auto_gives_a_3d_watershed_a_smaller_block_than_otsu() -> None:
    """Each segmenter's declared working set sizes its blocks within ``thread_memory``:
    the planned peak of one thread stays within it, and a 3D watershed (50 bytes a
    voxel, a 40-voxel halo) gets a smaller block than otsu (6 bytes, no halo)."""
    from segpipe.config import RunConfig
    from segpipe.io.readers import SourceSpec
    from segpipe.plan import plan_image, tile_for

    config = RunConfig(input="v.zarr", output="o.zarr")
    vol = SourceSpec("v.zarr", "v", "zarr", "ZYX", (192, 512, 512), "uint16", None)
    blocks = {}
    for name in ("otsu", "watershed"):
        segmenter = get_segmenter(name)
        tile = tile_for(config, vol, segmenter)
        blocks[name] = tile
        peak = plan_image(vol, tile=tile, segmenter=segmenter).peak_bytes
        assert peak <= config.thread_memory * 2**30, (name, tile, peak)
    assert blocks["otsu"] == (192, 256, 256)  # as before: it fits
    otsu, watershed = (int(np.prod(blocks[n])) for n in ("otsu", "watershed"))
    assert watershed < otsu
    small = RunConfig(input="v.zarr", output="o.zarr", thread_memory=0.1)
    assert np.prod(tile_for(small, vol, get_segmenter("otsu"))) < otsu

"""Halo exchange: a block assembled from its chunk and its neighbours' slabs equals the
region read straight from the image, and the filter pass gives the same bits either way."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from segpipe import halo
from segpipe.blocks import BlockGrid
from segpipe.image import ImagePlan
from segpipe.io import omezarr
from segpipe.io.readers import open_source
from segpipe.segmenters import get_segmenter
from segpipe.stages.ingest import ingest
from segpipe.stages.statistics import filtered, statistics


@pytest.mark.parametrize(
    ("shape", "tile", "width"),
    [
        ((50, 70), (16, 20), (3, 3)),
        ((50, 70), (16, 20), (3, 0)),  # no halo along X
        ((33, 41), (8, 8), (8, 8)),  # halo as wide as a tile; thin last blocks (1 px)
        ((9, 20, 26), (4, 8, 8), (1, 2, 3)),  # 3D: 26 neighbours
    ],
)
def test_assembled_block_equals_the_region_read_whole(
    tmp_path: Path, shape: tuple[int, ...], tile: tuple[int, ...], width: tuple[int, ...]
) -> None:
    image = np.random.default_rng(0).integers(0, 60000, shape).astype(np.uint16)
    src = str(tmp_path / "raw")
    omezarr.create_array(src, shape=shape, chunks=tile, dtype=np.uint16)
    omezarr.open_array(src, mode="r+")[...] = image
    grid = BlockGrid.build(shape, tile=tile, halo=0)
    slabs = tmp_path / "slabs"
    slabs.mkdir()
    # Ingest-sized regions: rows of blocks, as `ingest_regions` makes for wide chunks.
    for i in range(grid.grid_shape[0]):
        rows = slice(i * tile[0], min((i + 1) * tile[0], shape[0]))
        region = (rows, *(slice(0, n) for n in shape[1:]))
        halo.save_region_slabs(slabs, grid, region, image[region], width)
    for block in BlockGrid.build(shape, tile=tile, halo=width):
        got = halo.assemble(src, grid, block, slabs)
        assert got is not None, block.index
        np.testing.assert_array_equal(got, image[block.read])


def test_missing_or_thin_slabs_ask_for_a_plain_read(tmp_path: Path) -> None:
    shape, tile = (40, 40), (10, 10)
    image = np.arange(1600, dtype=np.uint16).reshape(shape)
    src = str(tmp_path / "raw")
    omezarr.create_array(src, shape=shape, chunks=tile, dtype=np.uint16)
    omezarr.open_array(src, mode="r+")[...] = image
    grid = BlockGrid.build(shape, tile=tile, halo=0)
    for b in grid:
        halo.save_slabs(tmp_path, b.id, image[b.core], (2, 2))
    wide = BlockGrid.build(shape, tile=tile, halo=(3, 3))  # wider than the saved layers
    assert halo.assemble(src, grid, wide.block((1, 1)), tmp_path) is None
    halo.slab_path(tmp_path, grid.block_id((0, 0))).unlink()
    narrow = BlockGrid.build(shape, tile=tile, halo=(2, 2))
    assert halo.assemble(src, grid, narrow.block((1, 1)), tmp_path) is None
    # A block whose neighbours all have slabs still assembles.
    block = narrow.block((2, 2))
    np.testing.assert_array_equal(halo.assemble(src, grid, block, tmp_path), image[18:32, 18:32])
    assert block.read == (slice(18, 32), slice(18, 32))


def test_filtered_blocks_are_the_whole_image_smoothed_with_and_without_slabs(
    client, tmp_path: Path, tiff
) -> None:  # type: ignore[no-untyped-def]
    """Every block's filtered read region (core, and core with a halo, as the segment
    stage asks for it) equals the whole image smoothed by scikit-image, after an ingest
    whose slabs were kept or then removed (a resumed run); the statistics agree; no
    filtered image is stored."""
    from skimage import filters

    image = np.random.default_rng(3).integers(0, 4000, (300, 260)).astype(np.uint16)
    path = tiff("img.tif", image, tile=(64, 64))
    whole = filters.gaussian(
        image.astype(np.float32), sigma=2, mode="nearest", truncate=4.0, preserve_range=True
    ).astype(np.float32)
    results = []
    for keep in (True, False):
        out = tmp_path / f"out-{keep}.zarr"
        plan = ImagePlan(
            open_source(path), str(out), (64, 64), get_segmenter("watershed"), halo=(5, 5)
        )
        raw = ingest(client, plan)
        assert plan.slabs is not None and plan.slabs.halo == (13, 13)  # filter 8 + halo 5
        assert len(list(Path(plan.slabs.directory).glob("*.npz"))) == len(plan.grid())
        if not keep:
            shutil.rmtree(plan.slabs.directory)
        for width in ((0, 0), (5, 5)):
            for block in plan.grid(width):
                got = filtered(plan, block, width)
                np.testing.assert_array_equal(got, whole[block.read])
        results.append(statistics(client, plan, raw))
        assert not [p for p in Path(plan.scratch).rglob("*") if "filtered" in p.name]
    a, b = results
    np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.min, a.max) == (b.min, b.max)

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
from segpipe.stages.statistics import statistics


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


def test_filter_pass_is_the_same_with_and_without_slabs(client, tmp_path: Path, tiff) -> None:  # type: ignore[no-untyped-def]
    """Statistics after an ingest whose slabs were then removed (a resumed run) equal
    those computed with them, and the filtered arrays hold the same bits."""
    image = np.random.default_rng(3).integers(0, 4000, (300, 260)).astype(np.uint16)
    path = tiff("img.tif", image, tile=(64, 64))
    results = []
    for keep in (True, False):
        out = tmp_path / f"out-{keep}.zarr"
        plan = ImagePlan(open_source(path), str(out), (64, 64), get_segmenter("otsu"))
        raw = ingest(client, plan)
        assert plan.slabs is not None
        assert len(list(Path(plan.slabs.directory).glob("*.npz"))) == len(plan.grid())
        if not keep:
            shutil.rmtree(plan.slabs.directory)
        stats = statistics(client, plan, raw)
        results.append((stats, np.asarray(omezarr.open_array(plan.filtered)[...])))
    (a, fa), (b, fb) = results
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.min, a.max) == (b.min, b.max)

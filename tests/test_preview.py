"""Preview PNGs: readable size, outlines exactly on label boundaries, read from the pyramid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from segpipe import image as segpipe_image
from segpipe import pipeline, synthetic
from segpipe.io.readers import open_source
from segpipe.preview import GREYS, HUES, choose_level, colours, outlines, render, stretch
from segpipe.segmenters import get_segmenter
from segpipe.stages.preview import write_preview


def coloured(png: Path) -> tuple[np.ndarray, np.ndarray]:
    """(RGB array, mask of pixels that are not grey)."""
    rgb = np.asarray(Image.open(png).convert("RGB"))
    return rgb, (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def corrupt_level0(group: Path) -> int:
    """Overwrite every chunk of level 0 with junk: reading a pixel of it would fail."""
    n = 0
    for chunk in (group / "0" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a chunk")
            n += 1
    return n


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, client: Any) -> segpipe_image.ImagePlan:
    tmp = tmp_path_factory.mktemp("preview")
    path = synthetic.write_tiff(tmp / "cells.tif", (1100, 900), seed=8)
    plan = segpipe_image.ImagePlan(
        open_source(path), str(tmp / "out.zarr"), (256, 256), get_segmenter("watershed")
    )
    pipeline.run_image(client, plan)
    return plan


def test_preview_png_from_level_1_with_outlines_on_boundaries(
    plane: segpipe_image.ImagePlan, client: Any
) -> None:
    group = Path(plane.group)
    assert corrupt_level0(group) and corrupt_level0(group / "labels" / "instances")
    path = Path(write_preview(client, plane))  # must not touch level 0 (1100 × 900)
    assert path == group / "previews" / "cells.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (450, 550)  # level 1, (columns, rows)
    rgb, drawn = coloured(path)
    labels = zarr.open_array(str(group / "labels" / "instances" / "1"))[:]
    image = zarr.open_array(str(group / "1"))[:]
    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    assert edges.sum() > 1000
    assert np.array_equal(drawn, edges)
    # one colour per object outline; neighbouring ids get different colours
    keys = rgb[drawn].astype(np.int64) @ np.array([65536, 256, 1])
    pairs = np.unique(np.stack([labels[drawn], keys]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(labels[labels > 0]))
    # the grey elsewhere is the level-1 image, contrast-stretched
    grey = rgb[..., 0][~drawn].astype(float)
    assert np.corrcoef(grey, image[~drawn].astype(float))[0, 1] > 0.98
    state = dict(zarr.open_group(str(group)).attrs)["segpipe"]
    assert state["previews"] == ["previews/cells.png"]


def test_volume_preview_is_the_middle_plane(tmp_path: Path, client: Any) -> None:
    rng = np.random.default_rng(9)
    vol = ndi.gaussian_filter(rng.normal(size=(9, 200, 180)), 3)
    vol = ((vol - vol.min()) / np.ptp(vol) * 60000).astype(np.uint16)
    src = tmp_path / "vol.tif"
    tifffile.imwrite(src, vol, metadata={"axes": "ZYX"})
    plan = segpipe_image.ImagePlan(
        open_source(src), str(tmp_path / "out.zarr"), (64, 64, 64), get_segmenter("otsu")
    )
    pipeline.run_image(client, plan)
    path = write_preview(client, plan)
    labels = zarr.open_array(plan.label("instances"))[4]
    big = labels.repeat(3, axis=0).repeat(3, axis=1)  # enlarged ×3 to reach 512 px
    rgb, drawn = coloured(Path(path))
    assert rgb.shape == (600, 540, 3)
    assert np.array_equal(drawn, find_boundaries(big, mode="inner") & (big > 0))


def test_pure_functions() -> None:
    assert choose_level([(5000, 5000), (2500, 2500), (1250, 1250), (625, 625)]) == 3
    assert choose_level([(900, 4000), (450, 2000)], max_size=512) == 1  # coarsest, then strided
    labels = np.zeros((6, 6), int)
    labels[1:5, 1:5] = 3
    rgb = render(np.arange(36.0).reshape(6, 6), labels)
    ring = np.zeros((6, 6), bool)
    ring[1:5, 1:5] = True
    ring[2:4, 2:4] = False
    assert np.array_equal((rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2]), ring)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[5, 5].tolist() == [255, 255, 255]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_integer_stretch_equals_the_float_percentile_formula(dtype: type) -> None:
    """Integer images take exact percentiles from their counts and one lookup per pixel:
    the same grey levels as ``np.percentile`` and the float formula."""
    rng = np.random.default_rng(4)
    info = np.iinfo(dtype)
    for top in (3, 200, int(info.max)):
        data = rng.integers(max(info.min, -top), top, (97, 61)).astype(dtype)
        lo, hi = np.percentile(data.astype(np.float64), [0.5, 99.5])
        hi = hi if hi > lo else lo + 1.0
        want = np.round(np.clip((data - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(stretch(data), want)


def test_outline_colours_are_each_ids_colour() -> None:
    labels = np.zeros((40, 40), np.uint32)
    labels[2:12, 2:12], labels[15:30, 5:20], labels[20:38, 22:39] = 7, 1234, 99
    rgb = render(np.arange(1600, dtype=np.uint16).reshape(40, 40), labels)
    edge = outlines(labels)
    np.testing.assert_array_equal(rgb[edge], colours(labels[edge]))


@pytest.mark.parametrize("dtype", ["uint8", "uint32", "uint64"])
@pytest.mark.parametrize("spread", [1, 1 << 40])  # ids up to a few hundred, or far apart
def test_render_paints_skimage_boundaries_in_each_objects_colour(dtype: str, spread: int) -> None:
    rng = np.random.default_rng(5)
    blobs = ndi.label(ndi.gaussian_filter(rng.random((96, 128)), 2) > 0.5)[0]
    spread = min(spread, int(np.iinfo(dtype).max) // int(blobs.max()))
    labels = (blobs.astype(np.uint64) * spread).astype(dtype)
    image = rng.integers(0, 4000, labels.shape, dtype=np.uint16)
    assert len(np.unique(labels)) == blobs.max() + 1 > 10
    rgb = render(image, labels)
    edge = find_boundaries(labels, mode="inner", connectivity=1) & (labels > 0)
    # the stretched grey, in one of GREYS levels from black to white
    levels = stretch(image).astype(np.float64)
    grey = np.round(np.round(levels * (GREYS - 1) / 255) * 255 / (GREYS - 1))
    assert np.array_equal(rgb[~edge], np.repeat(grey[~edge][:, None], 3, axis=1))
    assert np.array_equal(rgb[edge], colours(labels[edge]))


def test_outline_colours_are_hues_distinct_from_greys() -> None:
    table = colours(np.arange(3 * HUES, dtype=np.uint64)).astype(int)
    assert len(np.unique(table[:HUES], axis=0)) == HUES
    assert np.array_equal(table[:HUES], table[HUES : 2 * HUES])  # ids HUES apart share one
    assert (np.ptp(table, axis=1) > 100).all()  # saturated: never mistaken for a grey
    assert (np.abs(np.diff(table, axis=0)).max(axis=1) > 60).all()  # neighbouring ids differ

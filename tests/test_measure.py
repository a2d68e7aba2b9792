"""Object and segment tables measured block by block equal scikit-image on the whole image."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi
from skimage.measure import regionprops, regionprops_table

from segpipe import image as segpipe_image
from segpipe import measure, pipeline, stages
from segpipe.io.readers import open_source
from segpipe.panoptic import default_catalogue
from segpipe.segmenters import get_segmenter

PROPS = (
    "label",
    "area",
    "bbox",
    "centroid",
    "intensity_mean",
    "intensity_min",
    "intensity_max",
)


def blobs(
    shape: tuple[int, ...], seed: int, sigma: float, planted: list[tuple[int, ...]]
) -> np.ndarray:
    """uint16 image of bright irregular blobs on a noisy background, plus a lumpy
    blob of radius ~5 at each ``planted`` centre (cleared around, so it stays alone)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=shape), sigma)
    field = (field - field.mean()) / field.std()
    grid = np.indices(shape)
    for centre in planted:
        dist = np.sqrt(sum((g - c + 0.5) ** 2 for g, c in zip(grid, centre, strict=True)))
        field[dist < 9] = -5
        field[dist < 5 + rng.uniform(-1.5, 1.5, size=shape)] = 5
    noise = rng.integers(0, 400, size=shape)
    return np.where(field > 0.8, 20000 + noise * 20, noise).astype(np.uint16)


def run(tmp: Path, image: np.ndarray, tile: int, client: Any) -> dict[str, Any]:
    axes = "ZYX" if image.ndim == 3 else "YX"
    path = tmp / "img.tif"
    tifffile.imwrite(path, image, metadata={"axes": axes})
    seg = get_segmenter("threshold", value=10000.0, sigma=0.0)
    plan = segpipe_image.ImagePlan(
        open_source(path), str(tmp / "out.zarr"), (tile,) * image.ndim, seg
    )
    result = pipeline.run_image(client, plan)
    # run_image's own tables and panoptic labels (one relabel pass made them all)
    tables = stages.measure.tables_dir(plan)
    fused = pq.read_table(tables / "objects.parquet").to_pydict()
    panoptic = zarr.open_array(plan.label("panoptic"))[:]
    return {"plan": plan, "tile": tile, "fused": fused, "panoptic": panoptic, "result": result}


def blocks_spanned(labels: np.ndarray, tile: int) -> dict[int, int]:
    """Number of blocks each object has pixels in."""
    out = {}
    for r in regionprops(labels):
        blocks = {tuple(c) for c in (r.coords // tile).tolist()}
        out[r.label] = len(blocks)
    return out


def check_against_skimage(case: dict[str, Any]) -> dict[int, int]:
    plan = case["plan"]
    labels = zarr.open_array(plan.label("instances"))[:]
    image = zarr.open_array(plan.raw)[:]
    semantic = zarr.open_array(plan.label("semantic"))[:]
    ref = regionprops_table(labels, intensity_image=image, properties=PROPS)
    # panoptic ids of the pipeline's own pass: class * divisor + instance, by hand
    divisor = 1000 if labels.max() < 1000 else 10000
    assert np.array_equal(case["panoptic"], semantic.astype(np.uint64) * divisor + labels)
    got = case["fused"]
    assert got["label"] == ref["label"].tolist()
    assert got["area"] == ref["area"].astype(int).tolist()
    for k in range(2 * labels.ndim):
        assert got[f"bbox-{k}"] == ref[f"bbox-{k}"].tolist()
    for k in range(labels.ndim):
        np.testing.assert_allclose(got[f"centroid-{k}"], ref[f"centroid-{k}"], rtol=1e-12)
    np.testing.assert_allclose(got["intensity_mean"], ref["intensity_mean"], rtol=1e-12)
    assert got["intensity_min"] == ref["intensity_min"].astype(float).tolist()
    assert got["intensity_max"] == ref["intensity_max"].astype(float).tolist()
    # class: the semantic value under the object
    expected_class = ndi.maximum(semantic, labels, ref["label"]).astype(int).tolist()
    assert got["class"] == expected_class
    return blocks_spanned(labels, case["tile"])


def test_regionprops_of_objects_across_2_and_4_blocks_2d(tmp_path: Path, client: Any) -> None:
    image = blobs((150, 140), seed=1, sigma=3.0, planted=[(16, 64), (96, 64)])
    case = run(tmp_path, image, 32, client)
    spans = check_against_skimage(case)
    assert {1, 2, 4} <= set(spans.values()), sorted(set(spans.values()))
    # a rerun of the complete image keeps its table as it is
    plan = case["plan"]
    table = stages.measure.tables_dir(plan) / "objects.parquet"
    first, stamp = table.read_bytes(), table.stat().st_mtime_ns
    assert pipeline.run_image(client, plan).stages == {"skipped": 1.0}
    assert table.read_bytes() == first and table.stat().st_mtime_ns == stamp


def test_regionprops_of_objects_across_2_4_and_8_blocks_3d(tmp_path: Path, client: Any) -> None:
    image = blobs((32, 48, 44), seed=2, sigma=2.5, planted=[(8, 8, 16), (8, 32, 32), (16, 16, 16)])
    case = run(tmp_path, image, 16, client)
    spans = check_against_skimage(case)
    assert {2, 4, 8} <= set(spans.values()), sorted(set(spans.values()))


# -- pure block functions ---------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [(5, 7), (16, 3), (1, 64), (64, 64)])
def test_merged_block_groups_equal_whole_image_groups(chunks: tuple[int, int]) -> None:
    """dask-image style oracle: any chunking gives the whole-image statistics."""
    rng = np.random.default_rng(3)
    labels = ndi.label(ndi.gaussian_filter(rng.normal(size=(41, 50)), 2) > 0.1)[0]
    semantic = np.where(labels > 0, 1 + labels % 3, 0)
    image = rng.normal(size=labels.shape).astype(np.float32)
    whole = measure.merge_groups([measure.block_groups(labels, semantic, image)])
    parts = []
    for i, j in itertools.product(range(0, 41, chunks[0]), range(0, 50, chunks[1])):
        region = (slice(i, i + chunks[0]), slice(j, j + chunks[1]))
        parts.append(
            measure.block_groups(labels[region], semantic[region], image[region], offset=(i, j))
        )
    merged = measure.merge_groups(parts[::-1])  # block order does not matter
    for name in measure.Groups.__dataclass_fields__:
        a, b = getattr(whole, name), getattr(merged, name)
        if name == "isum":
            np.testing.assert_allclose(a, b, rtol=1e-12)
        else:
            assert np.array_equal(a, b), name


def test_object_class_is_the_class_of_most_of_its_pixels() -> None:
    labels = np.array([[1, 1, 1, 2, 2], [1, 1, 0, 2, 2]])
    semantic = np.array([[1, 2, 2, 3, 1], [2, 1, 0, 1, 3]])  # 1: three 2s, two 1s; 2: tie 1/3
    image = np.arange(10, dtype=np.uint16).reshape(2, 5)
    parts = [
        measure.block_groups(labels[:, :2], semantic[:, :2], image[:, :2], offset=(0, 0)),
        measure.block_groups(labels[:, 2:], semantic[:, 2:], image[:, 2:], offset=(0, 2)),
    ]
    names = ["background", "a", "b", "c"]
    table = measure.objects_table(measure.merge_groups(parts), default_catalogue(names))
    got = table.to_pydict()
    assert got["label"] == [1, 2]
    assert got["class"] == [2, 1]  # a tie goes to the smaller class id
    assert got["class_name"] == ["b", "a"]
    assert got["area"] == [5, 4]
    assert got["intensity_min"] == [0.0, 3.0] and got["intensity_max"] == [6.0, 9.0]


def test_empty_image_writes_empty_tables(tmp_path: Path, client: Any) -> None:
    case = run(tmp_path, np.zeros((40, 30), np.uint16), 16, client)
    tables = stages.measure.tables_dir(case["plan"])
    objects = pq.read_table(tables / "objects.parquet")
    segments = pq.read_table(tables / "segments.parquet").to_pydict()
    assert objects.num_rows == 0 and "intensity_mean" in objects.column_names
    assert segments["id"] == [0] and segments["area"] == [1200]
    assert segments["bbox-2"] == [40] and segments["bbox-3"] == [30]


@pytest.mark.parametrize("seed", range(12))
def test_local_groups_equal_block_groups_of_the_relabelled_block(seed: int) -> None:
    """The one-sweep sums over local ids equal the sort over global ids: objects joined
    through another block (two local ids, one global id), 2D and 3D, and objects of
    several classes (the sweep's fallback)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 30, size=2 + seed % 2))
    local = ndi.label(rng.random(shape) > 0.6)[0].astype(np.uint32)
    n = int(local.max())
    lut = np.zeros(n + 1, np.uint64)
    lut[1:] = rng.integers(1, max(2, n // 2 + 1), size=n)  # some ids shared
    semantic = ((local > 0) * rng.integers(1, 4)).astype(np.uint8)
    if seed % 3 == 0:  # classes that split objects, and stuff under background
        semantic = rng.integers(0, 4, size=shape).astype(np.uint8)
    image = rng.integers(0, 60000, size=shape).astype(np.uint16)
    offset = [int(x) for x in rng.integers(0, 500, size=len(shape))]
    got = measure.local_groups(local, lut, semantic, image, offset=offset)
    want = measure.block_groups(lut[local], semantic, image, offset=offset)
    for name in measure.Groups.__dataclass_fields__:
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("seed", range(4))
def test_local_groups_over_long_runs_and_float_images(seed: int) -> None:
    """Blobs (long runs of one id along rows, which the sweep takes a run at a time) and
    a float32 image: the same sums, boxes and extrema as the sort."""
    rng = np.random.default_rng(100 + seed)
    shape = (37, 91) if seed % 2 else (5, 23, 61)
    local = ndi.label(ndi.gaussian_filter(rng.random(shape), 1.5) > 0.52)[0].astype(np.uint32)
    n = int(local.max())
    lut = np.arange(n + 1, dtype=np.uint64)
    semantic = (local > 0).astype(np.uint8) * np.uint8(1 + seed % 3)
    image = rng.normal(100, 30, size=shape).astype(np.float32)
    got = measure.local_groups(local, lut, semantic, image, offset=[0] * len(shape))
    want = measure.block_groups(lut[local], semantic, image, offset=[0] * len(shape))
    assert n >= 2
    for name in measure.Groups.__dataclass_fields__:
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-12, err_msg=name
        )

"""Adaptive thresholding: its halo, hand cases, synthetic nuclei, and tiled == whole image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from distributed import Client
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.filters import gaussian, threshold_local
from skimage.measure import label

from segpipe.errors import SegmenterError
from segpipe.image import ImagePlan
from segpipe.io.readers import open_source
from segpipe.pipeline import run_image
from segpipe.segmenters import get_segmenter
from segpipe.segmenters.local import LocalThreshold, local_foreground, local_halo
from segpipe.segmenters.threshold import Otsu, otsu_threshold
from segpipe.synthetic import render, write_tiff
from tests.helpers import panoptic_quality, segment_whole, whole_image_stats

# -- helpers -------------------------------------------------------------------


def assert_same_labels(a: NDArray[np.integer], b: NDArray[np.integer]) -> None:
    """Equal up to renumbering: same background, and ids pair one to one."""
    np.testing.assert_array_equal(a > 0, b > 0)
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]], axis=1).astype(np.int64), axis=0)
    assert len(pairs) == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def nuclei(
    seed: int, shape: tuple[int, int] = (256, 256)
) -> tuple[NDArray[np.uint16], NDArray[np.uint32]]:
    return render(tuple(slice(0, n) for n in shape), seed=seed)


# -- halo ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "method", "expected"),
    [
        (31, "gaussian", 20),  # sigma 5: int(4 * 5 + 0.5)
        (51, "gaussian", 33),  # sigma 8.33: int(33.83)
        (3, "gaussian", 1),  # sigma 1/3: int(1.83)
        (31, "mean", 15),
        (31, "median", 15),
        (51, "median", 25),
    ],
)
def test_halo_is_what_threshold_local_reads(block_size: int, method: str, expected: int) -> None:
    seg = LocalThreshold(block_size=block_size, method=method)
    assert seg.halo(2) == (expected, expected)
    assert seg.halo(3) == (expected,) * 3
    assert local_halo(block_size, method, 2) == (expected, expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["gaussian", "mean", "median"])
def test_halo_is_enough_and_no_more(method: str) -> None:
    rng = np.random.default_rng(3)
    image = rng.random((96, 96), dtype=np.float32)
    block_size = 15
    (h, _) = local_halo(block_size, method, 2)  # type: ignore[arg-type]
    whole = threshold_local(image, block_size, method=method)
    core = (slice(40, 56), slice(40, 56))
    for halo, equal in [(h, True), (h - 1, False)]:
        read = tuple(slice(c.start - halo, c.stop + halo) for c in core)
        local = threshold_local(image[read], block_size, method=method)[halo:-halo, halo:-halo]
        assert np.array_equal(local, whole[core]) is equal


# -- hand-computed cases ---------------------------------------------------------


def test_one_bright_pixel_is_the_only_foreground() -> None:
    image = np.zeros((7, 7), np.float32)
    image[3, 3] = 9.0
    # its 3x3 mean is 1 (< 9); its neighbours' means are 1 too (> 0); far pixels: 0 > 0 fails
    expected = np.zeros((7, 7), bool)
    expected[3, 3] = True
    got = local_foreground(image, block_size=3, method="mean")
    np.testing.assert_array_equal(got, expected)


def test_floor_removes_what_the_local_rule_alone_keeps() -> None:
    image = np.zeros((7, 7), np.float32)
    image[3, 3] = 9.0
    image[0, 0] = 2.0  # brighter than its neighbourhood, but dim for the whole image
    without = local_foreground(image, block_size=3, method="mean")
    assert without[0, 0] and without[3, 3]
    with_floor = local_foreground(image, block_size=3, method="mean", floor=np.float32(4))
    assert with_floor.sum() == 1 and with_floor[3, 3]


def test_offset_lowers_the_local_threshold() -> None:
    image = np.array([[0, 0, 0, 3, 3, 3, 0, 0, 0]], np.float32)
    # 3x3 means (the single row reflects onto itself): 0, 0, 1, 2, 3, 2, 1, 0, 0
    plain = local_foreground(image, block_size=3, method="mean")
    np.testing.assert_array_equal(plain[0], [0, 0, 0, 1, 0, 1, 0, 0, 0])
    # 0.5 below the means: the plateau's middle passes, and so does flat background ...
    lowered = local_foreground(image, block_size=3, method="mean", offset=0.5)
    np.testing.assert_array_equal(lowered[0], [1, 1, 0, 1, 1, 1, 0, 1, 1])
    # ... which is what the floor is for
    floored = local_foreground(image, block_size=3, method="mean", offset=0.5, floor=np.float32(1))
    np.testing.assert_array_equal(floored[0], [0, 0, 0, 1, 1, 1, 0, 0, 0])


def test_floor_is_half_way_from_background_to_otsu() -> None:
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.normal(100, 5, 900), rng.normal(300, 5, 100)])
    stats = whole_image_stats(image.astype(np.float32).reshape(20, 50))
    background, otsu = stats.percentile(1), otsu_threshold(stats)
    floor = LocalThreshold(sigma=0).prepare(stats)["floor"]
    assert floor == pytest.approx((background + otsu) / 2, rel=1e-6)
    assert LocalThreshold(floor=None).prepare(stats) == {"floor": None}
    assert LocalThreshold(floor=150).prepare(stats)["floor"] == np.float32(150)
    assert LocalThreshold(floor_fraction=1.0).prepare(stats)["floor"] == otsu


def test_even_block_size_is_refused() -> None:
    with pytest.raises(SegmenterError, match="block_size"):
        get_segmenter("local", block_size=30)
    with pytest.raises(SegmenterError, match="method"):
        get_segmenter("local", method="otsu")


# -- synthetic nuclei -------------------------------------------------------------


@pytest.mark.parametrize(("seed", "bound"), [(0, 0.67), (1, 0.7), (2, 0.67)])
def test_finds_synthetic_nuclei(seed: int, bound: float) -> None:
    # measured with the defaults: PQ 0.689, 0.729, 0.688 (global Otsu: 0.625, 0.578, 0.635);
    # a pointwise rule cannot split every touching pair, which caps PQ below 0.8 here
    image, truth = nuclei(seed)
    pq = panoptic_quality(truth, segment_whole(LocalThreshold(), image))
    assert pq >= bound
    assert pq > panoptic_quality(truth, segment_whole(Otsu(), image))


def test_flat_background_stays_background() -> None:
    image, truth = nuclei(0)
    far = ~ndi.binary_dilation(truth > 0, np.ones((17, 17), bool))  # 8+ pixels from nuclei
    assert far.sum() > 5000
    assert (segment_whole(LocalThreshold(), image)[far] > 0).sum() == 0
    assert (segment_whole(LocalThreshold(floor=None), image)[far] > 0).sum() > 1000


@pytest.mark.parametrize("seed", [0, 1])
def test_uneven_illumination_is_followed(seed: int) -> None:
    # a left-to-right ramp (x0.5 to x1.5) pushes a global threshold into the bright side's
    # background; measured PQ 0.70 / 0.73 local vs 0.46 / 0.44 global Otsu
    image, truth = nuclei(seed)
    ramp = np.linspace(0.5, 1.5, image.shape[1], dtype=np.float32)
    lit = image * ramp
    assert panoptic_quality(truth, segment_whole(LocalThreshold(), lit)) >= 0.65
    assert panoptic_quality(truth, segment_whole(Otsu(), lit)) < 0.5


@pytest.mark.parametrize("method", ["gaussian", "mean", "median"])
def test_blocks_with_halo_equal_the_whole_image(method: str) -> None:
    image, _ = nuclei(4, (128, 160))
    seg = LocalThreshold(method=method)
    smoothed = seg.preprocess(image.astype(np.float32))
    params = seg.prepare(whole_image_stats(smoothed))
    whole = seg.segment(smoothed, params).semantic
    assert whole is not None
    halo = seg.halo(2)
    for core in [
        (slice(0, 40), slice(0, 40)),  # touches two image borders
        (slice(50, 80), slice(60, 75)),  # interior, smaller than block_size
        (slice(100, 128), slice(20, 160)),  # bottom border, full width
    ]:
        read = tuple(
            slice(max(c.start - h, 0), min(c.stop + h, n))
            for c, h, n in zip(core, halo, image.shape, strict=True)
        )
        semantic = seg.segment(smoothed[read], params).semantic
        assert semantic is not None
        inner = tuple(
            slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, read, strict=True)
        )
        np.testing.assert_array_equal(semantic[inner], whole[core])


# -- through the pipeline -----------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # not a multiple of the tiles below, so edge blocks are ragged
    return write_tiff(tmp_path_factory.mktemp("src") / "nuclei.tif", (150, 200), seed=5)


def reference_labels(path: Path, seg: LocalThreshold) -> NDArray[np.integer]:
    """scikit-image on the whole image: smooth, threshold_local and the floor, label."""
    image = tifffile.imread(path).astype(np.float32)
    smoothed = gaussian(image, sigma=seg.opts.sigma, preserve_range=True).astype(np.float32)
    floor = seg.prepare(whole_image_stats(smoothed))["floor"]
    o = seg.opts
    local = threshold_local(smoothed, o.block_size, method=o.method, offset=o.offset)
    labels: NDArray[np.integer] = label((smoothed > local) & (smoothed > floor), connectivity=2)
    return labels


@pytest.mark.integration
@pytest.mark.parametrize(
    ("tile", "options"),
    [
        (64, {}),
        (48, {}),
        (20, {}),  # smaller than block_size (31) and than the halo (20 + filter)
        (40, {"method": "median", "block_size": 21}),
        (40, {"method": "mean", "offset": -500.0}),
    ],
)
def test_tiled_pipeline_equals_whole_image(
    client: Client, source: Path, tmp_path: Path, tile: int, options: dict[str, object]
) -> None:
    seg = LocalThreshold(**options)
    plan = ImagePlan(open_source(source), str(tmp_path), (tile, tile), seg)
    result = run_image(client, plan)
    tiled = np.asarray(zarr.open_array(str(tmp_path / "nuclei" / "labels" / "instances" / "0"))[:])
    expected = reference_labels(source, seg)
    assert result.objects == int(expected.max()) > 10
    assert_same_labels(tiled, expected)

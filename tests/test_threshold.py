"""Thresholds from blockwise statistics equal scikit-image's on the whole float32 image."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import skimage.data
from scipy import ndimage as ndi
from skimage import filters
from skimage.measure import label

from segpipe.blocks import BlockGrid
from segpipe.segmenters.threshold import (
    MultiOtsu,
    Otsu,
    Threshold,
    histogram_threshold,
    label_classes,
    li_threshold,
    otsu_threshold,
    triangle_threshold,
)
from segpipe.stats import Extrema, ImageStats, block_histogram, hist_range, merge_histograms
from segpipe.synthetic import render


def blockwise_stats(image: np.ndarray, tile: int | tuple[int, ...]) -> ImageStats:
    """ImageStats the way the pipeline builds them: extrema pass, then histogram pass."""
    grid = BlockGrid.build(image.shape, tile=tile)
    extrema = Extrema.merge(Extrema.of(image[b.core]) for b in grid)
    lo, hi = hist_range(extrema)
    return merge_histograms([block_histogram(image[b.core], lo, hi) for b in grid], extrema)


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """Same background, and a bijection between the nonzero labels of ``a`` and ``b``."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    fa, fb = a[a != 0], b[b != 0]
    pairs = np.unique(np.stack([fa, fb], axis=1), axis=0)
    return len(pairs) == len(np.unique(fa)) == len(np.unique(fb))


def _random(seed: int, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0.0, 1.0, shape)
    if kind == "uniform":
        return rng.uniform(0.0, 1000.0, shape)
    if kind == "bimodal":
        return np.where(rng.random(shape) < 0.3, rng.normal(10, 1, shape), rng.normal(0, 2, shape))
    if kind == "levels":
        return rng.integers(0, 6, shape)
    if kind == "uint16":
        return rng.integers(0, 65535, shape)
    if kind == "blobs":
        return ndi.gaussian_filter(rng.random(shape), 2.0)
    raise AssertionError(kind)


# (image factory, tile): realistic images and random ones of 1..3 axes.
IMAGES: dict[str, tuple[Callable[[], np.ndarray], int | tuple[int, ...]]] = {
    "camera": (skimage.data.camera, 61),
    "coins": (skimage.data.coins, (40, 100)),
    "synthetic": (lambda: render((slice(0, 180), slice(0, 260)), seed=4)[0], 64),
    "synthetic-dense": (lambda: render((slice(30, 130), slice(7, 300)), seed=9, density=1)[0], 50),
    "normal-2d": (lambda: _random(0, "normal", (100, 100)), 33),
    "uniform-3d": (lambda: _random(1, "uniform", (19, 33, 27)), (5, 8, 30)),
    "bimodal-3d": (lambda: _random(2, "bimodal", (22, 39, 12)), 9),
    "levels-1d": (lambda: _random(3, "levels", (301,)), 40),
    "uint16-3d": (lambda: _random(4, "uint16", (51, 38, 43)), 16),
    "blobs-3d": (lambda: _random(5, "blobs", (30, 40, 50)), (7, 40, 11)),
}
EXACT = {
    "otsu": filters.threshold_otsu,
    "yen": filters.threshold_yen,
    "isodata": filters.threshold_isodata,
    "minimum": filters.threshold_minimum,
    "triangle": filters.threshold_triangle,
}


def _image(name: str) -> tuple[np.ndarray, ImageStats]:
    factory, tile = IMAGES[name]
    image = factory().astype(np.float32)
    return image, blockwise_stats(image, tile)


def _reference(fn: Callable[..., object], image: np.ndarray, **kwargs: object) -> object:
    # scikit-image warns about volumes whose last axis is <= 4 ("looks like RGB").
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(image, **kwargs)


# -- exact methods ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("method", sorted(EXACT))
def test_histogram_methods_equal_scikit_image_exactly(name: str, method: str) -> None:
    image, stats = _image(name)
    try:
        expected = _reference(EXACT[method], image)
    except RuntimeError:  # threshold_minimum on a histogram without two peaks
        with pytest.raises(RuntimeError):
            histogram_threshold(stats, method)  # type: ignore[arg-type]
        return
    got = histogram_threshold(stats, method)  # type: ignore[arg-type]
    assert got == expected, (got, expected)


def test_method_functions_equal_dispatch() -> None:
    image, stats = _image("camera")
    assert otsu_threshold(stats) == filters.threshold_otsu(image)
    assert triangle_threshold(stats) == filters.threshold_triangle(image)


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("classes", [2, 3, 4])
def test_multiotsu_equals_scikit_image_exactly(name: str, classes: int) -> None:
    image, stats = _image(name)
    expected = _reference(filters.threshold_multiotsu, image, classes=classes)
    got = MultiOtsu(sigma=0, classes=classes).prepare(stats)["thresholds"]
    np.testing.assert_array_equal(got, expected)


def test_multiotsu_small_case() -> None:
    # Seven pixels on four levels: scikit-image splits {0} | {1, 2} | {3}, i.e. thresholds
    # at the centres of the bins holding 0 and 2 (about 0.0176 and 1.998).
    image = np.array([0, 2, 1, 3, 3, 0, 1], np.float32)
    stats = blockwise_stats(image, 3)
    expected = filters.threshold_multiotsu(image, classes=3)
    np.testing.assert_allclose(expected, [0.0176, 1.998], atol=1e-3)
    np.testing.assert_array_equal(
        MultiOtsu(sigma=0, classes=3).prepare(stats)["thresholds"], expected
    )


def test_multiotsu_too_few_values_raises_like_scikit_image() -> None:
    image = np.repeat(np.float32([0, 5]), 10)
    with pytest.raises(ValueError, match="cannot be thresholded"):
        filters.threshold_multiotsu(image, classes=3)
    with pytest.raises(ValueError, match="cannot be thresholded"):
        MultiOtsu(sigma=0, classes=3).prepare(blockwise_stats(image, 3))


# -- approximate methods -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_li_within_one_bin_of_scikit_image(name: str) -> None:
    image, stats = _image(name)
    width = (stats.max - stats.min) / 256
    expected = float(filters.threshold_li(image))
    got = float(li_threshold(stats))
    assert abs(got - expected) <= width, (got, expected, abs(got - expected) / width)
    assert histogram_threshold(stats, "li") == li_threshold(stats)


@pytest.mark.parametrize(
    ("kind", "seed", "shape"),
    [
        ("normal", 8, (87, 42)),
        ("normal", 188, (54, 16)),
        ("uniform", 101, (40, 113)),
        ("uniform", 149, (40, 14)),
        ("gamma", 167, (93, 18)),
        ("exponential", 102, (55, 23)),
    ],
)
def test_li_within_three_bins_on_small_random_images(
    kind: str, seed: int, shape: tuple[int, int]
) -> None:
    """Li iterates on class means; on a few hundred binned pixels the fixed point can
    move by more than a bin (realistic images stay within one: see the test above)."""
    rng = np.random.default_rng(seed)
    image = {
        "normal": lambda: rng.normal(size=shape),
        "uniform": lambda: rng.random(shape),
        "gamma": lambda: rng.gamma(2.0, size=shape),
        "exponential": lambda: rng.exponential(size=shape),
    }[kind]().astype(np.float32)
    stats = blockwise_stats(image, 17)
    width = (stats.max - stats.min) / 256
    expected = float(filters.threshold_li(image))
    got = float(li_threshold(stats))
    assert abs(got - expected) <= 3 * width, (got, expected, abs(got - expected) / width)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_mean_within_one_bin_of_scikit_image(name: str) -> None:
    image, stats = _image(name)
    width = (stats.max - stats.min) / 256
    assert abs(
        float(histogram_threshold(stats, "mean")) - float(filters.threshold_mean(image))
    ) <= (width)


# -- constant images ----------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -2.5, 1234.0, 65535.0, 1e6])
def test_constant_image_threshold_is_the_value(value: float) -> None:
    image = np.full((6, 7), value, np.float32)
    stats = blockwise_stats(image, 4)
    for method in ["otsu", "li", "yen", "triangle", "isodata", "mean", "minimum"]:
        assert histogram_threshold(stats, method) == np.float32(value), method  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.0, 300.0, 65535.0])
def test_constant_image_segmenters(value: float) -> None:
    image = np.full((5, 5), value, np.float32)
    stats = blockwise_stats(image, 2)
    # scikit-image's own answer for a constant image is the value itself.
    assert filters.threshold_otsu(image) == np.float32(value)
    assert Otsu(sigma=0).prepare(stats)["threshold"] == np.float32(value)
    np.testing.assert_array_equal(
        MultiOtsu(sigma=0, classes=3).prepare(stats)["thresholds"], np.float32([value, value])
    )
    result = Otsu(sigma=0).segment(image, Otsu(sigma=0).prepare(stats))
    assert not result.semantic.any() and not result.instances.any()


def test_unknown_method_is_an_error() -> None:
    stats = blockwise_stats(np.arange(10, dtype=np.float32), 3)
    with pytest.raises(ValueError, match="Expected a threshold method, got 'median' instead"):
        histogram_threshold(stats, "median")  # type: ignore[arg-type]


# -- segment() outputs ------------------------------------------------------------


@pytest.mark.parametrize("name", ["coins", "synthetic", "blobs-3d", "levels-1d"])
def test_otsu_segment_matches_scikit_image(name: str) -> None:
    image, stats = _image(name)
    seg = Otsu(sigma=0)
    result = seg.segment(image, seg.prepare(stats))
    mask = image > filters.threshold_otsu(image)
    np.testing.assert_array_equal(result.semantic, mask.astype(np.uint8))
    assert result.semantic.dtype == np.uint8
    assert same_up_to_renumbering(result.instances, label(mask, connectivity=image.ndim))


@pytest.mark.parametrize("name", ["camera", "synthetic", "blobs-3d"])
@pytest.mark.parametrize("classes", [2, 3, 4])
def test_multiotsu_segment_matches_scikit_image(name: str, classes: int) -> None:
    image, stats = _image(name)
    seg = MultiOtsu(sigma=0, classes=classes)
    result = seg.segment(image, seg.prepare(stats))
    expected_classes = np.digitize(image, bins=filters.threshold_multiotsu(image, classes=classes))
    np.testing.assert_array_equal(result.semantic, expected_classes)
    # Objects: connected regions of one class each, class 0 being background.
    expected = np.zeros(image.shape, np.int64)
    for c in range(1, classes):
        regions = label(expected_classes == c, connectivity=image.ndim)
        expected[regions > 0] = regions[regions > 0] + expected.max()
    assert same_up_to_renumbering(result.instances, expected)
    assert seg.classes == ["background", *(f"class{i}" for i in range(1, classes))]


@pytest.mark.parametrize("method", ["li", "yen", "triangle", "isodata", "mean", "minimum"])
@pytest.mark.parametrize("above", [True, False])
def test_threshold_segment_matches_scikit_image(method: str, above: bool) -> None:
    image, stats = _image("coins")
    seg = Threshold(sigma=0, method=method, above=above)
    params = seg.prepare(stats)
    t = params["threshold"]
    reference = getattr(filters, f"threshold_{method}")(image)
    if method in ("li", "mean"):
        assert abs(float(t) - float(reference)) <= (stats.max - stats.min) / 256
    else:
        assert t == reference
    result = seg.segment(image, params)
    mask = image > t if above else image <= t
    np.testing.assert_array_equal(result.semantic, mask.astype(np.uint8))
    assert same_up_to_renumbering(result.instances, label(mask, connectivity=2))


def test_threshold_fixed_value() -> None:
    image = np.array([[0, 5, 0, 0], [0, 0, 9, 0], [3, 0, 0, 7]], np.float32)
    seg = Threshold(sigma=0, value=4.0)
    params = seg.prepare(blockwise_stats(image, 2))
    assert params["threshold"] == np.float32(4.0)
    result = seg.segment(image, params)
    np.testing.assert_array_equal(result.semantic, image > 4)
    # (0,1) and (1,2) touch diagonally: one object; (2,3) touches (1,2) diagonally too.
    np.testing.assert_array_equal(result.instances, [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_label_classes_hand_made() -> None:
    semantic = np.array(
        [
            [1, 1, 0, 2],
            [0, 2, 2, 0],
            [1, 0, 0, 1],
        ],
        np.uint8,
    )
    labels = label_classes(semantic)
    # Class 1 at (0,0),(0,1) is one object; the class-2 pixels, all 8-connected, another;
    # (2,0) touches (1,1) only, which is class 2: its own object; so is (2,3).
    expected = np.array([[1, 1, 0, 2], [0, 2, 2, 0], [3, 0, 0, 4]])
    assert same_up_to_renumbering(labels, expected)


# -- any finite scale ------------------------------------------------------------------


def _stats(image: np.ndarray, tile: int | tuple[int, ...]) -> ImageStats:
    """blockwise_stats in the image's own float dtype (float32, or float64 kept whole)."""
    dtype = image.dtype if image.dtype == np.float64 else np.float32
    grid = BlockGrid.build(image.shape, tile=tile)
    extrema = Extrema.merge(Extrema.of(image[b.core]) for b in grid)
    lo, hi = hist_range(extrema, dtype)
    parts = [block_histogram(image[b.core], lo, hi) for b in grid]
    return merge_histograms(parts, extrema, dtype=dtype)


def _scaled(name: str, scale: str) -> tuple[np.ndarray, int | tuple[int, ...]]:
    """The image as the pipeline's segmenter sees it at ``scale``, and its tile."""
    factory, tile = IMAGES[name]
    base = factory()
    if scale == "x1":
        return base.astype(np.float32), tile
    if scale == "uint64 x2**47":  # an integer image the pipeline turns into float32
        levels = np.round((base - base.min()) / np.ptp(base) * 60000).astype(np.uint64)
        return (levels * np.uint64(2**47)).astype(np.float32), tile
    if scale == "float32 x1e-30":
        return (base.astype(np.float64) * 1e-30).astype(np.float32), tile
    if scale == "float64 1e12 offset":  # noise far below float32's step there (65536)
        return 1e12 + (base - base.min()) / np.ptp(base), tile
    if scale == "float32 1e12 offset":  # a range of a few float32 steps
        return (1e12 + (base - base.min()) / np.ptp(base) * 3e5).astype(np.float32), tile
    raise AssertionError(scale)


SCALES = ["x1", "uint64 x2**47", "float32 x1e-30", "float64 1e12 offset", "float32 1e12 offset"]
# float32 and float64 copies give scikit-image the same masks on these (on uint16-3d,
# multi-Otsu's float32 centre 43646.0 lands on pixels that its float64 one does not).
SCALE_IMAGES = ["camera", "coins", "synthetic", "bimodal-3d", "blobs-3d"]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", SCALE_IMAGES)
def test_histogram_methods_at_any_scale_equal_scikit_image_on_float64(
    name: str, scale: str
) -> None:
    """Each method's foreground equals scikit-image's on the float64 copy of the whole
    image (its float32 arithmetic overflows at x2**47, underflows at x1e-30, and float32
    holds no 256 bins at 1e12)."""
    image, tile = _scaled(name, scale)
    stats = _stats(image, tile)
    wide = image.astype(np.float64)
    for method in sorted(EXACT):
        try:
            expected = _reference(EXACT[method], wide)
        except RuntimeError:  # threshold_minimum without two peaks
            continue
        got = histogram_threshold(stats, method)  # type: ignore[arg-type]
        assert got.dtype == image.dtype, method
        np.testing.assert_array_equal(image > got, wide > expected, err_msg=method)
    # Li iterates on bin centres: within one bin, or (on a few float32 levels) between
    # the same two levels
    li, expected = li_threshold(stats), _reference(filters.threshold_li, wide)
    width = (stats.max - stats.min) / 256
    same = np.array_equal(image > li, wide > expected)
    assert same or abs(float(li) - float(expected)) <= width, (li, expected)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", ["camera", "synthetic", "blobs-3d"])
@pytest.mark.parametrize("classes", [2, 3, 4])
def test_multiotsu_at_any_scale_equals_scikit_image_on_float64(
    name: str, scale: str, classes: int
) -> None:
    image, tile = _scaled(name, scale)
    wide = image.astype(np.float64)
    expected = _reference(filters.threshold_multiotsu, wide, classes=classes)
    got = MultiOtsu(sigma=0, classes=classes).prepare(_stats(image, tile))["thresholds"]
    assert got.dtype == image.dtype
    np.testing.assert_array_equal(np.digitize(image, got), np.digitize(wide, expected))


@pytest.mark.parametrize("method", sorted(EXACT))
def test_power_of_two_scale_gives_the_same_bits(method: str) -> None:
    """x2**47 is exact in float32: every threshold is the unscaled one x2**47."""
    image, tile = _scaled("synthetic", "x1")
    big = image * np.float32(2.0**47)
    unscaled = histogram_threshold(blockwise_stats(image, tile), method)  # type: ignore[arg-type]
    scaled = histogram_threshold(blockwise_stats(big, tile), method)  # type: ignore[arg-type]
    assert scaled == unscaled * np.float32(2.0**47)


@pytest.mark.parametrize("scale", ["uint64 x2**47", "float32 x1e-30", "float64 1e12 offset"])
def test_otsu_segment_at_any_scale_matches_scikit_image(scale: str) -> None:
    image, tile = _scaled("coins", scale)
    seg = Otsu(sigma=0)
    result = seg.segment(image, seg.prepare(_stats(image, tile)))
    wide = image.astype(np.float64)
    mask = wide > filters.threshold_otsu(wide)
    assert 0.1 < mask.mean() < 0.9
    np.testing.assert_array_equal(result.semantic, mask.astype(np.uint8))
    assert same_up_to_renumbering(result.instances, label(mask, connectivity=2))


def test_two_levels_a_float32_step_apart() -> None:
    """float64 data at 1e12 seen as float32: two values 65536 apart, no 256 float32 bins
    between them (np.histogram refuses it; the float64 copy splits them)."""
    lo = np.float32(1e12)
    image = np.where(np.arange(60).reshape(6, 10) % 7 == 0, np.nextafter(lo, np.inf), lo)
    stats = blockwise_stats(image.astype(np.float32), 4)
    assert stats.edges.dtype == np.float64
    wide = image.astype(np.float64)
    for method in ["otsu", "yen", "isodata", "triangle"]:
        t = histogram_threshold(stats, method)  # type: ignore[arg-type]
        expected = EXACT[method](wide)
        assert t.dtype == np.float32
        np.testing.assert_array_equal(image > t, wide > expected, err_msg=method)


@pytest.mark.parametrize("value", [1e12, -3e30, 2.5e-38])
def test_constant_image_at_any_magnitude(value: float) -> None:
    for dtype in (np.float32, np.float64):
        image = np.full((5, 4), value, dtype)
        stats = _stats(image, 3)
        for method in ["otsu", "li", "yen", "triangle", "isodata", "mean", "minimum"]:
            t = histogram_threshold(stats, method)  # type: ignore[arg-type]
            assert t == dtype(value) and t.dtype == dtype, method
        assert not Otsu(sigma=0).segment(image, Otsu(sigma=0).prepare(stats)).semantic.any()


def test_fixed_value_is_compared_exactly() -> None:
    """float32(0.1) lies above 0.1: a pixel of that value is above a threshold of 0.1."""
    image = np.array([[0.0, 0.1, 0.2], [0.1, 0.05, 0.3]], np.float32)
    seg = Threshold(sigma=0, value=0.1)
    result = seg.segment(image, seg.prepare(blockwise_stats(image, 2)))
    np.testing.assert_array_equal(result.semantic, image.astype(np.float64) > 0.1)
    below = Threshold(sigma=0, value=0.1, above=False)
    result = below.segment(image, below.prepare(blockwise_stats(image, 2)))
    np.testing.assert_array_equal(result.semantic, image.astype(np.float64) <= 0.1)

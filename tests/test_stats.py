"""Whole-image statistics from per-block reductions equal NumPy and scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage.exposure import histogram as sk_histogram

from segpipe.blocks import BlockGrid
from segpipe.stats import (
    Extrema,
    ImageStats,
    block_histogram,
    hist_range,
    merge_histograms,
)
from segpipe.synthetic import render

SETTINGS = settings(max_examples=150, deadline=None, database=None, derandomize=True)


def blockwise_stats(image: np.ndarray, tile: int | tuple[int, ...]) -> ImageStats:
    """ImageStats the way the pipeline builds them: extrema pass, then histogram pass."""
    grid = BlockGrid.build(image.shape, tile=tile)
    extrema = Extrema.merge(Extrema.of(image[b.core]) for b in grid)
    lo, hi = hist_range(extrema)
    return merge_histograms([block_histogram(image[b.core], lo, hi) for b in grid], extrema)


@st.composite
def images_and_tiles(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, ...]]:
    """A float32 image of 1..3 axes (any finite values) and a tile that splits it."""
    ndim = draw(st.integers(1, 3))
    shape = draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=1, max_side=12))
    elements = draw(
        st.sampled_from(
            [
                st.floats(-1e6, 1e6, width=32),
                st.floats(0, 1, width=32),
                st.integers(0, 3).map(float),  # few distinct values, many ties on edges
                st.floats(-(2.0**100), 2.0**100, width=32),
            ]
        )
    )
    image = draw(hnp.arrays(np.float32, shape, elements=elements))
    tile = tuple(draw(st.integers(1, n + 2)) for n in shape)
    return image, tile


def whole_image_histogram(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.histogram of the whole image; skip images NumPy itself cannot bin.

    A range narrower than 256 float32 steps (e.g. [65536, 65536.01]) has no
    256 distinct edges; numpy raises, so there is no reference to compare with.
    """
    try:
        return np.histogram(image, bins=256)
    except ValueError as err:
        assume("Too many bins" not in str(err))
        raise


REALISTIC = {
    "camera": lambda: skimage.data.camera(),
    "coins": lambda: skimage.data.coins(),
    "synthetic": lambda: render((slice(0, 150), slice(0, 230)), seed=3)[0],
    "volume": lambda: np.random.default_rng(1).normal(5.0, 2.0, (24, 30, 40)),
}


# -- Extrema -------------------------------------------------------------------


def test_extrema_of_hand_made_block() -> None:
    e = Extrema.of(np.array([[3, -2], [7, 0]], np.int16))
    assert (e.min, e.max, e.count, e.nonfinite) == (-2.0, 7.0, 4, 0)


def test_extrema_of_counts_nan_and_inf_without_comparing_them() -> None:
    block = np.array([1.5, np.nan, -np.inf, 4.0, np.nan, np.inf, -2.0], np.float32)
    e = Extrema.of(block)
    assert (e.min, e.max, e.count, e.nonfinite) == (-2.0, 4.0, 3, 4)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_extrema_of_one_nonfinite_pixel_of_either_kind(bad: float) -> None:
    block = np.arange(12, dtype=np.float32).reshape(3, 4)
    block[1, 2] = bad
    e = Extrema.of(block)
    assert (e.min, e.max, e.count, e.nonfinite) == (0.0, 11.0, 11, 1)


def test_extrema_of_all_nan_and_empty_blocks_are_neutral() -> None:
    all_nan = Extrema.of(np.full((2, 3), np.nan, np.float32))
    assert (all_nan.min, all_nan.max, all_nan.count, all_nan.nonfinite) == (np.inf, -np.inf, 0, 6)
    empty = Extrema.of(np.zeros((0, 4), np.float32))
    assert (empty.min, empty.max, empty.count, empty.nonfinite) == (np.inf, -np.inf, 0, 0)
    merged = Extrema.merge([all_nan, Extrema.of(np.array([2.0, 9.0])), empty])
    assert (merged.min, merged.max, merged.count, merged.nonfinite) == (2.0, 9.0, 2, 6)


def test_extrema_merge_of_nothing() -> None:
    e = Extrema.merge([])
    assert (e.min, e.max, e.count, e.nonfinite) == (np.inf, -np.inf, 0, 0)


@SETTINGS
@given(images_and_tiles(), st.floats(0, 0.3))
def test_extrema_merge_over_blocks_equals_whole_image(case: tuple, nan_fraction: float) -> None:
    image, tile = case
    image = image.copy()
    rng = np.random.default_rng(image.size)
    image[rng.random(image.shape) < nan_fraction] = np.nan
    grid = BlockGrid.build(image.shape, tile=tile)
    merged = Extrema.merge(Extrema.of(image[b.core]) for b in grid)
    finite = image[np.isfinite(image)]
    assert merged.count == finite.size
    assert merged.nonfinite == image.size - finite.size
    if finite.size:
        assert (merged.min, merged.max) == (float(finite.min()), float(finite.max()))
    else:
        assert (merged.min, merged.max) == (np.inf, -np.inf)


# -- histogram -------------------------------------------------------------------


@SETTINGS
@given(images_and_tiles())
def test_merged_histogram_equals_numpy_on_whole_image(case: tuple) -> None:
    image, tile = case
    counts, edges = whole_image_histogram(image)
    stats = blockwise_stats(image, tile)
    assert stats.edges.dtype == edges.dtype == np.float32
    np.testing.assert_array_equal(stats.edges, edges)
    np.testing.assert_array_equal(stats.counts, counts)
    assert stats.count == image.size
    assert (stats.min, stats.max) == (float(image.min()), float(image.max()))


@pytest.mark.filterwarnings("ignore:This might be a color image")
@SETTINGS
@given(images_and_tiles())
def test_bin_centres_equal_scikit_image(case: tuple) -> None:
    image, tile = case
    whole_image_histogram(image)
    stats = blockwise_stats(image, tile)
    counts, centres = sk_histogram(image, nbins=256)
    assert stats.centers.dtype == centres.dtype
    np.testing.assert_array_equal(stats.centers, centres)
    np.testing.assert_array_equal(stats.counts, counts)


@pytest.mark.parametrize("name", sorted(REALISTIC))
@pytest.mark.parametrize("tile", [7, (16, 40, 5), 10_000])
def test_realistic_images_histogram_exact(name: str, tile: int | tuple[int, ...]) -> None:
    image = REALISTIC[name]().astype(np.float32)
    if isinstance(tile, tuple):
        tile = tile[-image.ndim :]
    stats = blockwise_stats(image, tile)
    counts, edges = np.histogram(image, bins=256)
    np.testing.assert_array_equal(stats.edges, edges)
    np.testing.assert_array_equal(stats.counts, counts)
    np.testing.assert_array_equal(stats.centers, sk_histogram(image, nbins=256)[1])
    assert stats.mean == pytest.approx(float(image.astype(np.float64).mean()), rel=1e-9)


@pytest.mark.parametrize("value", [0.0, -3.25, 1000.0, 7e-5])
@pytest.mark.parametrize("tile", [1, 3, 100])
def test_constant_image(value: float, tile: int) -> None:
    image = np.full((5, 6), value, np.float32)
    stats = blockwise_stats(image, tile)
    counts, edges = np.histogram(image, bins=256)
    np.testing.assert_array_equal(stats.edges, edges)
    np.testing.assert_array_equal(stats.counts, counts)
    # numpy widens a constant image's range by 0.5 either side.
    assert stats.edges[0] == np.float32(value) - np.float32(0.5)
    assert stats.edges[-1] == np.float32(value) + np.float32(0.5)
    assert (stats.min, stats.max, stats.count) == (np.float32(value), np.float32(value), 30)
    assert stats.mean == pytest.approx(np.float32(value))


@pytest.mark.parametrize("value", [65536.0, -1e5, 3e7])
def test_constant_image_with_large_value(value: float) -> None:
    # float32 cannot hold 256 bins inside [v - 0.5, v + 0.5] once |v| >= 2**16, and
    # np.histogram raises on such an image; segpipe must still describe it (and the
    # thresholds of a constant image are the value itself, as scikit-image returns).
    image = np.full((4, 5), value, np.float32)
    stats = blockwise_stats(image, 3)
    assert (stats.min, stats.max, stats.count) == (value, value, 20)
    assert stats.counts.sum() == 20


def test_hand_computed_histogram_over_four_bins() -> None:
    image = np.array([[0, 1, 1, 2], [3, 4, 4, 4]], np.float32)
    grid = BlockGrid.build(image.shape, tile=(1, 3))
    extrema = Extrema.merge(Extrema.of(image[b.core]) for b in grid)
    lo, hi = hist_range(extrema)
    stats = merge_histograms(
        [block_histogram(image[b.core], lo, hi, nbins=4) for b in grid], extrema, nbins=4
    )
    np.testing.assert_array_equal(stats.edges, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(stats.counts, [1, 2, 1, 4])  # the last bin is closed
    np.testing.assert_array_equal(stats.centers, [0.5, 1.5, 2.5, 3.5])
    assert stats.total == 19.0
    assert stats.mean == 19.0 / 8


# -- percentiles ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REALISTIC))
def test_percentile_within_one_bin_of_numpy(name: str) -> None:
    image = REALISTIC[name]().astype(np.float32)
    stats = blockwise_stats(image, 23)
    width = float(stats.edges[1] - stats.edges[0])
    for q in [0, 0.5, 1, 5, 25, 50, 75, 95, 99, 99.5, 100]:
        expected = float(np.percentile(image, q))
        got = stats.percentile(q)
        assert abs(got - expected) <= width, (q, got, expected, width)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2000, 5000), st.floats(5, 95))
def test_percentile_within_one_bin_on_dense_data(seed: int, n: int, q: float) -> None:
    # Dense data: several pixels per bin around the percentile.
    image = np.random.default_rng(seed).normal(0.0, 1.0, n).astype(np.float32)
    stats = blockwise_stats(image, 97)
    width = float(stats.edges[1] - stats.edges[0])
    assert abs(stats.percentile(q) - float(np.percentile(image, q))) <= width


def test_percentile_ends_are_min_and_max() -> None:
    image = np.random.default_rng(5).gamma(2.0, size=(40, 50)).astype(np.float32)
    stats = blockwise_stats(image, 16)
    assert stats.percentile(0) == float(image.min())
    assert stats.percentile(100) == float(image.max())


def test_hand_computed_percentile() -> None:
    # 256 values 0.5, 1.5, ..., 255.5: edges run from 0.5 to 255.5 in steps of 255/256,
    # so each bin holds exactly one value and half the pixels lie below edge 128 = 128.0.
    image = (np.arange(256, dtype=np.float32) + 0.5)[None, :]
    stats = blockwise_stats(image, 50)
    assert stats.percentile(50) == pytest.approx(128.0, abs=1e-4)


@pytest.mark.parametrize("q", [-0.1, 100.5, np.nan])
def test_percentile_rejects_out_of_range(q: float) -> None:
    stats = blockwise_stats(np.arange(10, dtype=np.float32), 4)
    with pytest.raises(ValueError, match="Expected a percentile in"):
        stats.percentile(q)


def test_percentile_in_sparse_tail_within_one_bin() -> None:
    # 1..100: edges 1..100 in steps of 99/256, so most bins are empty. np.percentile(99)
    # is 99.01 (rank 0.99 * 99 = 98.01); the result must still lie within one bin of it.
    image = np.arange(1, 101, dtype=np.float32)
    stats = blockwise_stats(image, 30)
    width = 99 / 256
    for q in [1, 50, 99]:
        expected = float(np.percentile(image, q))
        assert abs(stats.percentile(q) - expected) <= width, (q, stats.percentile(q), expected)


def test_to_dict() -> None:
    image = np.random.default_rng(2).uniform(1.0, 3.0, 20_000).astype(np.float32)
    stats = blockwise_stats(image, 3000)
    d = stats.to_dict()
    assert set(d) == {"min", "max", "count", "mean", "p1", "p50", "p99"}
    assert (d["min"], d["max"], d["count"]) == (float(image.min()), float(image.max()), 20_000)
    assert d["mean"] == pytest.approx(float(image.astype(np.float64).mean()), rel=1e-12)
    width = float(stats.edges[1] - stats.edges[0])
    for key, q in [("p1", 1), ("p50", 50), ("p99", 99)]:
        assert abs(d[key] - float(np.percentile(image, q))) <= width


# -- ranges float32 cannot bin, float64 images ---------------------------------------


def _stats_in(image: np.ndarray, tile: int, dtype: type) -> ImageStats:
    grid = BlockGrid.build(image.shape, tile=tile)
    extrema = Extrema.merge(Extrema.of(image[b.core]) for b in grid)
    lo, hi = hist_range(extrema, dtype)
    parts = [block_histogram(image[b.core], lo, hi) for b in grid]
    return merge_histograms(parts, extrema, dtype=dtype)


@pytest.mark.parametrize("steps", [1, 2, 7, 100])
def test_float32_range_of_few_steps_is_binned_as_its_float64_copy(steps: int) -> None:
    """np.histogram refuses float32 data spanning fewer than 256 float32 steps (e.g. at
    1e12, where a step is 65536): the edges are those of the float64 copy."""
    rng = np.random.default_rng(steps)
    lo = np.float32(1e12)
    levels = lo + np.arange(steps + 1, dtype=np.float32) * np.spacing(lo)
    image = rng.choice(levels, (23, 31)).astype(np.float32)
    image[0, 0], image[-1, -1] = levels[0], levels[-1]
    with pytest.raises(ValueError, match="Too many bins"):
        np.histogram(image, bins=256)
    counts, edges = np.histogram(image.astype(np.float64), bins=256)
    stats = blockwise_stats(image, 5)
    assert stats.edges.dtype == np.float64 and stats.dtype == np.float32
    np.testing.assert_array_equal(stats.edges, edges)
    np.testing.assert_array_equal(stats.counts, counts)
    np.testing.assert_array_equal(stats.centers, sk_histogram(image.astype(np.float64), 256)[1])


@pytest.mark.filterwarnings("ignore:This might be a color image")
@SETTINGS
@given(images_and_tiles(), st.sampled_from([0.0, 1e12, -3e15]), st.floats(1e-3, 1e9))
def test_float64_image_histogram_equals_numpy(case: tuple, offset: float, scale: float) -> None:
    image, tile = case
    image = offset + image.astype(np.float64) / 1e6 * scale
    try:
        counts, edges = np.histogram(image, bins=256)
    except ValueError as err:
        assume("Too many bins" not in str(err))
        raise
    stats = _stats_in(image, tile[0], np.float64)
    assert stats.edges.dtype == stats.dtype == np.float64
    np.testing.assert_array_equal(stats.edges, edges)
    np.testing.assert_array_equal(stats.counts, counts)
    np.testing.assert_array_equal(stats.centers, sk_histogram(image, 256)[1])


def test_float64_values_on_every_edge_are_binned_as_numpy() -> None:
    data = 1e12 + np.random.default_rng(7).random(500)
    lo, hi = hist_range(Extrema.of(data), np.float64)
    edges = np.linspace(lo, hi, 257)
    extra = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
    data = np.concatenate([data, extra[(extra >= lo) & (extra <= hi)]])
    counts, total = block_histogram(data, lo, hi)
    np.testing.assert_array_equal(counts, np.histogram(data, bins=256, range=(lo, hi))[0])
    assert total == float(data.sum())


def test_centres_near_the_float32_maximum_are_finite() -> None:
    """scikit-image's float32 centres overflow to inf there; the midpoints stay finite."""
    image = np.linspace(1.6e38, 3.4e38, 1000, dtype=np.float32)
    counts, edges = np.histogram(image, bins=256)
    stats = blockwise_stats(image, 300)
    np.testing.assert_array_equal(stats.edges, edges)
    np.testing.assert_array_equal(stats.counts, counts)
    wide = edges.astype(np.float64)
    assert stats.centers.dtype == np.float32 and np.all(np.isfinite(stats.centers))
    np.testing.assert_array_equal(stats.centers, ((wide[:-1] + wide[1:]) / 2).astype(np.float32))


def test_range_wider_than_float32_is_binned_as_its_float64_copy() -> None:
    image = np.linspace(-3.3e38, 3.4e38, 1000, dtype=np.float32)
    counts, edges = np.histogram(image.astype(np.float64), bins=256)
    stats = blockwise_stats(image, 300)
    np.testing.assert_array_equal(stats.edges, edges)
    np.testing.assert_array_equal(stats.counts, counts)


def test_hist_range_takes_float_dtypes_only() -> None:
    with pytest.raises(ValueError, match="Expected float32 or float64, got int64 instead"):
        hist_range(Extrema.of(np.arange(4)), np.int64)

"""The compiled kernels give the same bits as SciPy/NumPy (the independent references)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.filters import gaussian as sk_gaussian

from segpipe import kernels

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)
sigmas = st.floats(0.0, 4.0)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sigma=sigmas, per_axis=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gaussian_is_bit_identical_to_scipy(
    shape: tuple[int, ...], sigma: float, per_axis: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    image = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 3e4])).astype(np.float32)
    s: float | list[float] = (
        [float(v) for v in rng.uniform(0, 4, len(shape)) * rng.integers(0, 2, len(shape))]
        if per_axis
        else sigma
    )
    ref = ndi.gaussian_filter(image, s, mode="nearest", truncate=4.0)
    assert np.array_equal(kernels.gaussian(image, s), ref)


def test_gaussian_equals_scikit_image_on_a_large_image() -> None:
    image = np.random.default_rng(3).integers(0, 60000, (700, 1100)).astype(np.float32)
    ref = sk_gaussian(image, sigma=2.0, preserve_range=True, mode="nearest")
    got = kernels.gaussian(image, 2.0)
    assert got.dtype == np.float32 and np.array_equal(got, ref)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), nbins=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_histogram_counts_equal_numpy(n: int, nbins: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e5])).astype(np.float32)
    lo, hi = np.float32(data.min()), np.float32(data.max())
    if lo == hi:
        lo, hi = lo - np.float32(0.5), hi + np.float32(0.5)
    edges = np.linspace(lo, hi, nbins + 1, dtype=np.float32)
    assume(bool(np.all(np.diff(edges) > 0)))  # else NumPy refuses (stats handles that case)
    # values exactly on every edge and one ulp either side, plus some outside the range
    extra = np.concatenate(
        [edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, -np.float32(np.inf))]
    )
    data = np.concatenate([data, extra.astype(np.float32)])
    ref, _ = np.histogram(data, bins=nbins, range=(lo, hi))
    counts, total = kernels.histogram(data, lo, hi, edges)
    assert np.array_equal(counts, ref)
    assert total == float(data.sum(dtype=np.float64))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2000), st.integers(0, 2**32 - 1))
def test_panoptic_encoding_by_hand(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    semantic = rng.integers(0, 6, size=n).astype(np.uint8)
    instances = rng.integers(0, 999, size=n).astype(np.uint32)
    thing = np.zeros(256, bool)
    thing[[1, 3, 4]] = True
    known = np.zeros(256, bool)
    known[:6] = True
    out, unassigned = kernels.panoptic(semantic, instances, 1000, thing, known) or (None, 0)
    pairs = list(zip(semantic.tolist(), instances.tolist(), strict=True))
    expected = [c * 1000 + (i if c in (1, 3, 4) else 0) for c, i in pairs]
    assert out is not None and out.tolist() == expected
    assert unassigned == sum(1 for c, i in pairs if c in (1, 3, 4) and i == 0)
    known[5] = False  # a class outside the catalogue
    assert (kernels.panoptic(semantic, instances, 1000, thing, known) is None) == (5 in semantic)


@pytest.mark.parametrize("table_dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("shape", [(0,), (37, 53), (3, 11, 17)])
def test_lookup_equals_numpy_indexing(table_dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    table = rng.integers(0, 2**31, 300).astype(table_dtype)
    index = rng.integers(0, 300, shape).astype(np.uint32)
    got = kernels.lookup(index, table)
    assert got.dtype == table.dtype and got.shape == index.shape
    np.testing.assert_array_equal(got, table[index])


def test_lookup_refuses_an_index_past_the_table() -> None:
    with pytest.raises(IndexError, match="index 7 is out of bounds for a table of 7"):
        kernels.lookup(np.array([[1, 7], [0, 2]], np.uint32), np.arange(7, dtype=np.uint32))

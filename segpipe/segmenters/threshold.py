"""Global histogram thresholds: Otsu, multi-Otsu and the other scikit-image methods.

Each threshold is computed from the whole image's histogram (``prepare``);
blocks only compare against it, so the tiled result is exact. scikit-image's
methods run on bin centres scaled by a power of two into [0.5, 1): the same
bits as on the image itself, where its float32 variance would overflow (an
image ×2^47) or underflow (×1e-30) and pick the first bin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from scipy import ndimage as ndi
from skimage import filters
from skimage.measure import label

from segpipe.segmenters.base import Segmenter, SegmentResult, SmoothingOptions
from segpipe.stats import ImageStats

HistMethod = Literal["otsu", "li", "yen", "triangle", "isodata", "mean", "minimum"]


def _at_most(value: float | np.floating[Any], dtype: np.dtype[Any]) -> np.floating[Any]:
    """The largest ``dtype`` value <= ``value``: for data of ``dtype``, ``data > t`` is
    then ``data > value`` taken exactly (``data <= t`` likewise)."""
    t = dtype.type(value)
    if float(t) > float(value):
        t = np.nextafter(t, dtype.type(-np.inf))
    return cast(np.floating[Any], t)


def _at_least(value: float | np.floating[Any], dtype: np.dtype[Any]) -> np.floating[Any]:
    """The smallest ``dtype`` value >= ``value``: ``data >= t`` is ``data >= value``."""
    t = dtype.type(value)
    if float(t) < float(value):
        t = np.nextafter(t, dtype.type(np.inf))
    return cast(np.floating[Any], t)


def _scaled_hist(stats: ImageStats) -> tuple[NDArray[np.int64], NDArray[np.floating[Any]], int]:
    """(counts, centres / 2**e, e) with the largest |centre| / 2**e in [0.5, 1).

    Scaling by a power of two is exact and every method returns one of the centres,
    so ``result * 2**e`` is what the method gives on the unscaled centres, bit for
    bit, whenever that does not overflow or underflow.
    """
    centres = stats.centers
    e = int(np.frexp(np.max(np.abs(centres)))[1])
    return stats.counts, np.ldexp(centres, -e).astype(centres.dtype), e


def _occupied(stats: ImageStats) -> int:
    return int(np.count_nonzero(stats.counts))


def otsu_threshold(stats: ImageStats) -> np.floating[Any]:
    """Otsu's threshold of the whole image from its histogram (as ``threshold_otsu``), in
    the image's dtype."""
    if stats.min == stats.max:  # constant image: scikit-image returns the value itself
        return stats.dtype.type(stats.min)
    if _occupied(stats) < 2:  # a range too narrow to bin even in float64
        return _at_most(stats.min, stats.dtype)
    counts, centres, e = _scaled_hist(stats)
    t = np.ldexp(filters.threshold_otsu(hist=(counts, centres)), e)
    return _at_most(t, stats.dtype)


def li_threshold(stats: ImageStats) -> np.floating[Any]:
    """Li's minimum cross-entropy threshold, iterated on the histogram.

    Same iteration as ``skimage.filters.threshold_li`` with pixel values
    replaced by bin centres: within one bin width of it on real images, within
    three on tiny random ones (binning moves the fixed point).
    """
    counts = stats.counts.astype(np.float64)
    centers = stats.centers.astype(np.float64) - stats.min
    tolerance = (stats.edges[1] - stats.edges[0]) / 2
    t_next = float(np.sum(counts * centers) / counts.sum())
    t_curr = -2 * tolerance
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        fore = centers > t_curr
        w_f, w_b = counts[fore].sum(), counts[~fore].sum()
        if w_f == 0 or w_b == 0:
            break
        mean_fore = np.sum(counts[fore] * centers[fore]) / w_f
        mean_back = np.sum(counts[~fore] * centers[~fore]) / w_b
        if mean_back <= 0:
            break
        t_next = float((mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore)))
    return _at_most(t_next + stats.min, stats.dtype)


def triangle_threshold(stats: ImageStats) -> np.floating[Any]:
    """The triangle method on the image's histogram (as ``threshold_triangle``)."""
    hist = stats.counts.astype(np.float64)
    centers = stats.centers
    nbins = len(hist)
    arg_peak_height = int(np.argmax(hist))
    peak_height = hist[arg_peak_height]
    arg_low_level, arg_high_level = np.flatnonzero(hist)[[0, -1]]
    if arg_low_level == arg_high_level:
        return _at_most(centers[arg_low_level], stats.dtype)
    flip = arg_peak_height - arg_low_level < arg_high_level - arg_peak_height
    if flip:
        hist = hist[::-1]
        arg_low_level = nbins - arg_high_level - 1
        arg_peak_height = nbins - arg_peak_height - 1
    del arg_high_level
    width = arg_peak_height - arg_low_level
    x1 = np.arange(width)
    y1 = hist[x1 + arg_low_level]
    norm = np.sqrt(peak_height**2 + width**2)
    peak_height /= norm
    width /= norm
    length = peak_height * x1 - width * y1
    arg_level = int(np.argmax(length)) + arg_low_level
    if flip:
        arg_level = nbins - arg_level - 1
    return _at_most(centers[arg_level], stats.dtype)


_SKIMAGE = {
    "yen": filters.threshold_yen,
    "isodata": filters.threshold_isodata,
    "minimum": filters.threshold_minimum,
}


def histogram_threshold(stats: ImageStats, method: HistMethod) -> np.floating[Any]:
    """The threshold ``method`` gives for the whole image described by ``stats``, in the
    image's dtype (``data > t`` as on the whole image)."""
    if stats.min == stats.max:
        return stats.dtype.type(stats.min)
    if method == "otsu":
        return otsu_threshold(stats)
    if method == "li":
        return li_threshold(stats)
    if method == "triangle":
        return triangle_threshold(stats)
    if method == "mean":
        return _at_most(stats.mean, stats.dtype)
    if method in _SKIMAGE:
        counts, centres, e = _scaled_hist(stats)
        return _at_most(np.ldexp(_SKIMAGE[method](hist=(counts, centres)), e), stats.dtype)
    raise ValueError(f"Expected a threshold method, got {method!r} instead.")


def label_classes(semantic: NDArray[np.uint8]) -> NDArray[np.integer]:
    """Connected regions of one class each (full connectivity), 0 stays background."""
    if semantic.size and int(semantic.max()) <= 1:
        # one class: SciPy's labelling gives the same ids in the same (raster) order,
        # 2.7x faster than scikit-image's on 1024² Otsu blocks, in uint32 not int64
        full = np.ones((3,) * semantic.ndim, bool)
        binary: NDArray[np.integer] = ndi.label(semantic, full, output=np.uint32)[0]
        return binary
    out: NDArray[np.integer] = label(semantic, background=0, connectivity=semantic.ndim)
    return out


class OtsuOptions(SmoothingOptions):
    pass


class Otsu(Segmenter):
    """Gaussian smoothing, then Otsu's threshold of the whole image; objects are
    connected components (full connectivity) of the foreground.

    Options: ``sigma`` (2.0).
    """

    name = "otsu"
    working = (6.0, 6.0)  # measured: see Segmenter.working
    options_model = OtsuOptions

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (0,) * ndim  # pointwise rule; components are merged across faces exactly

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        return {"threshold": otsu_threshold(stats)}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        semantic = (block > params["threshold"]).astype(np.uint8)
        return SegmentResult(semantic, label_classes(semantic), sequential=True)


class MultiOtsuOptions(SmoothingOptions):
    classes: int = Field(3, ge=2, le=5)
    """Number of intensity classes; class 0 is background, every other class has instances."""


class MultiOtsu(Segmenter):
    """Multi-Otsu thresholds of the whole image split it into ``classes`` classes;
    objects are connected regions of one class.

    Options: ``sigma`` (2.0), ``classes`` (3).
    """

    name = "multiotsu"
    working = (18.0, 18.0)  # measured: see Segmenter.working
    options_model = MultiOtsuOptions

    @property
    def classes(self) -> list[str]:
        n = int(getattr(self.options, "classes", 3))
        return ["background", *(f"class{i}" for i in range(1, n))]

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (0,) * ndim

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        n = int(getattr(self.options, "classes", 3))
        if stats.min == stats.max:
            return {"thresholds": np.full(n - 1, stats.max, dtype=stats.dtype)}
        # As on a whole image, scikit-image works on the normalised histogram;
        # raw counts pick another split on near-ties.
        counts, centres, e = _scaled_hist(stats)
        prob = counts / np.sum(counts)
        t = np.ldexp(filters.threshold_multiotsu(hist=(prob, centres), classes=n), e)
        # np.digitize puts a value equal to a threshold above it: round up
        return {"thresholds": np.array([_at_least(v, stats.dtype) for v in t], stats.dtype)}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        semantic = np.digitize(block, bins=params["thresholds"]).astype(np.uint8)
        return SegmentResult(semantic, label_classes(semantic), sequential=True)


class ThresholdOptions(SmoothingOptions):
    method: HistMethod = "otsu"
    """Histogram method for the global threshold, used when ``value`` is not set."""
    value: float | None = None
    """A fixed threshold in image units; overrides ``method``."""
    above: bool = True
    """Foreground is brighter than the threshold (False: darker)."""


class Threshold(Segmenter):
    """A fixed global threshold, or one from a histogram method (li, yen,
    triangle, isodata, mean, minimum, otsu) of the whole image.

    Options: ``sigma`` (2.0), ``method`` ("otsu"), ``value`` (None), ``above`` (True).
    """

    name = "threshold"
    working = (6.0, 6.0)  # measured: see Segmenter.working
    options_model = ThresholdOptions

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (0,) * ndim

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        o = self.options
        assert isinstance(o, ThresholdOptions)
        if o.value is not None:
            return {"threshold": _at_most(o.value, stats.dtype)}
        return {"threshold": histogram_threshold(stats, o.method)}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        o = self.options
        assert isinstance(o, ThresholdOptions)
        t = params["threshold"]
        semantic = ((block > t) if o.above else (block <= t)).astype(np.uint8)
        return SegmentResult(semantic, label_classes(semantic), sequential=True)

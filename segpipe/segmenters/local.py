"""Adaptive (local) thresholding: each pixel against its neighbourhood, above a global floor.

The local rule reads a fixed neighbourhood per pixel and the floor is one
whole-image value, so a block read with `LocalThreshold.halo` pixels of
context labels its core exactly as the whole image would. (For "mean", scipy's
running sum in float64 can differ in its last bits with a block's origin; rounded
to the float32 threshold no pixel differed in any test.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator
from skimage.filters import threshold_local

from segpipe.errors import SegmenterError
from segpipe.segmenters.base import (
    Segmenter,
    SegmentResult,
    SmoothingOptions,
    context_limit,
    gaussian_radius,
)
from segpipe.segmenters.threshold import HistMethod, histogram_threshold, label_classes
from segpipe.stats import ImageStats

LocalMethod = Literal["gaussian", "mean", "median"]

BACKGROUND_PERCENTILE = 1.0  # the darkest percent is background in any fluorescence image


def contrast_level(stats: ImageStats, threshold: np.float32, fraction: float) -> np.float32:
    """The level ``fraction`` of the way from the image's background up to ``threshold``.

    Background is the whole image's 1st percentile, capped at ``threshold`` (a
    constant image's interpolated percentile can land just above it); fraction 0
    is the background, 1 the threshold, 2 as far again above it.

    Parameters
    ----------
    stats : ImageStats
        Whole-image statistics.
    threshold : float32
        Foreground threshold of the whole image.
    fraction : float
        Position relative to the contrast ``threshold - background``.

    Returns
    -------
    float32
    """
    background = min(np.float32(stats.percentile(BACKGROUND_PERCENTILE)), threshold)
    return np.float32(background + fraction * (threshold - background))


def local_halo(block_size: int, method: LocalMethod, ndim: int) -> tuple[int, ...]:
    """Pixels per side ``threshold_local(block_size, method)`` reads around each pixel.

    Parameters
    ----------
    block_size : int
        Odd neighbourhood size, as passed to ``threshold_local``.
    method : {"gaussian", "mean", "median"}
        Local statistic, as passed to ``threshold_local``.
    ndim : int
        Number of image axes.

    Returns
    -------
    tuple of int
        One radius per axis: scipy's Gaussian radius for ``sigma = (block_size - 1) / 6``
        and its default truncation of 4 for "gaussian", ``block_size // 2`` otherwise.

    Examples
    --------
    >>> local_halo(31, "gaussian", 2)
    (20, 20)
    >>> local_halo(31, "median", 2)
    (15, 15)
    """
    if method == "gaussian":
        return gaussian_radius((block_size - 1) / 6.0, ndim)
    return (block_size // 2,) * ndim


def local_foreground(
    image: NDArray[np.float32],
    *,
    block_size: int,
    method: LocalMethod = "gaussian",
    offset: float = 0.0,
    floor: np.float32 | None = None,
) -> NDArray[np.bool_]:
    """Pixels brighter than their local threshold and than a global ``floor``.

    Parameters
    ----------
    image : (M, N[, P]) ndarray of float32
        Image, or a block of it with ``local_halo`` pixels of context per side.
    block_size : int
        Odd neighbourhood size of the local threshold.
    method : {"gaussian", "mean", "median"}
        Local statistic (see ``skimage.filters.threshold_local``).
    offset : float
        Subtracted from the local statistic, in image units (scikit-image's sign: a
        negative offset asks pixels to stand out by that much).
    floor : float32, optional
        Global level every foreground pixel must also exceed; None: no floor.

    Returns
    -------
    (M, N[, P]) ndarray of bool

    Examples
    --------
    >>> image = np.zeros((5, 5), np.float32)
    >>> image[2, 2] = 9.0
    >>> local_foreground(image, block_size=3, method="mean").astype(int).sum()
    np.int64(1)
    """
    # reflect at the border: a block that touches the image border sees it as the image does
    local = threshold_local(image, block_size, method=method, offset=offset, mode="reflect")
    foreground: NDArray[np.bool_] = image > local
    if floor is not None:
        foreground &= image > floor
    return foreground


class LocalOptions(SmoothingOptions):
    block_size: int = Field(31, ge=3)
    """Odd neighbourhood size (pixels) of the local threshold, about 1.5x the largest
    object diameter: wide enough that an object's interior is never compared with itself
    alone, narrow enough to follow uneven illumination and to cut the dim contact between
    touching nuclei. The halo follows from it (20 pixels per side at 31, gaussian)."""
    method: LocalMethod = "gaussian"
    """Local statistic: Gaussian-weighted mean (sigma = (block_size - 1) / 6), mean or median."""
    offset: float = 0.0
    """Subtracted from the local threshold, in image units; negative values ask pixels to
    stand out from their neighbourhood by that much (scikit-image's convention)."""
    floor: HistMethod | float | None = "otsu"
    """Global floor every foreground pixel must also exceed, so flat background (where the
    local rule alone keeps half the noise) stays background: a histogram method on the
    whole image (scaled by ``floor_fraction``), a value in image units, or None for none."""
    floor_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """With a method ``floor``: the floor's place between the image's background (its 1st
    percentile, 0) and the method's threshold (1). Half way rejects background noise yet
    keeps dim nuclei that a local threshold separates from bright neighbours."""

    @field_validator("block_size")
    @classmethod
    def _odd_block_size(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"Expected an odd block_size, got {value} instead.")
        return value


class LocalThreshold(Segmenter):
    """Smooth, then keep pixels brighter than their neighbourhood (``threshold_local``)
    and than a floor from the whole image; objects are connected components (full
    connectivity) of the foreground.

    The halo is exactly what the local statistic reads, so tiled and whole-image results
    are equal pixel for pixel and components are merged across block faces.

    Options: ``sigma`` (2.0), ``block_size`` (31), ``method`` ("gaussian"), ``offset`` (0),
    ``floor`` ("otsu"), ``floor_fraction`` (0.5).
    """

    name = "local"
    working = (8.0, 8.0)  # measured: see Segmenter.working
    options_model = LocalOptions

    @property
    def opts(self) -> LocalOptions:
        assert isinstance(self.options, LocalOptions)
        return self.options

    def halo(self, ndim: int) -> tuple[int, ...]:
        return local_halo(self.opts.block_size, self.opts.method, ndim)

    def check_image(self, shape: Sequence[int]) -> None:
        """Also refuse a ``block_size`` whose neighbourhood is wider than the image."""
        super().check_image(shape)
        limit = context_limit(shape)
        if max(self.halo(len(shape))) > limit:
            widest = 2 * limit + 1  # what "mean" and "median" allow; "gaussian" reads further
            while local_halo(widest, self.opts.method, 1)[0] > limit:
                widest -= 2
            raise SegmenterError(
                f"block_size {self.opts.block_size} ({self.opts.method}) reads "
                f"{max(self.halo(len(shape)))} px per side, more than this image allows "
                f"({limit} px); use an odd block_size <= {widest}"
            )

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        o = self.opts
        if o.floor is None:
            return {"floor": None}
        if isinstance(o.floor, float | int):
            return {"floor": np.float32(o.floor)}
        threshold = histogram_threshold(stats, o.floor)
        return {"floor": contrast_level(stats, threshold, o.floor_fraction)}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        o = self.opts
        floor = params.get("floor")
        foreground = local_foreground(
            block,
            block_size=o.block_size,
            method=o.method,
            offset=o.offset,
            floor=None if floor is None else np.float32(floor),
        )
        semantic = foreground.astype(np.uint8)
        return SegmentResult(semantic, label_classes(semantic), sequential=True)

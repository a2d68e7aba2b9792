"""Seeded region growing: bright maxima grow into connected pixels within an intensity tolerance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from segpipe.segmenters.base import Segmenter, SegmentResult, SmoothingOptions
from segpipe.segmenters.local import contrast_level
from segpipe.segmenters.threshold import HistMethod, histogram_threshold
from segpipe.stats import ImageStats

AUTO_H = 0.1  # seed depth as a fraction of the threshold's height above background


def grow_regions(
    image: NDArray[np.float32],
    *,
    threshold: float,
    floor: float,
    h: float,
    tolerance: float | None = None,
) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """Grow one region from each bright maximum of ``image``.

    Seeds are the h-maxima of ``image`` above ``threshold``. Every pixel at or
    above ``floor`` goes, by priority flooding (brightest first), to the seed
    that reaches it first; a region then keeps only its pixels at or above
    its seed's peak minus ``tolerance`` that are still connected to the seed.

    Parameters
    ----------
    image : (M, N[, P]) ndarray of float32
        Smoothed image (or a block of it).
    threshold : float
        Seeds must be brighter than this.
    floor : float
        No region grows below this intensity.
    h : float
        Least depth (image units) of a maximum to seed a region; shallower ones are noise.
    tolerance : float, optional
        How far below its peak a region grows; None: down to ``floor``.

    Returns
    -------
    labels : (M, N[, P]) ndarray of int32
        Regions 1..n (0 = background).
    seeds : (M, N[, P]) ndarray of int32
        The seed of each region, with the region's id.

    Examples
    --------
    >>> image = np.array([[0, 5, 7, 9, 6, 3, 0]], np.float32)
    >>> grow_regions(image, threshold=4, floor=2, h=1, tolerance=3)[0]
    array([[0, 0, 1, 1, 1, 0, 0]], dtype=int32)
    >>> grow_regions(image, threshold=4, floor=2, h=1)[0]
    array([[0, 1, 1, 1, 1, 1, 0]], dtype=int32)
    """
    connectivity = image.ndim
    maxima = h_maxima(image, h).astype(bool) & (image > threshold)
    seeds = label(maxima, connectivity=connectivity).astype(np.int32)
    n = int(seeds.max())
    if n == 0:
        return np.zeros(image.shape, np.int32), seeds
    # watershed floods -image from the seeds: brightest pixels are claimed first
    grown = watershed(-image, seeds, mask=image >= floor, connectivity=connectivity)
    grown = np.asarray(grown, dtype=np.int32)
    if tolerance is None:
        return grown, seeds
    peaks = np.asarray(ndi.maximum(image, seeds, np.arange(1, n + 1)), dtype=np.float64)
    limit = np.concatenate([[np.inf], peaks - tolerance])  # index 0: background never passes
    within = np.where(image >= limit[grown], grown, 0)
    # a region's pixels within tolerance may lie beyond a dimmer valley: keep the seed's part
    parts = label(within, background=0, connectivity=connectivity)
    seeded = np.zeros(int(parts.max()) + 1, dtype=bool)
    seeded[parts[seeds > 0]] = True
    seeded[0] = False
    labels: NDArray[np.int32] = np.where(seeded[parts], within, 0).astype(np.int32)
    return labels, seeds


class RegionGrowingOptions(SmoothingOptions):
    diameter: int = Field(40, ge=2)
    """Largest expected object diameter in pixels; it sets the halo, so objects cut by a
    block edge are seen whole by both blocks."""
    threshold: HistMethod | float = "otsu"
    """Foreground threshold: seeds must be brighter. A histogram method on the whole
    image, or a value in image units."""
    floor: HistMethod | float | None = None
    """Lowest intensity a region grows into: a histogram method, a value, or None for the
    foreground threshold itself (so regions cover what a global threshold would, split
    between seeds)."""
    h: float | None = Field(None, gt=0)
    """Least depth of an intensity maximum, in image units, to seed a region; None: 10% of
    the foreground threshold's height above the background (the image's 1st percentile),
    deep enough to ignore noise bumps yet keep one seed per nucleus."""
    tolerance: float | None = Field(None, ge=0)
    """How far below its seed's peak intensity a region grows, in image units; None: down
    to ``floor``."""


class RegionGrowing(Segmenter):
    """Smooth, seed a region at every bright maximum, and grow each into connected
    pixels no dimmer than its peak minus ``tolerance`` (and than the floor); touching
    objects meet where their floods meet.

    Options: ``sigma`` (2.0), ``diameter`` (40), ``threshold`` ("otsu"), ``floor`` (None:
    the threshold), ``h`` (None: 10% of the foreground contrast), ``tolerance`` (None).
    """

    name = "region-growing"
    working = (83.0, 84.0)  # measured: see Segmenter.working
    options_model = RegionGrowingOptions
    stitch = "overlap"

    @property
    def opts(self) -> RegionGrowingOptions:
        assert isinstance(self.options, RegionGrowingOptions)
        return self.options

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (self.opts.diameter,) * ndim

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        o = self.opts
        threshold = _level(stats, o.threshold)
        floor = threshold if o.floor is None else _level(stats, o.floor)
        if o.h is not None:
            h = np.float32(o.h)
        else:
            depth = contrast_level(stats, threshold, AUTO_H) - contrast_level(stats, threshold, 0)
            # h_maxima refuses 0; on a constant image any depth finds no maxima
            h = max(np.float32(depth), np.finfo(np.float32).eps)
        return {"threshold": threshold, "floor": floor, "h": h}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        labels, _ = grow_regions(
            block,
            threshold=params["threshold"],
            floor=params["floor"],
            h=params["h"],
            tolerance=self.opts.tolerance,
        )
        return SegmentResult((labels > 0).astype(np.uint8), labels)


def _level(stats: ImageStats, value: HistMethod | float) -> np.float32:
    if isinstance(value, float | int):
        return np.float32(value)
    return histogram_threshold(stats, value)

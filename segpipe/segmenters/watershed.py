"""Watershed on the distance transform: the standard way to split touching nuclei."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.measure import label
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from segpipe.segmenters.base import Segmenter, SegmentResult, SmoothingOptions
from segpipe.segmenters.threshold import HistMethod, histogram_threshold
from segpipe.stats import ImageStats


class WatershedOptions(SmoothingOptions):
    diameter: int = Field(40, ge=2)
    """Largest expected object diameter in pixels; it sets the halo, so objects cut by a
    block edge are seen whole by both blocks."""
    threshold: HistMethod | float = "otsu"
    """Foreground threshold: a histogram method on the whole image, or a value."""
    markers: Literal["distance", "h-maxima"] = "distance"
    """Seeds: peaks of the distance transform at least ``min_distance`` apart, or its h-maxima."""
    min_distance: int = Field(5, ge=1)
    """Smallest distance between two seeds (``markers: distance``)."""
    h: float = Field(2.0, gt=0)
    """Depth of a distance-transform maximum to count as a seed (``markers: h-maxima``)."""
    compactness: float = Field(0.0, ge=0)
    """Compact watershed when > 0."""


class Watershed(Segmenter):
    """Smooth, threshold globally, then split touching objects by a watershed of
    the distance transform from its peaks (or h-maxima).

    Options: ``sigma`` (2.0), ``diameter`` (40), ``threshold`` ("otsu"),
    ``markers`` ("distance"), ``min_distance`` (5), ``h`` (2.0), ``compactness`` (0).
    """

    name = "watershed"
    working = (35.0, 50.0)  # measured: see Segmenter.working
    options_model = WatershedOptions
    stitch = "overlap"

    @property
    def opts(self) -> WatershedOptions:
        assert isinstance(self.options, WatershedOptions)
        return self.options

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (self.opts.diameter,) * ndim

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        t = self.opts.threshold
        value = np.float32(t) if isinstance(t, float | int) else histogram_threshold(stats, t)
        return {"threshold": value}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        mask = block > params["threshold"]
        if not mask.any():
            return SegmentResult(mask.astype(np.uint8), np.zeros(block.shape, np.int32))
        distance = ndi.distance_transform_edt(mask)
        o = self.opts
        if o.markers == "distance":
            peaks = peak_local_max(
                distance,
                min_distance=o.min_distance,
                labels=label(mask, connectivity=mask.ndim),
                exclude_border=False,
            )
            seeds = np.zeros(block.shape, dtype=np.int32)
            seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        else:
            seeds = label(h_maxima(distance, o.h), connectivity=mask.ndim).astype(np.int32)
        labels = watershed(-distance, seeds, mask=mask, compactness=o.compactness)
        return SegmentResult(mask.astype(np.uint8), labels.astype(np.int32))

"""Edge-based segmentation: a watershed of the gradient magnitude from dark and bright markers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, model_validator
from skimage.filters import prewitt, sobel
from skimage.measure import label
from skimage.segmentation import watershed

from segpipe.segmenters.base import Segmenter, SegmentResult, SmoothingOptions
from segpipe.segmenters.local import contrast_level
from segpipe.segmenters.threshold import HistMethod, histogram_threshold
from segpipe.stats import ImageStats

Operator = Literal["prewitt", "sobel"]
GRADIENT_HALO = 1  # Prewitt and Sobel read one pixel per side along every axis


def edge_watershed(
    image: NDArray[np.float32],
    *,
    low: float,
    high: float,
    operator: Operator = "prewitt",
) -> NDArray[np.int32]:
    """Objects bounded by the strongest edges between bright cores and dark background.

    The background marker is every pixel darker than ``low``; each connected
    component (full connectivity) of pixels brighter than ``high`` is an object
    marker. The markers flood the gradient magnitude of ``image``; the regions
    that did not come from the background marker are the objects.

    Parameters
    ----------
    image : (M, N[, P]) ndarray of float32
        Smoothed image (or a block of it).
    low : float
        Pixels darker than this are certainly background.
    high : float
        Pixels brighter than this are certainly inside an object; ``high >= low``.
    operator : {"prewitt", "sobel"}
        Gradient operator (``skimage.filters``).

    Returns
    -------
    (M, N[, P]) ndarray of int32
        Objects 1..n (0 = background).

    Examples
    --------
    >>> row = np.array([0, 0, 0, 4, 8, 10, 10, 10, 8, 4, 0, 0, 0], np.float32)
    >>> edge_watershed(np.tile(row, (3, 1)), low=2, high=9)[1]
    array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=int32)
    """
    gradient = (prewitt if operator == "prewitt" else sobel)(image)
    objects = label(image > high, connectivity=image.ndim).astype(np.int32)
    # one background marker (id 1) for all dark pixels; object markers follow it
    markers = np.where(objects > 0, objects + 1, 0).astype(np.int32)
    markers[(image < low) & (objects == 0)] = 1
    if not (markers > 1).any():
        return np.zeros(image.shape, np.int32)
    regions = np.asarray(watershed(gradient, markers, connectivity=image.ndim), dtype=np.int32)
    out: NDArray[np.int32] = np.where(regions > 1, regions - 1, 0).astype(np.int32)
    return out


class EdgesOptions(SmoothingOptions):
    operator: Operator = "prewitt"
    """Gradient operator: Prewitt or Sobel (Sobel weighs the central row more)."""
    diameter: int = Field(40, ge=2)
    """Largest expected object diameter in pixels; with the gradient's one pixel it sets
    the halo, so objects cut by a block edge are seen whole by both blocks."""
    threshold: HistMethod | float = "otsu"
    """Reference level for ``levels: "contrast"``: a histogram method on the whole image,
    or a value in image units."""
    levels: Literal["contrast", "intensity"] = "contrast"
    """How ``low`` and ``high`` are read: "contrast" places them relative to the whole
    image, background (its 1st percentile) + value x (threshold - background), so 1.0 is
    the threshold; "intensity" takes them as image values."""
    low: float = 0.5
    """Background marker level: pixels darker are background. Half way up to the threshold
    stays clear of dim object edges."""
    high: float = 1.75
    """Object marker level: each connected component of brighter pixels seeds one object.
    Well above the threshold, so the dim contact between touching nuclei separates their
    markers, while dim nuclei keep a core above it."""

    @model_validator(mode="after")
    def _ordered_levels(self) -> EdgesOptions:
        if self.high < self.low:
            raise ValueError(
                f"Expected high >= low, got low={self.low} and high={self.high} instead."
            )
        return self


class Edges(Segmenter):
    """Smooth, take the gradient magnitude, and flood it from a background marker (dark
    pixels) and object markers (bright components); objects are the regions the bright
    markers claim, bounded by the strongest edges.

    Options: ``sigma`` (2.0), ``operator`` ("prewitt"), ``diameter`` (40), ``threshold``
    ("otsu"), ``levels`` ("contrast"), ``low`` (0.5), ``high`` (1.75).
    """

    name = "edges"
    working = (40.0, 41.0)  # measured: see Segmenter.working
    options_model = EdgesOptions
    stitch = "overlap"

    @property
    def opts(self) -> EdgesOptions:
        assert isinstance(self.options, EdgesOptions)
        return self.options

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (self.opts.diameter + GRADIENT_HALO,) * ndim

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        o = self.opts
        if o.levels == "intensity":
            return {"low": np.float32(o.low), "high": np.float32(o.high)}
        t = o.threshold
        threshold = np.float32(t) if isinstance(t, float | int) else histogram_threshold(stats, t)
        return {
            "low": contrast_level(stats, threshold, o.low),
            "high": contrast_level(stats, threshold, o.high),
        }

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        labels = edge_watershed(
            block, low=params["low"], high=params["high"], operator=self.opts.operator
        )
        return SegmentResult((labels > 0).astype(np.uint8), labels)

"""From network outputs to results: input normalisation and instances from class maps.

Shared by inference and training so a model sees the same numbers in both.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from segpipe.stats import Extrema, ImageStats, block_histogram, hist_range, merge_histograms

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
CLASSES = ["background", "interior", "boundary"]
"""The network's classes: the boundary is a training device that parts touching nuclei."""
NUCLEUS = 1
OUTPUT_CLASSES = ["background", "nucleus"]
"""The classes a 3-class model writes: interior and boundary pixels are one nucleus."""


def percentile_range(stats: ImageStats, low: float, high: float) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of an image from its global statistics."""
    lo, hi = stats.percentile(low), stats.percentile(high)
    if hi <= lo:  # a constant image: any scale maps it to one value
        hi = lo + 1.0
    return lo, hi


def image_stats(image: NDArray[np.generic]) -> ImageStats:
    """Statistics of a whole in-memory image, computed as the pipeline's global pass does."""
    data = np.asarray(image, dtype=np.float32)
    ext = Extrema.of(data)
    lo, hi = hist_range(ext)
    return merge_histograms([block_histogram(data, lo, hi)], ext)


def normalise(block: NDArray[np.generic], lo: float, hi: float) -> NDArray[np.float32]:
    """Map ``[lo, hi]`` to ``[0, 1]`` (values outside are kept, not clipped), float32."""
    scale = np.float32(1.0 / (hi - lo))
    out: NDArray[np.float32] = (np.asarray(block, np.float32) - np.float32(lo)) * scale
    return out


def nuclei(classes: NDArray[np.integer]) -> NDArray[np.uint8]:
    """Semantic output of a (background, interior, boundary) class map: nucleus where either.

    Examples
    --------
    >>> nuclei(np.array([[0, 1, 2]])).tolist()
    [[0, 1, 1]]
    """
    out: NDArray[np.uint8] = (np.asarray(classes) != BACKGROUND).astype(np.uint8) * np.uint8(
        NUCLEUS
    )
    return out


def instances_from_classes(
    classes: NDArray[np.integer],
    boundary: NDArray[np.floating] | None = None,
    *,
    min_size: int = 0,
) -> NDArray[np.int32]:
    """Instances from a (background, interior, boundary) class map.

    Seeds are the connected components of the interior class (face
    connectivity, so thin bridges do not merge two nuclei); each seed grows
    into the interior and boundary pixels around it by a watershed on the
    boundary score (or by distance when ``boundary`` is None). Seeds smaller
    than ``min_size`` pixels are dropped.

    Parameters
    ----------
    classes : ndarray of int
        Class per pixel: 0 background, 1 interior, 2 boundary.
    boundary : ndarray of float, optional
        Boundary score per pixel (higher = more boundary), same shape.
    min_size : int
        Smallest seed kept, in pixels.

    Returns
    -------
    ndarray of int32
        Instance ids (0 = background), any numbering.
    """
    seeds, n = ndi.label(classes == INTERIOR)
    if n == 0:
        return np.zeros(classes.shape, np.int32)
    if min_size > 0:
        sizes = np.bincount(seeds.ravel())
        small = sizes < min_size
        small[0] = False
        seeds[small[seeds]] = 0
    mask = classes != BACKGROUND
    if boundary is None:
        elevation = ndi.distance_transform_edt(seeds == 0).astype(np.float32)
    else:
        elevation = np.asarray(boundary, np.float32)
    labels = watershed(elevation, seeds, mask=mask)
    return labels.astype(np.int32)

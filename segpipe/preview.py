"""Preview PNGs: the image, contrast-stretched, with each object's outline in its own colour.

Read from the pyramid level nearest the preview size (and, for volumes, the
middle plane only), so a preview never reads level 0 of a large image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from segpipe import kernels

if TYPE_CHECKING:
    pass

PREVIEWS = "previews"
MAX_SIZE = 1024  # longest side of a preview, pixels
MIN_SIZE = 512  # smaller images are enlarged (nearest) so outlines stay thin
GOLDEN = 0.618033988749895


def choose_level(shapes: Sequence[Sequence[int]], *, max_size: int = MAX_SIZE) -> int:
    """The finest pyramid level whose rows and columns fit in ``max_size`` (else the coarsest).

    Examples
    --------
    >>> choose_level([(4096, 4096), (2048, 2048), (1024, 1024), (512, 512)])
    2
    """
    for k, shape in enumerate(shapes):
        if max(shape[-2:]) <= max_size:
            return k
    return len(shapes) - 1


def outlines(labels: NDArray[np.integer]) -> NDArray[np.bool_]:
    """Inner boundaries: object pixels with a 4-neighbour of another value (not the image border).

    Parameters
    ----------
    labels : (M, N) ndarray of int

    Returns
    -------
    (M, N) ndarray of bool

    Examples
    --------
    >>> outlines(np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])).astype(int)
    array([[0, 0, 0, 0],
           [0, 1, 1, 0],
           [0, 1, 1, 0],
           [0, 0, 0, 0]])
    """
    if labels.ndim != 2:
        raise ValueError(f"labels: Expected a 2D array, got shape {labels.shape} instead.")
    edge = np.zeros(labels.shape, dtype=bool)
    diff_rows = labels[1:, :] != labels[:-1, :]
    diff_cols = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= diff_rows
    edge[:-1, :] |= diff_rows
    edge[:, 1:] |= diff_cols
    edge[:, :-1] |= diff_cols
    return edge & (labels > 0)


def colours(ids: NDArray[np.integer]) -> NDArray[np.uint8]:
    """A saturated colour per id (hue stepped by the golden ratio: neighbours differ).

    Returns
    -------
    (K, 3) ndarray of uint8
    """
    hue = (np.asarray(ids, np.float64) * GOLDEN) % 1.0
    sector = np.floor(hue * 6).astype(np.int64) % 6
    frac = hue * 6 - np.floor(hue * 6)
    v, s = 1.0, 0.85
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    table = np.stack(
        [
            np.choose(sector, [v, q, p, p, t, v]),
            np.choose(sector, [t, v, v, q, p, p]),
            np.choose(sector, [p, p, t, v, v, q]),
        ],
        axis=-1,
    )
    return np.round(table * 255).astype(np.uint8)


def _int_percentiles(data: NDArray[np.integer], qs: Sequence[float]) -> list[float]:
    """``np.percentile(data, qs)`` (linear) for 8/16-bit integers from their counts."""
    counts = np.bincount(data.ravel().astype(np.intp) - int(data.min()))
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        rank = (data.size - 1) * q / 100.0
        lo, hi = math.floor(rank), math.ceil(rank)
        # the k-th smallest value: the first whose cumulative count exceeds k
        a, b = (float(np.searchsorted(cum, k, side="right")) for k in (lo, hi))
        out.append(a + (b - a) * (rank - lo) + int(data.min()))
    return out


def stretch(image: NDArray[Any], *, low: float = 0.5, high: float = 99.5) -> NDArray[np.uint8]:
    """Grey levels 0-255 between the ``low`` and ``high`` percentiles of ``image``."""
    if image.dtype.kind in "ui" and image.dtype.itemsize <= 2 and image.size > 0:
        # exact percentiles from counts, then one lookup per pixel
        lo, hi = _int_percentiles(image, [low, high])
        first = int(image.min())
        values = np.arange(first, int(image.max()) + 1, dtype=np.float64)
        return _scale(values, lo, hi)[image.astype(np.intp) - first]
    data = np.asarray(image, np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    return _scale(np.nan_to_num(data, nan=lo), lo, hi)


def _scale(values: NDArray[np.float64], lo: float, hi: float) -> NDArray[np.uint8]:
    hi = hi if hi > lo else lo + 1.0
    return np.round(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def render(image: NDArray[Any], labels: NDArray[np.integer]) -> NDArray[np.uint8]:
    """RGB picture of ``image`` (grey, stretched) with coloured outlines of ``labels``.

    Parameters
    ----------
    image : (M, N) ndarray
    labels : (M, N) ndarray of int
        0 is background; every other id gets an outline in its colour.

    Returns
    -------
    (M, N, 3) ndarray of uint8
    """
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(
            f"Expected a 2D image and labels of one shape, got {image.shape} and "
            f"{labels.shape} instead."
        )
    grey = stretch(image)
    top = int(labels.max()) if labels.size else 0
    if 0 < top <= labels.size // 4:  # a colour for every id up to the largest: one sweep
        return kernels.outlined(grey, labels, colours(np.arange(top + 1)))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    edge = outlines(labels)
    ids, where = np.unique(labels[edge], return_inverse=True)  # one colour per object
    rgb[edge] = colours(ids)[where]
    return rgb

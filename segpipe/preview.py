"""Preview PNGs: the image, contrast-stretched, with each object's outline in its colour.

Read from the pyramid level nearest the preview size (and, for volumes, the
middle plane only), so a preview never reads level 0 of a large image. A
preview is painted in one 8-bit palette (`PALETTE`): `GREYS` grey levels and
`HUES` outline colours, one byte a pixel, a third of what an RGB picture
costs to compress.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe import kernels

__all__ = [
    "GREYS",
    "HUES",
    "MAX_SIZE",
    "MIN_SIZE",
    "PALETTE",
    "PREVIEWS",
    "choose_level",
    "colours",
    "indexed",
    "outlines",
    "render",
    "stretch",
]

PREVIEWS = "previews"
MAX_SIZE = 1024  # longest side of a preview, pixels
MIN_SIZE = 512  # smaller images are enlarged (nearest) so outlines stay thin
GOLDEN = 0.618033988749895
GREYS = 192
"""Grey levels of a preview: palette entries 0 to GREYS - 1, black to white."""
HUES = 64
"""Outline colours of a preview: entries GREYS to 255; id k has colour k % HUES."""


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
    """A saturated colour per id, one of `HUES` (hue stepped by the golden ratio:
    neighbouring ids differ; ids `HUES` apart share one).

    Returns
    -------
    (K, 3) ndarray of uint8
    """
    return _HUE_TABLE[np.asarray(ids) % HUES]


def _hues(n: int) -> NDArray[np.uint8]:
    hue = (np.arange(n, dtype=np.float64) * GOLDEN) % 1.0
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


_HUE_TABLE = _hues(HUES)
PALETTE = np.concatenate(
    [np.repeat(np.round(np.linspace(0, 255, GREYS)).astype(np.uint8)[:, None], 3, 1), _HUE_TABLE]
)
"""The previews' palette: `GREYS` greys, then the `HUES` outline colours."""
_GREY_INDEX = np.round(np.arange(256) * (GREYS - 1) / 255).astype(np.uint8)
_LEVELS = np.arange(256, dtype=np.uint8)


def _offsets(data: NDArray[np.integer]) -> tuple[NDArray[np.intp], int]:
    """Each value of 8/16-bit ``data`` less the least (indices into a table of its range),
    and that least: unsigned values are their own offsets from 0, with no copy."""
    if data.dtype.kind == "u":
        return data, 0  # type: ignore[return-value]
    first = int(data.min())
    return data.astype(np.intp) - first, first


def _int_percentiles(counts: NDArray[np.intp], first: int, qs: Sequence[float]) -> list[float]:
    """``np.percentile(data, qs)`` (linear) of integers from their ``counts``
    (``counts[k]`` of value ``first + k``)."""
    cum = np.cumsum(counts)
    size = int(cum[-1])
    out = []
    for q in qs:
        rank = (size - 1) * q / 100.0
        lo, hi = math.floor(rank), math.ceil(rank)
        # the k-th smallest value: the first whose cumulative count exceeds k
        a, b = (float(np.searchsorted(cum, k, side="right")) for k in (lo, hi))
        out.append(a + (b - a) * (rank - lo) + first)
    return out


def stretch(image: NDArray[Any], *, low: float = 0.5, high: float = 99.5) -> NDArray[np.uint8]:
    """Grey levels 0-255 between the ``low`` and ``high`` percentiles of ``image``."""
    return _stretched(image, low, high, _LEVELS)


def _stretched(
    image: NDArray[Any], low: float, high: float, lut: NDArray[np.uint8]
) -> NDArray[np.uint8]:
    """`stretch`, each grey level then mapped through ``lut`` (256 entries)."""
    if image.dtype.kind in "ui" and image.dtype.itemsize <= 2 and image.size > 0:
        # exact percentiles from counts, then one lookup per pixel
        offsets, first = _offsets(image)
        counts = np.bincount(offsets.ravel())
        lo, hi = _int_percentiles(counts, first, [low, high])
        values = np.arange(first, first + len(counts), dtype=np.float64)
        return np.take(lut[_scale(values, lo, hi)], offsets)
    data = np.asarray(image, np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.full(data.shape, lut[0], np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    return lut[_scale(np.nan_to_num(data, nan=lo), lo, hi)]


def _scale(values: NDArray[np.float64], lo: float, hi: float) -> NDArray[np.uint8]:
    hi = hi if hi > lo else lo + 1.0
    return np.round(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def indexed(image: NDArray[Any], labels: NDArray[np.integer]) -> NDArray[np.uint8]:
    """`PALETTE` indices of ``image`` (grey, stretched) with each object of ``labels``
    outlined in its colour (`colours`).

    Parameters
    ----------
    image : (M, N) ndarray
    labels : (M, N) ndarray of int
        0 is background; every other id gets an outline in its colour.

    Returns
    -------
    (M, N) ndarray of uint8
    """
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(
            f"Expected a 2D image and labels of one shape, got {image.shape} and "
            f"{labels.shape} instead."
        )
    grey = _stretched(image, 0.5, 99.5, _GREY_INDEX)
    top = int(labels.max()) if labels.size else 0
    if 0 < top <= labels.size // 4:  # an index for every id up to the largest: one sweep
        table = (GREYS + np.arange(top + 1) % HUES).astype(np.uint8)
        return kernels.outlined(grey, labels, table)
    edge = outlines(labels)
    grey[edge] = GREYS + labels[edge] % HUES
    return grey


def render(image: NDArray[Any], labels: NDArray[np.integer]) -> NDArray[np.uint8]:
    """RGB picture of ``image`` (grey, stretched) with coloured outlines of ``labels``:
    `indexed` through `PALETTE`.

    Returns
    -------
    (M, N, 3) ndarray of uint8
    """
    return PALETTE[indexed(image, labels)]

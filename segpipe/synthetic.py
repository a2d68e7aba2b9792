"""Synthetic fluorescence nuclei, rendered tile by tile so any size fits in memory.

Nuclei sit on a jittered grid of cells; each cell's nucleus is drawn from a
generator seeded by (seed, cell), so a tile is rendered without the rest of
the image and the same pixels come out whatever the tiling.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

SPACING = 24  # cell edge in pixels: one nucleus at most per cell
MAX_RADIUS = 13


def _cell_rng(seed: int, cell: Sequence[int]) -> np.random.Generator:
    return np.random.default_rng([seed, *(int(c) + 1 for c in cell)])


def _nucleus(
    seed: int, cell: Sequence[int], density: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], float] | None:
    rng = _cell_rng(seed, cell)
    if rng.random() > density:
        return None
    ndim = len(cell)
    center = (np.asarray(cell) + 0.5) * SPACING + rng.uniform(-7, 7, ndim)
    radii = rng.uniform(7, 11, ndim) if ndim == 2 else rng.uniform(6, 9, ndim)
    brightness = rng.uniform(0.6, 1.0)
    return center, radii, brightness


def render(
    region: Sequence[slice], *, seed: int = 0, density: float = 0.7, noise: float = 0.05
) -> tuple[NDArray[np.uint16], NDArray[np.uint32]]:
    """Image (uint16) and ground-truth labels (uint32) of ``region`` of the synthetic plane/volume.

    Parameters
    ----------
    region : sequence of slice
        Rows/columns (and planes) to render, ``(Z, Y, X)`` or ``(Y, X)``.
    seed : int
        Picks the nuclei and the noise.
    density : float
        Fraction of grid cells holding a nucleus.
    noise : float
        Standard deviation of the Gaussian noise, as a fraction of full brightness.
    """
    starts = np.array([s.start for s in region])
    stops = np.array([s.stop for s in region])
    shape = tuple(stops - starts)
    ndim = len(shape)
    signal = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint32)
    lo = np.maximum((starts - MAX_RADIUS) // SPACING - 1, 0)
    hi = (stops + MAX_RADIUS) // SPACING + 1
    grid = [np.arange(s, e, dtype=np.float32) for s, e in zip(starts, stops, strict=True)]
    for cell in itertools.product(*(range(a, b) for a, b in zip(lo, hi, strict=True))):
        nucleus = _nucleus(seed, cell, density)
        if nucleus is None:
            continue
        center, radii, brightness = nucleus
        box = [
            (max(int(c - r) - 1, s), min(int(c + r) + 2, e))
            for c, r, s, e in zip(center, radii, starts, stops, strict=True)
        ]
        if any(a >= b for a, b in box):
            continue
        local = tuple(slice(a - s, b - s) for (a, b), s in zip(box, starts, strict=True))
        dist = sum(
            ((g[sl] - c) / r).reshape([-1 if i == k else 1 for k in range(ndim)]) ** 2
            for i, (g, sl, c, r) in enumerate(zip(grid, local, center, radii, strict=True))
        )
        inside = dist <= 1.0
        patch = signal[local]
        patch[inside] = np.maximum(patch[inside], brightness * (1.0 - 0.3 * dist[inside]))
        # unique per cell and < 2**32 for planes up to 786k px and volumes up to 24k px a side
        cell_id = int(np.ravel_multi_index(cell, [1 << 15] * 2 if ndim == 2 else [1 << 10] * 3)) + 1
        labels[local][inside] = cell_id
    rng = np.random.default_rng([seed, *starts.tolist(), 7])
    image = 0.1 + signal + rng.normal(0.0, noise, shape).astype(np.float32)
    return (np.clip(image, 0, 1.2) * 50000).astype(np.uint16), labels


def tiles(
    shape: Sequence[int], tile: tuple[int, int], *, seed: int = 0
) -> Iterator[NDArray[np.uint16]]:
    """Image tiles of a plane in row-major order (as ``tifffile.imwrite`` wants them).

    For a volume, tiles are 2D per plane.
    """
    for prefix in itertools.product(*(range(n) for n in shape[:-2])):
        for r in range(0, shape[-2], tile[0]):
            for c in range(0, shape[-1], tile[1]):
                region = [slice(p, p + 1) for p in prefix] + [
                    slice(r, min(r + tile[0], shape[-2])),
                    slice(c, min(c + tile[1], shape[-1])),
                ]
                image, _ = render(region, seed=seed)
                out = np.zeros((tile[0], tile[1]), np.uint16)
                rows, cols = image.shape[-2:]
                out[:rows, :cols] = image.reshape(rows, cols)
                yield out


def write_tiff(path: str | Path, shape: Sequence[int], *, tile: int = 256, seed: int = 0) -> Path:
    """Write a synthetic tiled TIFF of ``shape`` without holding the image in memory."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path,
        tiles(shape, (tile, tile), seed=seed),
        shape=tuple(shape),
        dtype=np.uint16,
        tile=(tile, tile),
        compression="zlib",
        compressionargs={"level": 1},
        bigtiff=int(np.prod(shape)) * 2 > 2**31,
        metadata={"axes": "ZYX"[3 - len(shape) :]},
    )
    return path

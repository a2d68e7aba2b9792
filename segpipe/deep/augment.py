"""Training-time augmentation: the same geometric change to an image and its labels,
and intensity changes to the image alone.

Geometry is one resampling: output pixel ``q`` (measured from the patch centre)
reads the source at ``centre + R(angle) q / zoom + displacement(q)``, linear for
the image and nearest for the labels, so labels stay integer ids. Flips and
90° turns are exact array operations. Axes are ``(Z, Y, X)`` or ``(Y, X)``;
rotations turn the last two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

__all__ = [
    "Augmentation",
    "elastic_field",
    "flip",
    "intensity",
    "random_augment",
    "rot90",
    "warp",
]

Labels = NDArray[np.integer]


def _check_pair(image: NDArray[np.generic], labels: NDArray[np.generic]) -> None:
    if image.shape != labels.shape:
        raise ValueError(
            f"Expected image and labels of one shape, got {image.shape} and {labels.shape} instead."
        )


def flip(
    image: NDArray[np.floating], labels: Labels, *, axes: Sequence[int]
) -> tuple[NDArray[np.floating], Labels]:
    """Mirror image and labels along ``axes``.

    Examples
    --------
    >>> image, labels = flip(np.arange(3.0)[None], np.array([[0, 1, 2]]), axes=[1])
    >>> labels.tolist()
    [[2, 1, 0]]
    """
    _check_pair(image, labels)
    axes = tuple(axes)
    return np.flip(image, axes), np.flip(labels, axes)


def rot90(
    image: NDArray[np.floating], labels: Labels, *, k: int
) -> tuple[NDArray[np.floating], Labels]:
    """Turn image and labels by ``k`` quarter turns in the last two axes (as `numpy.rot90`)."""
    _check_pair(image, labels)
    return np.rot90(image, k, axes=(-2, -1)), np.rot90(labels, k, axes=(-2, -1))


def elastic_field(
    shape: Sequence[int], rng: np.random.Generator, *, alpha: float, sigma: float
) -> NDArray[np.float32]:
    """A smooth random displacement field, largest displacement ``alpha`` pixels.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the output patch.
    rng : numpy.random.Generator
        Source of the randomness.
    alpha : float
        Largest displacement, in pixels (0: no displacement).
    sigma : float
        Smoothness: the Gaussian sigma, in pixels, of the white noise it is made from.

    Returns
    -------
    (ndim, *shape) ndarray of float32
        Displacement along each axis, per output pixel.
    """
    shape = tuple(int(s) for s in shape)
    field = np.stack(
        [ndi.gaussian_filter(rng.standard_normal(shape), sigma) for _ in shape]
    ).astype(np.float32)
    peak = float(np.sqrt((field**2).sum(axis=0)).max()) if field.size else 0.0
    if alpha == 0 or peak == 0:
        return np.zeros_like(field)
    out: NDArray[np.float32] = field * np.float32(alpha / peak)
    return out


def warp(
    image: NDArray[np.floating],
    labels: Labels,
    *,
    shape: Sequence[int] | None = None,
    center: Sequence[float] | None = None,
    zoom: float = 1.0,
    angle: float = 0.0,
    displacement: NDArray[np.floating] | None = None,
    mode: str = "mirror",
) -> tuple[NDArray[np.float32], Labels]:
    """Resample image (linear) and labels (nearest) through one zoom, rotation and displacement.

    Parameters
    ----------
    image : (M, N) or (P, M, N) ndarray
        Intensities.
    labels : ndarray of int, same shape
        Object ids or classes; read by nearest neighbour, so ids are never blended.
    shape : sequence of int, optional
        Output shape; default the input's.
    center : sequence of float, optional
        Source position of the output's centre; default the input's centre.
    zoom : float
        Magnification: 2 shows half the field, twice as large.
    angle : float
        Turn in radians in the last two axes; ``pi / 2`` equals ``rot90(k=1)``.
    displacement : (ndim, *shape) ndarray, optional
        Added to the source position of every output pixel (`elastic_field`).
    mode : str
        How the source extends beyond its edges (`scipy.ndimage.map_coordinates`).

    Returns
    -------
    image : ndarray of float32
    labels : ndarray of the labels' dtype
    """
    _check_pair(image, labels)
    if zoom <= 0:
        raise ValueError(f"Expected zoom > 0, got {zoom} instead.")
    out_shape = tuple(int(s) for s in (image.shape if shape is None else shape))
    if len(out_shape) != image.ndim:
        raise ValueError(f"Expected an output shape of {image.ndim} axes, got {out_shape} instead.")
    src_center = (
        np.asarray([(n - 1) / 2 for n in image.shape])
        if center is None
        else np.asarray(center, np.float64)
    )
    offsets = np.meshgrid(
        *(np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in out_shape), indexing="ij"
    )
    coords = [o / zoom for o in offsets]
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        rows, cols = coords[-2], coords[-1]
        coords[-2], coords[-1] = c * rows + s * cols, c * cols - s * rows
    coords = [q + c for q, c in zip(coords, src_center, strict=True)]
    if displacement is not None:
        if displacement.shape != (image.ndim, *out_shape):
            raise ValueError(
                f"Expected a displacement of shape {(image.ndim, *out_shape)}, "
                f"got {displacement.shape} instead."
            )
        coords = [q + d for q, d in zip(coords, displacement, strict=True)]
    grid = np.stack(coords)
    if np.allclose(grid, np.round(grid), rtol=0, atol=1e-9):
        grid = np.round(grid)  # whole-pixel moves (flips, quarter turns) copy pixels exactly
    warped = ndi.map_coordinates(np.asarray(image, np.float32), grid, order=1, mode=mode)
    warped_labels = ndi.map_coordinates(labels, grid, order=0, mode=mode)
    return warped.astype(np.float32), warped_labels.astype(labels.dtype)


def intensity(
    image: NDArray[np.floating], *, scale: float = 1.0, offset: float = 0.0, gamma: float = 1.0
) -> NDArray[np.float32]:
    """``scale * sign(x) * |x| ** gamma + offset`` of a normalised image (0-1 is its range).

    Examples
    --------
    >>> intensity(np.array([0.25, 1.0]), gamma=0.5, scale=2.0, offset=-1.0).tolist()
    [0.0, 1.0]
    """
    x = np.asarray(image, np.float32)
    if gamma != 1.0:
        x = np.sign(x) * np.abs(x) ** np.float32(gamma)
    out: NDArray[np.float32] = x * np.float32(scale) + np.float32(offset)
    return out


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random changes of `random_augment` (each drawn uniformly; ``zoom``
    and ``gamma`` log-uniformly)."""

    zoom: tuple[float, float] = (0.75, 1.33)
    rotate: bool = True
    """Any angle (else quarter turns only)."""
    flip: bool = True
    elastic: tuple[float, float] = (0.0, 4.0)
    """Largest displacement of the elastic field, pixels."""
    elastic_sigma: tuple[float, float] = (6.0, 12.0)
    scale: tuple[float, float] = (0.7, 1.3)
    offset: tuple[float, float] = (-0.1, 0.1)
    gamma: tuple[float, float] = (0.7, 1.4)


def _log_uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(r[0]), np.log(r[1]))))


def random_augment(
    image: NDArray[np.floating],
    labels: Labels,
    rng: np.random.Generator,
    *,
    shape: Sequence[int],
    options: Augmentation = Augmentation(),
) -> tuple[NDArray[np.float32], Labels]:
    """A random ``shape`` patch of a (normalised) image and its labels, randomly changed.

    The patch's centre is drawn where its turned and zoomed footprint fits in the
    image when it can (else the image is mirrored beyond its edges); the labels
    follow every geometric change and none of the intensity changes.

    Parameters
    ----------
    image : (M, N) or (P, M, N) ndarray
        Normalised intensities (0-1 between the percentiles).
    labels : ndarray of int, same shape
        Object ids or classes.
    rng : numpy.random.Generator
        Source of every choice.
    shape : sequence of int
        Patch shape.
    options : Augmentation
        Ranges of the changes.
    """
    _check_pair(image, labels)
    ndim = image.ndim
    zoom = _log_uniform(rng, options.zoom)
    angle = float(rng.uniform(0, 2 * np.pi)) if options.rotate else np.pi / 2 * rng.integers(4)
    alpha = float(rng.uniform(*options.elastic))
    displacement = None
    if alpha > 0:
        sigma = float(rng.uniform(*options.elastic_sigma))
        displacement = elastic_field(shape, rng, alpha=alpha, sigma=sigma)
    # half the footprint of the turned patch, plus the elastic reach
    half = np.array([(n - 1) / 2 for n in shape], np.float64) / zoom
    if ndim >= 2:
        c, s = abs(np.cos(angle)), abs(np.sin(angle))
        half[-2], half[-1] = c * half[-2] + s * half[-1], s * half[-2] + c * half[-1]
    half += alpha
    center = [
        float(rng.uniform(h, n - 1 - h)) if n - 1 - h > h else (n - 1) / 2
        for h, n in zip(half, image.shape, strict=True)
    ]
    out, out_labels = warp(
        image, labels, shape=shape, center=center, zoom=zoom, angle=angle, displacement=displacement
    )
    if options.flip:
        axes = [a for a in range(ndim) if rng.random() < 0.5]
        flipped, flipped_labels = flip(out, out_labels, axes=axes)
        out, out_labels = np.ascontiguousarray(flipped), np.ascontiguousarray(flipped_labels)
    return (
        intensity(
            out,
            scale=float(rng.uniform(*options.scale)),
            offset=float(rng.uniform(*options.offset)),
            gamma=_log_uniform(rng, options.gamma),
        ),
        out_labels,
    )

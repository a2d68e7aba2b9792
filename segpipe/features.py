"""A bank of pixel features (smoothed intensity, edges, blobs, curvature, local statistics)
that a block with `halo` pixels of context computes exactly as the whole image would.

Each feature is a pointwise function of a fixed neighbourhood: a Gaussian of σ reads
``int(4σ + 0.5)`` pixels per side (as SciPy), a 3×3 gradient one more, the Hessian's
two central differences two more. Every filter computes each output pixel from its
neighbourhood alone, in the same order wherever the block starts (no running sums),
and at the image's edges a block's read region ends where the image does, so the
core of a block read with `halo` equals the whole image's pixels bit for bit.

Names are ``kind_σ`` (``gaussian_2``, ``sobel_0.5``, ``hessian1_4``) and statistics of
the whole image (``otsu``, ``li``, ``p99``) are constants beside them (`statistics`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from segpipe import kernels
from segpipe.errors import SegmenterError
from segpipe.stats import ImageStats

__all__ = [
    "KINDS",
    "STATISTICS",
    "Feature",
    "FeatureError",
    "compute",
    "default_features",
    "halo",
    "is_statistic",
    "parse_feature",
    "parse_features",
    "statistics",
]

KINDS: dict[str, str] = {
    "intensity": "the pixel's value",
    "gaussian": "Gaussian smoothing of σ (scipy's mode='nearest', truncate 4)",
    "sobel": "Sobel gradient magnitude of the Gaussian of σ (scikit-image's `sobel`)",
    "prewitt": "Prewitt gradient magnitude of the Gaussian of σ (scikit-image's `prewitt`)",
    "log": "Laplacian of Gaussian of σ (scipy's `gaussian_laplace`, mode='nearest')",
    "dog": "difference of Gaussians: Gaussian of σ minus Gaussian of 2σ",
    "hessian": "eigenvalue k (1 = largest) of the Hessian of the Gaussian of σ by central "
    "differences (as scikit-image's `multiscale_basic_features`); hessian1_σ ... hessianN_σ",
    "mean": "mean over the box of half-width ceil(σ) (mode='nearest')",
    "std": "standard deviation over the box of half-width ceil(σ) (mode='nearest')",
}
"""Feature kinds and what each computes."""

STATISTICS: dict[str, str] = {
    "otsu": "Otsu's threshold of the whole image",
    "li": "Li's minimum cross-entropy threshold of the whole image",
    "triangle": "the triangle threshold of the whole image",
    "yen": "Yen's threshold of the whole image",
    "isodata": "the ISODATA threshold of the whole image",
    "image_mean": "the whole image's mean",
    "image_min": "the whole image's minimum",
    "image_max": "the whole image's maximum",
    "pQ": "the whole image's Q-th percentile, e.g. p1, p50, p99.5",
}
"""Whole-image statistics usable as constants (in rules, or as features)."""

_THRESHOLDS = ("otsu", "li", "triangle", "yen", "isodata")
_NAME = re.compile(r"^(?P<kind>[a-z]+?)(?P<index>[1-3])?(?:_(?P<sigma>\d+(?:\.\d+)?))?$")
_PERCENTILE = re.compile(r"^p(?P<q>\d+(?:\.\d+)?)$")
_NEEDS_POSITIVE = ("log", "dog", "mean", "std")


class FeatureError(SegmenterError):
    """A feature or statistic name that the bank does not know."""


@dataclass(frozen=True, order=True)
class Feature:
    """One feature of the bank: a kind, a scale σ in pixels and, for the Hessian, which
    eigenvalue (1 = largest)."""

    kind: str
    sigma: float = 0.0
    index: int = 0

    @property
    def name(self) -> str:
        """The feature's name, e.g. ``gaussian_2``, ``hessian1_0.5``, ``intensity``."""
        if self.kind == "intensity":
            return "intensity"
        return f"{self.kind}{self.index or ''}_{self.sigma:g}"

    def radius(self) -> int:
        """Pixels of context read per side to compute the feature exactly."""
        if self.kind == "intensity":
            return 0
        if self.kind in ("mean", "std"):
            return math.ceil(self.sigma)
        if self.kind == "dog":
            return _gaussian_radius(2 * self.sigma)
        extra = {"sobel": 1, "prewitt": 1, "hessian": 2}.get(self.kind, 0)
        return _gaussian_radius(self.sigma) + extra


def _gaussian_radius(sigma: float) -> int:
    return int(4.0 * sigma + 0.5) if sigma > 0 else 0


def _unknown(name: str) -> FeatureError:
    kinds = ", ".join(
        "hessian1 … hessian3 (eigenvalues, largest first)" if k == "hessian" else k
        for k in KINDS
        if k != "intensity"
    )
    stats = ", ".join(k for k in STATISTICS if k != "pQ")
    return FeatureError(
        f"unknown feature {name!r}; expected intensity, or KIND_σ with KIND one of {kinds} "
        f"(e.g. gaussian_2); or a statistic: {stats}, p1 … p99.5"
    )


def is_statistic(name: str) -> bool:
    """True when ``name`` is a whole-image statistic (`STATISTICS`), not a feature.

    Examples
    --------
    >>> is_statistic("otsu"), is_statistic("p99.5"), is_statistic("gaussian_2")
    (True, True, False)
    """
    if name in STATISTICS and name != "pQ":
        return True
    m = _PERCENTILE.match(name)
    return m is not None and 0 <= float(m["q"]) <= 100


def parse_feature(name: str, *, ndim: int = 3) -> Feature:
    """The `Feature` named ``name``.

    Parameters
    ----------
    name : str
        ``intensity`` or ``KIND_SIGMA`` (see `KINDS`), e.g. ``sobel_2``, ``hessian2_1``.
    ndim : int
        Axes of the images it will see: a Hessian has ``ndim`` eigenvalues.

    Raises
    ------
    FeatureError
        If the name is not one of the bank's, naming what is expected.

    Examples
    --------
    >>> parse_feature("hessian1_0.5")
    Feature(kind='hessian', sigma=0.5, index=1)
    >>> parse_feature("gaussian_2").radius(), parse_feature("hessian2_2").radius()
    (8, 10)
    """
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None or m["kind"] not in KINDS:
        raise _unknown(str(name))
    kind, index, sigma = m["kind"], m["index"], m["sigma"]
    if kind == "intensity":
        if index or sigma is not None:
            raise _unknown(name)
        return Feature("intensity")
    if sigma is None:
        raise FeatureError(f"feature {name!r}: expected {kind}_SIGMA, e.g. {kind}_2")
    if (kind == "hessian") != (index is not None):
        if kind == "hessian":
            raise FeatureError(
                f"feature {name!r}: name the eigenvalue, hessian1_{sigma} (largest) to "
                f"hessian{ndim}_{sigma}"
            )
        raise _unknown(name)
    k = int(index or 0)
    if kind == "hessian" and not 1 <= k <= ndim:
        raise FeatureError(
            f"feature {name!r}: a {ndim}D Hessian has eigenvalues hessian1 to hessian{ndim}"
        )
    s = float(sigma)
    if kind in _NEEDS_POSITIVE and s <= 0:
        raise FeatureError(f"feature {name!r}: expected a scale > 0 for {kind}")
    return Feature(kind, s, k)


def parse_features(names: Iterable[str], *, ndim: int = 3) -> tuple[Feature, ...]:
    """`parse_feature` of each name, in order; a repeated name is an error.

    Raises
    ------
    FeatureError
        Naming the first bad or repeated name.
    """
    out: list[Feature] = []
    for name in names:
        feature = parse_feature(name, ndim=ndim)
        if feature in out:
            raise FeatureError(f"feature {name!r} is listed twice")
        out.append(feature)
    return tuple(out)


def default_features(ndim: int = 2) -> list[str]:
    """scikit-image's `multiscale_basic_features` set: at σ = 0.5, 1, 2, 4, 8, 16 the
    Gaussian, its Sobel magnitude and the Hessian's eigenvalues (24 features in 2D).

    Examples
    --------
    >>> default_features(2)[:5]
    ['gaussian_0.5', 'sobel_0.5', 'hessian1_0.5', 'hessian2_0.5', 'gaussian_1']
    """
    names: list[str] = []
    for s in (0.5, 1, 2, 4, 8, 16):
        names += [f"gaussian_{s:g}", f"sobel_{s:g}"]
        names += [f"hessian{k}_{s:g}" for k in range(1, ndim + 1)]
    return names


def halo(features: Iterable[Feature], ndim: int) -> tuple[int, ...]:
    """Pixels of context per side (per axis) that ``features`` need to be exact.

    Examples
    --------
    >>> halo(parse_features(["intensity", "sobel_1", "mean_3"]), 2)
    (5, 5)
    """
    r = max((f.radius() for f in features), default=0)
    return (r,) * ndim


# -- computation ---------------------------------------------------------------------------


_SMOOTH = {"sobel": np.array([1.0, 2.0, 1.0]) / 4, "prewitt": np.array([1.0, 1.0, 1.0]) / 3}


@numba.njit(cache=True, nogil=True)
def _edges_2d(f, s, out):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # scikit-image's sobel/prewitt magnitude on a plane, as SciPy's `convolve` computes
    # each axis (the flipped 3x3 kernel's non-zero taps in row-major order, summed in
    # float64 from 0, mode "reflect"), then float32: sqrt(gy² + gx²) / sqrt(2)
    rows, cols = f.shape
    root2 = np.sqrt(np.float32(2.0))
    for r in range(rows):
        up, down = max(r - 1, 0), min(r + 1, rows - 1)
        for c in range(cols):
            left, right = max(c - 1, 0), min(c + 1, cols - 1)
            gy = 0.0
            gy += np.float64(f[up, left]) * -s[0]
            gy += np.float64(f[up, c]) * -s[1]
            gy += np.float64(f[up, right]) * -s[2]
            gy += np.float64(f[down, left]) * s[0]
            gy += np.float64(f[down, c]) * s[1]
            gy += np.float64(f[down, right]) * s[2]
            gx = 0.0
            gx += np.float64(f[up, left]) * -s[0]
            gx += np.float64(f[up, right]) * s[0]
            gx += np.float64(f[r, left]) * -s[1]
            gx += np.float64(f[r, right]) * s[1]
            gx += np.float64(f[down, left]) * -s[2]
            gx += np.float64(f[down, right]) * s[2]
            a = np.float32(gy)
            b = np.float32(gx)
            out[r, c] = np.sqrt(a * a + b * b) / root2


def _gradient_magnitude(smooth: NDArray[np.float32], kind: str) -> NDArray[np.float32]:
    if smooth.ndim == 2:
        out = np.empty_like(smooth)
        _edges_2d(np.ascontiguousarray(smooth), _SMOOTH[kind], out)
        return out
    from skimage import filters

    magnitude: NDArray[np.float32] = (filters.sobel if kind == "sobel" else filters.prewitt)(smooth)
    return magnitude


@numba.njit(cache=True, nogil=True)
def _gradient(f, out):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # np.gradient along axis 1 of (pre, n, post), float32 as NumPy computes it: central
    # differences / 2 inside, one-sided at the ends (n >= 2)
    pre, n, post = f.shape
    two = np.float32(2.0)
    for p in range(pre):
        for q in range(post):
            out[p, 0, q] = f[p, 1, q] - f[p, 0, q]
            out[p, n - 1, q] = f[p, n - 1, q] - f[p, n - 2, q]
        for i in range(1, n - 1):
            for q in range(post):
                out[p, i, q] = (f[p, i + 1, q] - f[p, i - 1, q]) / two


def _along(f: NDArray[np.float32], axis: int) -> NDArray[np.float32]:
    out = np.empty_like(f)
    view = (int(np.prod(f.shape[:axis])), f.shape[axis], int(np.prod(f.shape[axis + 1 :])))
    _gradient(f.reshape(view), out.reshape(view))
    return out


@numba.njit(cache=True, nogil=True)
def _eigenvalues_2d(h00, h01, h11, big, small):  # type: ignore[no-untyped-def]  # pragma: no cover
    # scikit-image's closed form for symmetric 2x2 matrices, operation by operation in
    # float32: (a + c) / 2 -/+ sqrt(b**2 + ((a - c) / 2)**2)
    two = np.float32(2.0)
    for j in range(h00.shape[0]):
        half_trace = (h00[j] + h11[j]) / two
        d = (h00[j] - h11[j]) / two
        root = np.sqrt(h01[j] * h01[j] + d * d)
        big[j] = half_trace + root
        small[j] = half_trace - root


def _hessian_eigenvalues(smooth: NDArray[np.float32]) -> NDArray[np.float32]:
    """(ndim, *shape) eigenvalues, largest first, of the Hessian by central differences
    (``np.gradient`` twice, as scikit-image's texture features, bit for bit)."""
    from skimage.feature import hessian_matrix_eigvals

    ndim = smooth.ndim
    if min(smooth.shape) < 2:  # np.gradient needs two samples per axis
        return np.zeros((ndim, *smooth.shape), np.float32)
    smooth = np.ascontiguousarray(smooth, np.float32)
    first = [_along(smooth, a) for a in range(ndim)]
    elements = [_along(first[a], b) for a in range(ndim) for b in range(a, ndim)]
    if ndim == 2:
        eig = np.empty((2, *smooth.shape), np.float32)
        h00, h01, h11 = (e.reshape(-1) for e in elements)
        _eigenvalues_2d(h00, h01, h11, eig[0].reshape(-1), eig[1].reshape(-1))
        return eig
    out: NDArray[np.float32] = hessian_matrix_eigvals(elements).astype(np.float32, copy=False)
    return out


def _box(image: NDArray[np.float64], width: int) -> NDArray[np.float64]:
    """Mean over the box of half-width ``width``: a direct sum per pixel, one axis at a
    time (scipy's `uniform_filter` keeps a running sum, whose last bits depend on where
    the line starts)."""
    weights = np.full(2 * width + 1, 1.0 / (2 * width + 1))
    out = image
    for axis in range(image.ndim):
        out = ndi.correlate1d(out, weights, axis=axis, mode="nearest")
    return out


def compute(
    image: NDArray[Any],
    features: Sequence[Feature | str],
    *,
    constants: Mapping[str, float] | None = None,
) -> NDArray[np.float32]:
    """The features of ``image`` (a block with its halo, or a whole image).

    Parameters
    ----------
    image : (M, N[, P]) ndarray
        Taken as float32.
    features : sequence of Feature or str
        What to compute (`parse_features`); a str names a whole-image statistic whose
        value ``constants`` holds (a constant plane).
    constants : mapping of str to float, optional
        Values of the statistics listed (`statistics`).

    Returns
    -------
    (F, M, N[, P]) ndarray of float32
        One plane per entry of ``features``, in order.

    Examples
    --------
    >>> image = np.arange(16, dtype=np.float32).reshape(4, 4)
    >>> compute(image, [*parse_features(["intensity", "mean_1"]), "p50"], constants={"p50": 7.5})[
    ...     :, 1, 1
    ... ]
    array([5. , 5. , 7.5], dtype=float32)
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    out = np.empty((len(features), *data.shape), np.float32)
    smooth: dict[float, NDArray[np.float32]] = {}
    hessians: dict[float, NDArray[np.float32]] = {}

    def gauss(s: float) -> NDArray[np.float32]:
        if s not in smooth:
            smooth[s] = kernels.gaussian(data, s) if s > 0 else data
        return smooth[s]

    for i, f in enumerate(features):
        if isinstance(f, str):
            if constants is None or f not in constants:
                raise FeatureError(f"statistic {f!r} has no value here")
            out[i] = np.float32(constants[f])
        elif f.kind == "intensity":
            out[i] = data
        elif f.kind == "gaussian":
            out[i] = gauss(f.sigma)
        elif f.kind in ("sobel", "prewitt"):
            out[i] = _gradient_magnitude(gauss(f.sigma), f.kind)
        elif f.kind == "log":
            ndi.gaussian_laplace(data, f.sigma, output=out[i], mode="nearest", truncate=4.0)
        elif f.kind == "dog":
            np.subtract(gauss(f.sigma), gauss(2 * f.sigma), out=out[i])
        elif f.kind == "hessian":
            if f.sigma not in hessians:
                hessians[f.sigma] = _hessian_eigenvalues(gauss(f.sigma))
            out[i] = hessians[f.sigma][f.index - 1]
        elif f.kind in ("mean", "std"):
            width = math.ceil(f.sigma)
            wide = data.astype(np.float64)
            mean = _box(wide, width)
            if f.kind == "mean":
                out[i] = mean
            else:
                var = _box(wide * wide, width) - mean * mean
                out[i] = np.sqrt(np.maximum(var, 0.0))
        else:  # pragma: no cover (parse_feature admits only the kinds above)
            raise FeatureError(f"feature {f.name!r}: no computation for kind {f.kind!r}")
    return out


# -- whole-image statistics ----------------------------------------------------------------


def statistics(stats: ImageStats, names: Iterable[str]) -> dict[str, float]:
    """Values of the whole-image statistics ``names`` (see `STATISTICS`) from ``stats``.

    Thresholds are those of `segpipe.segmenters.threshold.histogram_threshold` (equal to
    scikit-image's on the whole image); percentiles are interpolated in the histogram.

    Raises
    ------
    FeatureError
        For a name that is not a statistic.
    """
    from segpipe.segmenters.threshold import histogram_threshold

    out: dict[str, float] = {}
    for name in names:
        if name in _THRESHOLDS:
            out[name] = float(histogram_threshold(stats, name))  # type: ignore[arg-type]
        elif name == "image_mean":
            out[name] = float(stats.mean)
        elif name == "image_min":
            out[name] = float(stats.min)
        elif name == "image_max":
            out[name] = float(stats.max)
        elif is_statistic(name):
            out[name] = float(stats.percentile(float(name[1:])))
        else:
            raise _unknown(name)
    return out

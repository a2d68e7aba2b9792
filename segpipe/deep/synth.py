"""Varied synthetic fluorescent nuclei with ground truth, for training networks that generalise.

Each image draws a `Style` (sizes, packing, staining, optics, noise) from
`StyleRanges`; `TRAIN` is what the shipped models learn from and `HELD_OUT`
holds sets that differ from it in scale, contrast and noise. Steps: place
nuclei (uniformly and in touching clusters) → give each pixel to the nucleus
whose irregular outline it lies deepest inside (so touching nuclei part along a
natural seam) → stain (brightness, dim nuclei, texture, nucleoli, uneven
staining) → background (level, gradient, out-of-focus blobs) and debris →
blur → photon and read noise. Whole images only; deterministic given a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = [
    "HELD_OUT",
    "HELD_OUT_SEED0",
    "TRAIN",
    "Style",
    "StyleRanges",
    "held_out_set",
    "nuclei",
    "sample_style",
]

Noise = Literal["poisson", "gaussian", "mixed"]
Range = tuple[float, float]
_HARMONICS = 4  # outline harmonics 2..5: bumps without self-intersection at small amplitude
_CANDIDATES = (
    8  # nearest centres checked per pixel: enough that the deepest-inside one is among them
)


@dataclass(frozen=True)
class Style:
    """How one synthetic image looks. Brightness is relative to the median nucleus (1.0)."""

    radius: Range = (5.0, 20.0)
    """Smallest and largest mean radius of a nucleus in pixels (log-uniform between)."""
    coverage: float = 0.3
    """Fraction of the image the nuclei would cover if none overlapped."""
    clustered: float = 0.5
    """Fraction of nuclei placed touching another, in clusters."""
    overlap: float = 0.15
    """How far two nuclei may press into each other, as a fraction of their radii's sum."""
    elongation: float = 1.5
    """Largest ratio of a nucleus's long axis to its short one."""
    roughness: float = 0.05
    """Amplitude of the outline's bumps, as a fraction of the radius."""
    texture: float = 0.2
    """Chromatin texture: relative amplitude of fine intensity variation inside nuclei."""
    nucleoli: float = 1.0
    """Mean number of nucleoli (dark or bright spots) per nucleus."""
    spread: float = 0.25
    """Log-normal spread of nucleus brightness."""
    dim: float = 0.1
    """Fraction of nuclei stained 2-4 times dimmer than the rest."""
    uneven: float = 0.2
    """Slow multiplicative variation of staining and illumination across the image."""
    background: float = 0.1
    """Background level."""
    gradient: float = 0.1
    """Linear background ramp across the image (its rise from one side to the other)."""
    blobs: float = 0.1
    """Peak of out-of-focus background blobs (cytoplasm, cells above or below the plane)."""
    debris: float = 0.5
    """Bright specks per 10,000 pixels (not nuclei: unlabelled)."""
    blur: float = 1.0
    """Gaussian point-spread sigma in pixels."""
    noise: Noise = "mixed"
    """``poisson`` (shot noise), ``gaussian`` (additive) or ``mixed`` (both)."""
    photons: float = 200.0
    """Photons collected at the median nucleus (``poisson``/``mixed``)."""
    read_noise: float = 0.02
    """Additive Gaussian noise sigma (``gaussian``/``mixed``)."""


@dataclass(frozen=True)
class StyleRanges:
    """The distribution of `Style`: each field a (low, high) range drawn uniformly
    (``radius``, ``photons`` log-uniformly), ``noise`` a choice."""

    radius: Range = (5.0, 20.0)
    """Radii of the whole set; one image holds a sub-range of 1.3-2.5×."""
    coverage: Range = (0.08, 0.45)
    clustered: Range = (0.0, 0.8)
    overlap: Range = (0.0, 0.25)
    elongation: Range = (1.0, 1.8)
    roughness: Range = (0.0, 0.1)
    texture: Range = (0.0, 0.35)
    nucleoli: Range = (0.0, 2.0)
    spread: Range = (0.1, 0.45)
    dim: Range = (0.0, 0.3)
    uneven: Range = (0.0, 0.4)
    background: Range = (0.0, 0.3)
    gradient: Range = (0.0, 0.2)
    blobs: Range = (0.0, 0.25)
    debris: Range = (0.0, 1.5)
    blur: Range = (0.3, 2.0)
    noise: tuple[Noise, ...] = ("poisson", "gaussian", "mixed")
    photons: Range = (8.0, 2000.0)
    read_noise: Range = (0.0, 0.08)


TRAIN = StyleRanges()
"""What the shipped models are trained on: radii over a 4× range (5-20 px)."""

HELD_OUT: dict[str, StyleRanges] = {
    "in-distribution": TRAIN,
    # nuclei up to 1.5× the largest trained on
    "large": replace(TRAIN, radius=(22.0, 30.0), coverage=(0.15, 0.45)),
    # nuclei 1.1-1.7× as bright as a background with blobs, which training never goes near
    "low-contrast": replace(
        TRAIN, background=(0.6, 0.9), blobs=(0.2, 0.4), uneven=(0.3, 0.5), photons=(300, 2000)
    ),
    # a quarter to three quarters of the fewest photons trained on, and more read noise
    "noisy": replace(TRAIN, noise=("mixed",), photons=(2.0, 6.0), read_noise=(0.08, 0.12)),
}
"""Held-out sets: the training distribution (new seeds), then one shift each in scale,
contrast and noise."""

HELD_OUT_SEED0 = 30_000
"""Image ``i`` of the ``k``-th held-out set has seed ``HELD_OUT_SEED0 + 1000 k + i``."""


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _log_uniform(rng: np.random.Generator, r: Range) -> float:
    return float(np.exp(rng.uniform(np.log(r[0]), np.log(r[1]))))


def sample_style(rng: np.random.Generator, ranges: StyleRanges = TRAIN) -> Style:
    """One image's `Style` drawn from ``ranges``.

    The image's own radius range is a random 1.3-2.5× slice of ``ranges.radius``
    (nuclei in one field of view are of similar size; across images they span
    the whole range).

    Examples
    --------
    >>> style = sample_style(np.random.default_rng(0))
    >>> 5.0 <= style.radius[0] <= style.radius[1] <= 20.0
    True
    """
    lo_all, hi_all = ranges.radius
    width = min(float(rng.uniform(1.3, 2.5)), hi_all / lo_all)
    lo = _log_uniform(rng, (lo_all, hi_all / width)) if hi_all / width > lo_all else lo_all
    values: dict[str, object] = {"radius": (lo, lo * width)}
    for f in fields(StyleRanges):
        if f.name == "radius":
            continue
        r = getattr(ranges, f.name)
        if f.name == "noise":
            values["noise"] = r[int(rng.integers(len(r)))]
        elif f.name == "photons":
            values["photons"] = _log_uniform(rng, r)
        else:
            values[f.name] = _uniform(rng, r)
    return Style(**values)  # type: ignore[arg-type]


# -- placement -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Nuclei:
    centers: NDArray[np.float64]  # (n, 2) rows, columns
    a: NDArray[np.float64]  # semi-axes along and across the orientation
    b: NDArray[np.float64]
    angle: NDArray[np.float64]
    harmonics: NDArray[np.float64]  # (n, _HARMONICS) amplitudes
    phases: NDArray[np.float64]


def _place(shape: tuple[int, int], style: Style, rng: np.random.Generator) -> _Nuclei:
    """Centres and outlines: clustered nuclei are put touching a placed one, the rest anywhere;
    a nucleus is kept only where it presses into no other beyond ``style.overlap``."""
    lo, hi = style.radius
    # E[r²] for log-uniform r
    mean_sq = (hi**2 - lo**2) / (2 * np.log(hi / lo)) if hi > lo else lo**2
    n = int(rng.poisson(style.coverage * shape[0] * shape[1] / (np.pi * mean_sq)))
    radii = np.sort(np.exp(rng.uniform(np.log(lo), np.log(hi), n)))[::-1]
    keep_dist = 1.0 - style.overlap
    margin = 0.5 * lo
    centers = np.empty((n, 2))
    kept = np.empty(n, np.float64)
    count = 0
    for r in radii:
        for _ in range(12):
            if count and rng.random() < style.clustered:
                j = int(rng.integers(count))
                direction = rng.uniform(0, 2 * np.pi)
                dist = (r + kept[j]) * rng.uniform(keep_dist, 1.0)
                c = centers[j] + dist * np.array([np.sin(direction), np.cos(direction)])
            else:
                c = rng.uniform(-margin, np.array(shape) + margin)
            if count:
                gaps = np.hypot(*(centers[:count] - c).T) - keep_dist * (kept[:count] + r)
                if gaps.min() < -1e-9:
                    continue
            centers[count], kept[count] = c, r
            count += 1
            break
    centers, kept = centers[:count], kept[:count]
    ratio = rng.uniform(1.0, style.elongation, count)
    amp = rng.uniform(0, style.roughness, (count, _HARMONICS)) / np.arange(1, _HARMONICS + 1)
    return _Nuclei(
        centers=centers,
        a=kept * np.sqrt(ratio),
        b=kept / np.sqrt(ratio),
        angle=rng.uniform(0, np.pi, count),
        harmonics=amp,
        phases=rng.uniform(0, 2 * np.pi, (count, _HARMONICS)),
    )


def _rasterise(
    shape: tuple[int, int], nuc: _Nuclei
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Per pixel: the nucleus whose outline it lies deepest inside (-1: none) and that depth
    ``d`` (0 at the centre, 1 on the outline; inf far from every nucleus)."""
    owner = np.full(shape[0] * shape[1], -1, np.int64)
    depth = np.full(shape[0] * shape[1], np.inf, np.float32)
    n = len(nuc.centers)
    if n == 0:
        return owner.reshape(shape), depth.reshape(shape)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 2)
    # no outline reaches beyond its long semi-axis times (1 + the sum of its bumps)
    reach = nuc.a * (1.0 + nuc.harmonics.sum(axis=1))
    k = min(_CANDIDATES, n)
    dist, cand = cKDTree(nuc.centers).query(grid, k=k, distance_upper_bound=float(reach.max()))
    dist, cand = dist.reshape(-1, k), cand.reshape(-1, k)
    near = np.isfinite(dist[:, 0])
    cand = np.where(np.isfinite(dist[near]), cand[near], n)  # n: a padding nucleus never inside
    pts = grid[near].astype(np.float32)

    def param(values: NDArray[np.float64], pad: float) -> NDArray[np.float32]:
        return np.append(values, pad).astype(np.float32)[cand]

    dy = pts[:, :1] - param(nuc.centers[:, 0], -1e4)
    dx = pts[:, 1:] - param(nuc.centers[:, 1], -1e4)
    cos, sin = param(np.cos(nuc.angle), 1.0), param(np.sin(nuc.angle), 0.0)
    u = (dy * cos + dx * sin) / param(nuc.a, 1e-6)
    v = (dx * cos - dy * sin) / param(nuc.b, 1e-6)
    rho = np.hypot(u, v)
    # the outline's bumps as powers of the unit direction, cheaper than trigonometry
    unit = (u + 1j * v) / np.maximum(rho, np.float32(1e-6))
    power = unit * unit
    outline = np.ones_like(rho)
    for h in range(_HARMONICS):
        coeff = nuc.harmonics[:, h] * np.exp(1j * nuc.phases[:, h])
        outline += (np.append(coeff, 0).astype(np.complex64)[cand] * power).real
        power = power * unit
    d = rho / outline
    best = np.argmin(d, axis=1)
    rows = np.arange(len(cand))
    d_best = d[rows, best]
    depth[near] = d_best
    owner[near] = np.where(d_best < 1.0, cand[rows, best], -1)
    return owner.reshape(shape), depth.reshape(shape)


# -- staining, optics, noise ---------------------------------------------------------------


def _smooth_noise(
    shape: tuple[int, int], sigma: float, rng: np.random.Generator
) -> NDArray[np.float32]:
    """Gaussian-filtered white noise scaled to unit standard deviation.

    Wide filters run on a coarser grid, then are interpolated up: the field is smooth
    on that grid's scale, so nothing visible is lost.
    """
    step = max(int(sigma // 3), 1)
    coarse = shape if step == 1 else tuple(-(-s // step) + 1 for s in shape)
    field = ndi.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma / step)
    if step > 1:
        field = ndi.zoom(field, step, order=1, grid_mode=False)[: shape[0], : shape[1]]
    sd = float(field.std())
    out: NDArray[np.float32] = field / np.float32(sd if sd > 0 else 1.0)
    return out


def _spots(
    shape: tuple[int, int],
    rows: NDArray[np.float64],
    cols: NDArray[np.float64],
    amplitude: NDArray[np.float64],
    sigma: float,
) -> NDArray[np.float32]:
    """Gaussian spots of peak ``amplitude`` and width ``sigma`` at (rows, cols)."""
    deltas = np.zeros(shape, np.float32)
    r = np.clip(np.round(rows).astype(int), 0, shape[0] - 1)
    c = np.clip(np.round(cols).astype(int), 0, shape[1] - 1)
    np.add.at(deltas, (r, c), amplitude.astype(np.float32))
    # a unit delta blurred by sigma peaks at 1 / (2 pi sigma²)
    out: NDArray[np.float32] = ndi.gaussian_filter(deltas, sigma) * np.float32(2 * np.pi * sigma**2)
    return out


def _stain(
    shape: tuple[int, int],
    style: Style,
    nuc: _Nuclei,
    owner: NDArray[np.int64],
    depth: NDArray[np.float32],
    rng: np.random.Generator,
) -> NDArray[np.float32]:
    """Fluorescence of the nuclei alone: brightness × edge fall-off × texture × nucleoli."""
    n = len(nuc.centers)
    brightness = np.exp(rng.normal(0.0, style.spread, n))
    brightness[rng.random(n) < style.dim] *= rng.uniform(0.25, 0.5)
    if n:
        brightness /= np.median(brightness)
    inside = owner >= 0
    falloff = rng.uniform(0.0, 0.4)  # 0: flat top; 0.4: 40 % dimmer at the rim
    level = np.append(brightness, 0.0).astype(np.float32)[owner]  # owner -1: the 0 appended
    signal = level * (1.0 - np.float32(falloff) * np.minimum(depth, 1.0) ** 2)
    if style.texture > 0:
        grain = _smooth_noise(shape, rng.uniform(0.7, 2.0), rng)
        signal *= np.maximum(1.0 + np.float32(style.texture) * grain, 0.0)
    counts = rng.poisson(style.nucleoli, n) if n else np.zeros(0, int)
    if counts.sum():
        which = np.repeat(np.arange(n), counts)
        reach = rng.uniform(0, 0.5, len(which))
        theta = rng.uniform(0, 2 * np.pi, len(which))
        rows = nuc.centers[which, 0] + reach * nuc.a[which] * np.sin(theta)
        cols = nuc.centers[which, 1] + reach * nuc.b[which] * np.cos(theta)
        # mostly dark nucleoli (as in DNA stains), some bright (chromocentres)
        sign = np.where(rng.random(len(which)) < 0.75, -1.0, 1.0)
        amp = sign * rng.uniform(0.3, 0.6, len(which))
        sigma = 0.18 * float(np.median(np.sqrt(nuc.a * nuc.b)))
        signal *= np.maximum(1.0 + _spots(shape, rows, cols, amp, sigma), 0.1)
    out: NDArray[np.float32] = signal * inside
    return out


def _backdrop(
    shape: tuple[int, int], style: Style, rng: np.random.Generator
) -> NDArray[np.float32]:
    """Background level, linear ramp, out-of-focus blobs and debris specks."""
    rows, cols = np.meshgrid(
        *(np.linspace(-0.5, 0.5, s, dtype=np.float32) for s in shape), indexing="ij"
    )
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(style.gradient) * (
        rows * np.float32(np.sin(theta)) + cols * np.float32(np.cos(theta))
    )
    back = np.float32(style.background) + ramp + np.float32(style.gradient / 2)
    if style.blobs > 0:
        scale = rng.uniform(0.05, 0.15) * max(shape)
        blobs = np.maximum(_smooth_noise(shape, scale, rng), 0.0)
        back = back + np.float32(style.blobs / max(float(blobs.max()), 1e-6)) * blobs
    n_debris = int(rng.poisson(style.debris * shape[0] * shape[1] / 1e4))
    if n_debris:
        for sigma, share in ((0.8, 0.6), (2.0, 0.4)):
            m = round(n_debris * share)
            back = back + _spots(
                shape,
                rng.uniform(0, shape[0], m),
                rng.uniform(0, shape[1], m),
                np.exp(rng.uniform(np.log(0.3), np.log(3.0), m)),
                sigma,
            )
    out: NDArray[np.float32] = back.astype(np.float32)
    return out


def _camera(
    light: NDArray[np.float32], style: Style, rng: np.random.Generator
) -> NDArray[np.uint16]:
    """Photon and read noise, then a camera's offset and gain, as uint16."""
    light = np.maximum(light, 0.0)
    if style.noise in ("poisson", "mixed"):
        counts = rng.poisson(light * np.float32(style.photons)).astype(np.float32)
        scale = float(style.photons)
    else:
        counts = light * np.float32(1000.0)
        scale = 1000.0
    if style.noise in ("gaussian", "mixed"):
        counts += rng.normal(0.0, style.read_noise * scale, light.shape).astype(np.float32)
    gain = rng.uniform(1.0, 8.0)
    # the gain keeps a bright image inside uint16: 3× the median nucleus at most reaches 60000
    gain = min(gain, 20000.0 / scale)
    return np.clip(500.0 + gain * counts, 0, 65535).astype(np.uint16)


def nuclei(
    shape: Sequence[int],
    *,
    seed: int,
    style: Style | None = None,
    ranges: StyleRanges = TRAIN,
) -> tuple[NDArray[np.uint16], NDArray[np.uint32]]:
    """A synthetic fluorescence image of nuclei and its ground-truth instances.

    Parameters
    ----------
    shape : (2,) sequence of int
        Rows and columns.
    seed : int
        Decides everything: the same seed (and style or ranges) gives the same image.
    style : Style, optional
        How the image looks; by default drawn from ``ranges`` with the seed.
    ranges : StyleRanges
        The distribution ``style`` is drawn from when not given.

    Returns
    -------
    image : (M, N) ndarray of uint16
        Camera counts (offset 500).
    labels : (M, N) ndarray of uint32
        Nucleus ids 1..K in no particular order, 0 background; debris is background.

    Examples
    --------
    >>> image, labels = nuclei((64, 64), seed=1)
    >>> image.shape, image.dtype, labels.dtype
    ((64, 64), dtype('uint16'), dtype('uint32'))
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"Expected a 2D shape of positive sizes, got {tuple(shape)} instead.")
    size = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    if style is None:
        style = sample_style(rng, ranges)
    nuc = _place(size, style, rng)
    owner, depth = _rasterise(size, nuc)
    signal = _stain(size, style, nuc, owner, depth, rng)
    light = signal + _backdrop(size, style, rng)
    if style.uneven > 0:
        light *= np.exp(np.float32(style.uneven) * _smooth_noise(size, 0.25 * max(size), rng))
    if style.blur > 0:
        light = ndi.gaussian_filter(light, style.blur)
    image = _camera(light, style, rng)
    ids = np.unique(owner[owner >= 0])
    lut = np.zeros(len(nuc.centers) + 1, np.uint32)
    lut[ids + 1] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return image, lut[owner + 1]


def held_out_set(
    name: str, n: int, shape: Sequence[int] = (384, 384)
) -> list[tuple[NDArray[np.uint16], NDArray[np.uint32]]]:
    """The first ``n`` images of the held-out set ``name`` (a key of `HELD_OUT`), with truth.

    Their seeds lie below `segpipe.deep.data.TRAIN_SEED_MIN`, so training never drew them.
    """
    if name not in HELD_OUT:
        raise ValueError(f"Expected a held-out set among {sorted(HELD_OUT)}, got {name!r} instead.")
    k = list(HELD_OUT).index(name)
    return [
        nuclei(shape, seed=HELD_OUT_SEED0 + 1000 * k + i, ranges=HELD_OUT[name]) for i in range(n)
    ]

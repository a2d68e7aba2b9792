"""Compiled kernels that give bit-identical results to SciPy/NumPy, faster.

- `gaussian`: ``scipy.ndimage.gaussian_filter(x, sigma, mode="nearest",
  truncate=4)`` on float32, as scikit-image's ``filters.gaussian`` calls it.
  The same weights, the same per-pixel order of double-precision operations
  (SciPy's symmetric-kernel loop: centre, then pairs from the outermost in),
  float32 between axes: the same bits, so thresholds of the whole image stay
  exact. Vectorised across lines, or along a padded line for the last axis.
- `histogram`: ``np.histogram(x, bins, range=(lo, hi))`` counts for float32
  or float64 data in one pass (a first guess of the bin, then the bin whose
  edges hold the value, as NumPy's edge corrections give).

- `panoptic` and `object_stats`: the panoptic encoding and per-object sums of a
  block of local labels in one sweep each (no sort, no temporaries per pixel);
  `lookup`: a block's local ids through its lookup table.

All release the GIL, so a Dask worker's threads run them in parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray


def gaussian_weights(sigma: float, radius: int) -> NDArray[np.float64]:
    """SciPy's Gaussian kernel (``_gaussian_kernel1d``, order 0), computed the same way."""
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    out: NDArray[np.float64] = phi / phi.sum()
    return out


@numba.njit(cache=True, nogil=True)
def _along_middle(src, dst, w, r):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # Axis 1 of (pre, n, post): whole rows of `post` values at a time, so the inner
    # loop runs over contiguous memory; nearest-edge extension by clamping.
    pre, n, post = src.shape
    acc = np.empty(post, np.float64)
    for p in range(pre):
        for i in range(n):
            for c in range(post):
                acc[c] = np.float64(src[p, i, c]) * w[r]
            for k in range(r, 0, -1):
                a = max(i - k, 0)
                b = min(i + k, n - 1)
                wk = w[r - k]
                for c in range(post):
                    acc[c] += (np.float64(src[p, a, c]) + np.float64(src[p, b, c])) * wk
            for c in range(post):
                dst[p, i, c] = np.float32(acc[c])


@numba.njit(cache=True, nogil=True)
def _along_last(src, dst, w, r):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # The last (contiguous) axis, a line at a time: the line is copied as float64 into a
    # buffer padded with `r` copies of its edge values (nearest), so each tap is two
    # shifted contiguous views and the loop over positions vectorises; four taps a sweep
    # (in the same order) so the accumulator is loaded and stored a quarter as often.
    rows, n = src.shape
    pad = np.empty(n + 2 * r, np.float64)
    acc = np.empty(n, np.float64)
    for i in range(rows):
        for c in range(r):
            pad[c] = src[i, 0]
            pad[n + r + c] = src[i, n - 1]
        for c in range(n):
            pad[r + c] = src[i, c]
        mid = pad[r : r + n]
        for c in range(n):
            acc[c] = mid[c] * w[r]
        k = r
        while k >= 4:
            w0, w1, w2, w3 = w[r - k], w[r - k + 1], w[r - k + 2], w[r - k + 3]
            l0, h0 = pad[r - k :], pad[r + k :]
            l1, h1 = pad[r - k + 1 :], pad[r + k - 1 :]
            l2, h2 = pad[r - k + 2 :], pad[r + k - 2 :]
            l3, h3 = pad[r - k + 3 :], pad[r + k - 3 :]
            for c in range(n):
                t = acc[c]
                t += (l0[c] + h0[c]) * w0
                t += (l1[c] + h1[c]) * w1
                t += (l2[c] + h2[c]) * w2
                t += (l3[c] + h3[c]) * w3
                acc[c] = t
            k -= 4
        while k >= 1:
            wk = w[r - k]
            lo, hi = pad[r - k :], pad[r + k :]
            for c in range(n):
                acc[c] += (lo[c] + hi[c]) * wk
            k -= 1
        for c in range(n):
            dst[i, c] = np.float32(acc[c])


def gaussian(
    image: NDArray[np.float32], sigma: float | Sequence[float], truncate: float = 4.0
) -> NDArray[np.float32]:
    """Gaussian smoothing of a float32 array, bit-identical to SciPy's ``mode="nearest"``.

    Parameters
    ----------
    image : ndarray of float32
        Any number of dimensions.
    sigma : float or sequence of float
        Standard deviation per axis (one value for all); axes with 0 are left alone.
    truncate : float
        Radius in standard deviations, as SciPy's ``truncate``.

    Returns
    -------
    ndarray of float32
        A new array of the same shape.
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    sigmas = [float(sigma)] * data.ndim if np.isscalar(sigma) else [float(s) for s in sigma]  # type: ignore[arg-type, union-attr]
    if len(sigmas) != data.ndim:
        raise ValueError(f"Expected {data.ndim} sigmas, got {len(sigmas)} instead.")
    out = data  # read by the first pass, never written
    for axis, s in enumerate(sigmas):
        if s <= 1e-15:  # as SciPy: such an axis is skipped
            continue
        r = int(truncate * s + 0.5)
        w = gaussian_weights(s, r)
        shape = data.shape
        dst = np.empty_like(out)
        if axis == data.ndim - 1:
            _along_last(out.reshape(-1, shape[-1]), dst.reshape(-1, shape[-1]), w, r)
        else:
            pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1 :]))
            view = (pre, shape[axis], post)
            _along_middle(out.reshape(view), dst.reshape(view), w, r)
        out = dst
    return data.copy() if out is data else out


@numba.njit(cache=True, nogil=True)
def _histogram(flat, lo, hi, scale, edges, counts):  # type: ignore[no-untyped-def]  # pragma: no cover
    # A first guess by multiplication (NumPy divides), then moved to the bin whose
    # edges hold x: NumPy's answer too, as its guess is within one bin and its
    # correction moves one bin. Four sets of counts, by pixel, so that runs of one
    # bin do not wait on their own increments: 2.7 against 4.1 ns/px.
    nbins = counts.shape[1]
    for j in range(flat.shape[0]):
        x = flat[j]
        if not (x >= lo and x <= hi):  # outside the range, or NaN: not counted
            continue
        i = min(int((x - lo) * scale), nbins - 1)
        while i > 0 and x < edges[i]:
            i -= 1
        while i < nbins - 1 and x >= edges[i + 1]:
            i += 1
        counts[j & 3, i] += 1


def histogram(
    data: NDArray[np.floating[Any]],
    lo: np.floating[Any],
    hi: np.floating[Any],
    edges: NDArray[np.floating[Any]],
) -> tuple[NDArray[np.int64], float]:
    """``np.histogram(data, len(edges) - 1, range=(lo, hi))`` counts, and the float64 sum.

    ``edges`` must be ``np.linspace(lo, hi, nbins + 1)`` in float32 or float64, strictly
    increasing, as NumPy computes them; the data are taken in the edges' dtype.
    """
    kind = edges.dtype.type
    counts = np.zeros((4, len(edges) - 1), np.int64)
    flat = np.ascontiguousarray(data, dtype=edges.dtype).reshape(-1)
    scale = kind(len(edges) - 1) / (kind(hi) - kind(lo))
    _histogram(flat, kind(lo), kind(hi), scale, edges, counts)
    return counts.sum(axis=0), float(flat.sum(dtype=np.float64))


# -- label passes: one sweep over a block, no sort ------------------------------------


@numba.njit(cache=True, nogil=True)
def _lookup(index, table, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    n = table.shape[0]
    for j in range(index.shape[0]):
        i = index[j]
        if i >= n:
            return False
        out[j] = table[i]
    return True


def lookup(index: NDArray[np.unsignedinteger], table: NDArray[Any]) -> NDArray[Any]:
    """``table[index]`` for unsigned ``index`` (NumPy first widens every index to intp:
    2.9 against ~0.7 ns/px for uint32 block labels).

    Raises
    ------
    IndexError
        If an index is ``len(table)`` or more.
    """
    flat = np.ascontiguousarray(index).reshape(-1)
    out = np.empty(index.shape, table.dtype)
    if not _lookup(flat, np.ascontiguousarray(table), out.reshape(-1)):
        raise IndexError(f"index {int(flat.max())} is out of bounds for a table of {len(table)}")
    return out


@numba.njit(cache=True, nogil=True)
def _panoptic(sem, inst, divisor, thing, known, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    unassigned = 0
    for j in range(sem.shape[0]):
        c = sem[j]
        if not known[c]:
            return -1
        v = np.uint64(c) * divisor
        if thing[c]:
            i = np.uint64(inst[j])
            if i == 0:
                unassigned += 1
            v += i
        out[j] = v
    return unassigned


def panoptic(
    semantic: NDArray[np.uint8],
    instances: NDArray[np.unsignedinteger],
    divisor: int,
    thing: NDArray[np.bool_],
    known: NDArray[np.bool_],
) -> tuple[NDArray[np.uint64], int] | None:
    """``class * divisor + instance`` (instance 0 where the class is not a thing) and the
    count of thing pixels without an instance; None if a class is not ``known``.

    ``thing`` and ``known`` are 256-entry lookup tables; every instance id must be below
    ``divisor`` (not checked).
    """
    out = np.empty(semantic.shape, np.uint64)
    sem = np.ascontiguousarray(semantic, dtype=np.uint8).reshape(-1)
    inst = np.ascontiguousarray(instances).reshape(-1)
    bad = _panoptic(sem, inst, np.uint64(divisor), thing, known, out.reshape(-1))
    return None if bad < 0 else (out, int(bad))


@numba.njit(cache=True, nogil=True)
def _object_stats(local, sem, image, cls, count, csum, lo, hi, isum, imin, imax):  # type: ignore[no-untyped-def]  # pragma: no cover
    # Row l >= 1 of the accumulators: local object l; row n + 1 + k: background of class k.
    # Runs of equal (id, class) along a row share the count, coordinate and box updates;
    # intensities are still added pixel by pixel, in the same order as a plain sweep.
    n = cls.shape[0] - 257
    planes, rows, cols = local.shape
    for p in range(planes):
        for r in range(rows):
            c = 0
            while c < cols:
                k = np.int64(sem[p, r, c])
                lab = np.int64(local[p, r, c])
                e = c + 1
                while (
                    e < cols and local[p, r, e] == local[p, r, c] and sem[p, r, e] == sem[p, r, c]
                ):
                    e += 1
                if lab == 0:
                    lab = n + 1 + k
                elif cls[lab] < 0:
                    cls[lab] = k
                elif cls[lab] != k:
                    return False  # an object of several classes: the caller sorts instead
                run = e - c
                count[lab] += run
                csum[lab, 0] += p * run
                csum[lab, 1] += r * run
                csum[lab, 2] += (c + e - 1) * run // 2
                lo[lab, 0] = min(lo[lab, 0], p)
                lo[lab, 1] = min(lo[lab, 1], r)
                lo[lab, 2] = min(lo[lab, 2], c)
                hi[lab, 0] = max(hi[lab, 0], p)
                hi[lab, 1] = max(hi[lab, 1], r)
                hi[lab, 2] = max(hi[lab, 2], e - 1)
                s = isum[lab]
                mn = imin[lab]
                mx = imax[lab]
                for j in range(c, e):
                    v = np.float64(image[p, r, j])
                    s += v
                    mn = min(mn, v)
                    mx = max(mx, v)
                isum[lab] = s
                imin[lab] = mn
                imax[lab] = mx
                c = e
    return True


def object_stats(
    local: NDArray[np.unsignedinteger],
    semantic: NDArray[np.uint8],
    image: NDArray[Any],
    n: int,
) -> dict[str, NDArray[Any]] | None:
    """Per-object sums of one block in one sweep, for local ids ``1..n`` (0: background).

    Returns arrays with one row per local id and then one per background class
    (row ``n + 1 + k``): ``cls`` (-1 where absent), ``count``, ``csum``, ``lo``, ``hi``
    (per axis, in block coordinates), ``isum``, ``imin``, ``imax``. None when an object
    has pixels of more than one class (the caller falls back to a sort by key).
    """
    ndim = local.ndim
    shape3 = (1,) * (3 - ndim) + local.shape
    rows = n + 1 + 256
    acc: dict[str, NDArray[Any]] = {
        "cls": np.full(rows, -1, np.int64),
        "count": np.zeros(rows, np.int64),
        "csum": np.zeros((rows, 3), np.int64),
        "lo": np.full((rows, 3), np.iinfo(np.int64).max, np.int64),
        "hi": np.full((rows, 3), -1, np.int64),
        "isum": np.zeros(rows, np.float64),
        "imin": np.full(rows, np.inf),
        "imax": np.full(rows, -np.inf),
    }
    ok = _object_stats(
        np.ascontiguousarray(local).reshape(shape3),
        np.ascontiguousarray(semantic, dtype=np.uint8).reshape(shape3),
        np.ascontiguousarray(image).reshape(shape3),
        *acc.values(),
    )
    if not ok:
        return None
    acc["cls"][n + 1 :] = np.where(acc["count"][n + 1 :] > 0, np.arange(256), -1)
    for key in ("csum", "lo", "hi"):
        acc[key] = acc[key][:, 3 - ndim :]
    return acc


@numba.njit(cache=True, nogil=True)
def _outlined(grey, labels, table, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    m, n = labels.shape
    for i in range(m):
        for j in range(n):
            v = labels[i, j]
            edge = v > 0 and (
                (i > 0 and labels[i - 1, j] != v)
                or (i < m - 1 and labels[i + 1, j] != v)
                or (j > 0 and labels[i, j - 1] != v)
                or (j < n - 1 and labels[i, j + 1] != v)
            )
            out[i, j] = table[v] if edge else grey[i, j]


def outlined(
    grey: NDArray[np.uint8], labels: NDArray[np.integer], table: NDArray[np.uint8]
) -> NDArray[np.uint8]:
    """``grey`` with each object's inner boundary (a pixel of id > 0 with a 4-neighbour
    of another value) set to ``table[id]``: the palette indices `segpipe.preview.indexed`
    paints, in one sweep.

    Parameters
    ----------
    grey : (M, N) ndarray of uint8
    labels : (M, N) ndarray of int
    table : (K,) ndarray of uint8
        A value for every id up to ``labels.max()``.

    Returns
    -------
    (M, N) ndarray of uint8
    """
    out = np.empty(labels.shape, np.uint8)
    _outlined(np.ascontiguousarray(grey), np.ascontiguousarray(labels), table, out)
    return out

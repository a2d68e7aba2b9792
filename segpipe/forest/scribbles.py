"""Brush strokes drawn on a ground truth, as a person annotates for a pixel classifier.

Each stroke starts inside one class, away from its edge, runs straight in a random
direction for a random length and stops before it would leave the class; strokes are
drawn until the wanted fraction of the image is covered, the classes taking turns (the
last stroke of a class stops where its share is reached).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

__all__ = ["strokes"]


def strokes(
    truth: NDArray[np.integer],
    *,
    fraction: float = 0.02,
    classes: Sequence[int] | None = None,
    width: int = 3,
    length: tuple[int, int] = (8, 40),
    seed: int = 0,
) -> NDArray[np.uint8]:
    """Scribbles over ``fraction`` of the pixels: 0 unlabelled, else the class of ``truth``.

    Parameters
    ----------
    truth : (M, N[, P]) ndarray of int
        A class per pixel (values 1..255; others are never scribbled).
    fraction : float
        Share of the image to cover, about evenly split between the classes.
    classes : sequence of int, optional
        Which classes to scribble; default every value > 0 in ``truth``.
    width : int
        Brush width in pixels (odd).
    length : (int, int)
        Shortest and longest stroke, in pixels.
    seed : int
        Decides the strokes.

    Returns
    -------
    (M, N[, P]) ndarray of uint8

    Examples
    --------
    >>> truth = np.ones((64, 64), np.uint8); truth[16:48, 16:48] = 2
    >>> s = strokes(truth, fraction=0.05, seed=1)
    >>> bool(0.04 < (s > 0).mean() < 0.07), bool(np.all(s[s > 0] == truth[s > 0]))
    (True, True)
    """
    rng = np.random.default_rng(seed)
    ndim = truth.ndim
    out = np.zeros(truth.shape, np.uint8)
    wanted = fraction * truth.size
    chosen = [int(c) for c in (classes if classes is not None else np.unique(truth)) if c > 0]
    radius = width // 2
    brush = np.ones((2 * radius + 1,) * ndim, bool)
    # where a brush centred there stays inside its class
    inside = {
        c: ndi.binary_erosion(truth == c, brush, border_value=0) if radius else truth == c
        for c in chosen
    }
    starts = {c: np.argwhere(m) for c, m in inside.items()}
    chosen = [c for c in chosen if len(starts[c])]
    per_class = {c: wanted / max(len(chosen), 1) for c in chosen}
    done = dict.fromkeys(chosen, 0)
    attempts = 0
    while chosen and attempts < 100 * max(1, int(wanted)):
        attempts += 1
        c = min(chosen, key=lambda k: done[k] / per_class[k])
        if done[c] >= per_class[c]:
            break
        p = starts[c][rng.integers(len(starts[c]))].astype(np.float64)
        step = rng.normal(size=ndim)
        step /= np.linalg.norm(step) or 1.0
        for _ in range(int(rng.integers(length[0], length[1] + 1))):
            q = np.round(p).astype(int)
            if done[c] >= per_class[c]:
                break
            if np.any(q < 0) or np.any(q >= truth.shape) or not inside[c][tuple(q)]:
                break
            box = tuple(slice(max(v - radius, 0), v + radius + 1) for v in q)
            before = int(np.count_nonzero(out[box]))
            out[box] = c
            done[c] += int(np.count_nonzero(out[box])) - before
            p += step
    return out

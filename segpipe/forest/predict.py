"""Compiled inference of a `ForestModel`: scikit-learn's ``predict``, bit for bit.

For each chunk of pixels, every tree is walked for every pixel of the chunk still
undecided (the chunk's features and the tree stay in cache), each leaf's normalised
class fractions added in tree order in float64; the sum divided by the number of trees
and its first largest class taken, as ``RandomForestClassifier.predict`` does with
``n_jobs=1``. A pixel whose leading class is ahead of every other by more than the trees
left could add (each adds at most 1) is decided: its class is final, so the rest of the
trees are skipped for it (unless the probability of the thing classes is wanted too).
No temporary per tree, no Python per node.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from segpipe.forest.model import ForestModel

__all__ = ["CHUNK", "MARGIN", "predict", "predict_things"]

CHUNK = 2048
"""Pixels walked through all the trees together."""


MARGIN = 1e-9
"""Slack on the lead that decides a pixel early: far above the rounding of a float64 sum of
a few thousand fractions (< 1e-12), far below any real difference of votes."""


@numba.njit(cache=True, nogil=True)
def _predict(x, feature, threshold, left, right, proba, roots, ids, classes, thing, share):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    # share: empty, or one float32 per pixel for the summed probability of the classes
    # `thing` marks (then every tree votes for every pixel)
    early = share.shape[0] == 0
    n = x.shape[1]
    n_classes = proba.shape[1]
    n_trees = roots.shape[0] - 1
    acc = np.zeros((CHUNK, n_classes), np.float64)
    active = np.empty(CHUNK, np.int64)
    for start in range(0, n, CHUNK):
        m = min(start + CHUNK, n) - start
        acc[:m] = 0.0
        for k in range(m):
            active[k] = k
        n_active = m
        for t in range(n_trees):
            root = roots[t]
            for k in range(n_active):
                i = active[k]
                node = root
                while left[node] >= 0:
                    if x[feature[node], start + i] <= threshold[node]:
                        node = left[node]
                    else:
                        node = right[node]
                for c in range(n_classes):
                    acc[i, c] += proba[node, c]
            left_over = n_trees - 1 - t
            if not early or 2 * (t + 1) <= n_trees:
                continue  # no pixel can be decided before half the trees have voted
            kept = 0
            for k in range(n_active):
                i = active[k]
                best = 0
                for c in range(1, n_classes):
                    if acc[i, c] > acc[i, best]:
                        best = c
                second = -1.0
                for c in range(n_classes):
                    if c != best and acc[i, c] > second:
                        second = acc[i, c]
                if acc[i, best] - second <= left_over + MARGIN:
                    active[kept] = i
                    kept += 1
            n_active = kept
            if n_active == 0:
                break
        for i in range(m):
            best = 0
            top = acc[i, 0] / n_trees
            for c in range(1, n_classes):
                p = acc[i, c] / n_trees
                if p > top:
                    top = p
                    best = c
            classes[start + i] = ids[best]
            if not early:
                total = 0.0
                for c in range(n_classes):
                    if thing[c]:
                        total += acc[i, c] / n_trees
                share[start + i] = total


def predict(model: ForestModel, x: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Classify every pixel of a feature stack.

    Parameters
    ----------
    model : ForestModel
        The forest.
    x : (F, M, N[, P]) ndarray of float32
        Features in the model's column order (`segpipe.features.compute` of
        ``model.bank``).

    Returns
    -------
    (M, N[, P]) ndarray of uint8
        The class id of every pixel.
    """
    return _run(model, x, things=False)[0]


def predict_things(
    model: ForestModel, x: NDArray[np.float32]
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """`predict`, and the probability of the thing classes (the mean over all trees of
    their summed fractions) of every pixel."""
    classes, share = _run(model, x, things=True)
    assert share is not None
    return classes, share


def _run(
    model: ForestModel, x: NDArray[np.float32], *, things: bool
) -> tuple[NDArray[np.uint8], NDArray[np.float32] | None]:
    n_features = len(model.meta.features)
    if x.shape[0] != n_features or x.dtype != np.float32:
        raise ValueError(
            f"Expected float32 features of shape ({n_features}, ...), got {x.dtype} "
            f"{x.shape} instead."
        )
    shape = x.shape[1:]
    flat = np.ascontiguousarray(x).reshape(n_features, -1)
    ids = np.asarray(model.meta.classes, np.uint8)
    classes = np.empty(flat.shape[1], np.uint8)
    thing_ids = {c.id for c in model.meta.catalogue if c.thing}
    thing = np.array([c in thing_ids for c in model.meta.classes], np.bool_)
    share = np.empty(flat.shape[1] if things else 0, np.float32)
    _predict(
        flat,
        model.feature,
        model.threshold,
        model.left,
        model.right,
        model.proba_table(),
        model.roots,
        ids,
        classes,
        thing,
        share,
    )
    return classes.reshape(shape), share.reshape(shape) if things else None

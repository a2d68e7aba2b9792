"""Stitching block-local labels into global, consecutive instance ids.

Stages, each a pure NumPy function: per block, a *view* of its labels toward
each neighbour (`face_view` or `overlap_view`); per neighbour pair, *edges*
between local ids (`face_edges`: touching pixels, exact for connected
components; `overlap_edges`: IoU > 0.5 in the shared halo window, for
segmenters that split touching objects); for the image, `global_ids` joins
the edges (connected components of the id graph) into a lookup table.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from segpipe.blocks import Block

Direction = tuple[int, ...]
Edges = NDArray[np.int64]  # (n, 2) pairs of local ids: (id in block a, id in block b)


def sequential_core(
    labels: NDArray[np.integer], core: tuple[slice, ...], *, sequential: bool = False
) -> tuple[NDArray[np.uint32], NDArray[np.uint32], int]:
    """Renumber the objects present in ``labels[core]`` as 1..k (in id order).

    Returns the mapped core, the mapped full array (objects absent from the
    core become 0) and k. ``sequential``: the caller knows ``labels`` holds
    exactly the ids 1..max; with no halo around the core that is the answer
    (the check would count every id, ~3 ns/px).
    """
    inner = labels[core]
    top = int(labels.max(initial=0))
    if sequential and inner.shape == labels.shape and top < 2**32:
        same = labels.astype(np.uint32, copy=False)
        return same, same, top
    if top > 4 * labels.size:  # sparse ids: sort instead of counting
        ids = np.unique(inner)
        ids = ids[ids > 0]
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    else:
        present = np.bincount(inner.ravel(), minlength=top + 1) > 0
        present[0] = False
        count = int(np.count_nonzero(present))
        if count == top and inner.shape == labels.shape:
            # Already 1..k over the whole block (connected components with no halo).
            same = labels.astype(np.uint32, copy=False)
            return same, same, count
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[present] = np.arange(1, count + 1, dtype=np.uint32)
    full = lut[labels]
    return full[core], full, int(lut.max(initial=0))


def _face_region(shape: Sequence[int], d: Direction) -> tuple[slice, ...]:
    return tuple(
        slice(n - 1, n) if k > 0 else slice(0, 1) if k < 0 else slice(0, n)
        for n, k in zip(shape, d, strict=True)
    )


def face_view(
    labels: NDArray[np.uint32], semantic: NDArray[np.uint8], d: Direction
) -> tuple[NDArray[np.uint32], NDArray[np.uint8]]:
    """The one-pixel slab of a block's core labels (and classes) facing direction ``d``."""
    region = _face_region(labels.shape, d)
    return labels[region].copy(), semantic[region].copy()


def face_edges(
    a: tuple[NDArray[np.uint32], NDArray[np.uint8]],
    b: tuple[NDArray[np.uint32], NDArray[np.uint8]],
    d: Direction,
) -> Edges:
    """Pairs of ids of touching pixels (full connectivity) of the same class across a face.

    ``a`` is block A's view toward ``d``, ``b`` block B's (= A + d) toward ``-d``.
    """
    (la, sa), (lb, sb) = a, b
    free = [k for k, x in enumerate(d) if x == 0]
    found = []
    for shift in itertools.product((-1, 0, 1), repeat=len(free)):
        ia: list[slice] = [slice(None)] * la.ndim
        ib: list[slice] = [slice(None)] * la.ndim
        for k, s in zip(free, shift, strict=True):
            ia[k] = slice(0, la.shape[k] - s) if s > 0 else slice(-s, la.shape[k])
            ib[k] = slice(s, lb.shape[k]) if s > 0 else slice(0, lb.shape[k] + s)
        xa, xb = la[tuple(ia)], lb[tuple(ib)]
        keep = (xa > 0) & (xb > 0) & (sa[tuple(ia)] == sb[tuple(ib)])
        if keep.any():
            found.append(np.stack([xa[keep], xb[keep]], axis=1))
    if not found:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def overlap_window(a: Block, b: Block, halo: Sequence[int]) -> tuple[slice, ...]:
    """Global window around the contact of blocks ``a`` and ``b`` that both read."""
    out = []
    for ca, cb, ra, rb, h in zip(a.core, b.core, a.read, b.read, halo, strict=True):
        if ca == cb:
            out.append(ca)
            continue
        edge = ca.stop if cb.start >= ca.stop else ca.start
        lo, hi = max(edge - h, ra.start, rb.start), min(edge + h, ra.stop, rb.stop)
        out.append(slice(lo, hi))
    return tuple(out)


def _box_mask(window: tuple[slice, ...], box: tuple[slice, ...]) -> NDArray[np.bool_]:
    axes = [
        (np.arange(w.start, w.stop) >= b.start) & (np.arange(w.start, w.stop) < b.stop)
        for w, b in zip(window, box, strict=True)
    ]
    mask = axes[0]
    for ax in axes[1:]:
        mask = np.multiply.outer(mask, ax)
    return mask


def overlap_view(
    full: NDArray[np.uint32], block: Block, other: Block, halo: Sequence[int]
) -> NDArray[np.uint32]:
    """Block's own view (core ids, 0 elsewhere) of the window it shares with ``other``.

    ``full`` is the block's labels over its read region, renumbered so that
    ids of objects absent from its core are 0.
    """
    window = overlap_window(block, other, halo)
    local = tuple(
        slice(w.start - r.start, w.stop - r.start) for w, r in zip(window, block.read, strict=True)
    )
    view = full[local].copy()
    view[~(_box_mask(window, block.core) | _box_mask(window, other.core))] = 0
    return view


def overlap_edges(va: NDArray[np.uint32], vb: NDArray[np.uint32], *, iou: float = 0.5) -> Edges:
    """Pairs (id in A, id in B) whose regions in the shared window have IoU > ``iou``."""
    both = (va > 0) & (vb > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    pairs, inter = np.unique(
        np.stack([va[both], vb[both]], axis=1).astype(np.int64), axis=0, return_counts=True
    )
    size_a = np.bincount(va.ravel())
    size_b = np.bincount(vb.ravel())
    union = size_a[pairs[:, 0]] + size_b[pairs[:, 1]] - inter
    keep: NDArray[np.int64] = pairs[inter / union > iou]
    return keep


@dataclass(frozen=True)
class GlobalIds:
    """Lookup from (block, local id) to global id; ids consecutive from 1."""

    offsets: NDArray[np.int64]  # provisional id of (block b, local 1) is offsets[b]
    final: NDArray[np.int64]  # global id per provisional id (0-based)
    count: int

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """uint32 while the ids fit, uint64 beyond."""
        return np.dtype(np.uint32 if self.count < 2**32 else np.uint64)

    def block_lut(self, block_id: int) -> NDArray[np.unsignedinteger]:
        """Local id → global id for one block (index 0 maps background to 0)."""
        lo, hi = self.offsets[block_id], self.offsets[block_id + 1]
        return np.concatenate([[0], self.final[lo:hi]]).astype(self.dtype)


def global_ids(counts: Sequence[int], edges: Sequence[tuple[int, int, Edges]]) -> GlobalIds:
    """Join block-local ids linked by ``edges`` into global consecutive ids.

    Parameters
    ----------
    counts : sequence of int
        Number of local ids (1..n) per block, in block-id order.
    edges : sequence of (block a, block b, (n, 2) array)
        Local-id pairs that are the same object.

    Notes
    -----
    Ids are numbered by the first (block id, local id) of each object, so the
    result does not depend on the order blocks finished in.
    """
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
    n = int(offsets[-1])
    if n == 0:
        return GlobalIds(offsets, np.zeros(0, np.int64), 0)
    u = [offsets[a] + e[:, 0] - 1 for a, _, e in edges if len(e)]
    v = [offsets[b] + e[:, 1] - 1 for _, b, e in edges if len(e)]
    if u:
        uu, vv = np.concatenate(u), np.concatenate(v)
        graph = coo_matrix((np.ones(len(uu), np.int8), (uu, vv)), shape=(n, n)).tocsr()
        ncomp, comp = connected_components(graph, directed=False)
        _, first = np.unique(comp, return_index=True)
        rank = np.empty(ncomp, np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(1, ncomp + 1)
        final = rank[comp]
    else:
        ncomp, final = n, np.arange(1, n + 1, dtype=np.int64)
    return GlobalIds(offsets, final, int(ncomp))

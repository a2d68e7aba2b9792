"""Stage stitch: links between the objects of neighbouring blocks, merged into global ids.

One task per row of blocks turns each block's views and those of its forward
neighbours (read from the segment markers) into links; they stream, in block
order, into `segpipe.merge.merge_ids`, a union-find bounded by a row of blocks
whose lookup tables go to scratch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import NDArray

from segpipe import merge, stitch
from segpipe.engine import Runner, imap_blocks
from segpipe.image import ImagePlan, ProgressFn, noop
from segpipe.io import storage, store
from segpipe.io.markers import Arrays, Markers, load_npz
from segpipe.io.storage import Location
from segpipe.stages.segment import Segmented, dkey

__all__ = ["block_links", "pair_edges", "row_links", "stitch_ids"]


def _view_keys(d: tuple[int, ...], mode: str) -> tuple[str, ...]:
    return (dkey(d) + "_l", dkey(d) + "_s") if mode == "faces" else (dkey(d) + "_v",)


def _views(marker: Location, directions: Sequence[tuple[int, ...]], mode: str) -> Arrays:
    """Only the views toward ``directions`` from a segment marker (an ``.npz`` reads
    the members asked for, not the other views and the provenance)."""
    with load_npz(marker) as data:
        return {k: data[k] for d in directions for k in _view_keys(d, mode)}


def _edges(va: Arrays, vb: Arrays, d: tuple[int, ...], mode: str) -> NDArray[np.int64]:
    back = tuple(-x for x in d)
    if mode == "faces":
        return stitch.face_edges(
            (va[dkey(d) + "_l"], va[dkey(d) + "_s"]),
            (vb[dkey(back) + "_l"], vb[dkey(back) + "_s"]),
            d,
        )
    return stitch.overlap_edges(va[dkey(d) + "_v"], vb[dkey(back) + "_v"])


def pair_edges(marker_dir: str, a: int, b: int, d: tuple[int, ...], mode: str) -> NDArray[np.int64]:
    """Links between the objects of blocks ``a`` and ``b`` = a + ``d``, from their markers."""
    markers = Markers(marker_dir)
    return _edges(markers.load(a), markers.load(b), d, mode)


def block_links(
    marker_dir: str, a: int, forward: Sequence[tuple[int, tuple[int, ...]]], mode: str
) -> list[NDArray[np.int64]]:
    """`pair_edges` of block ``a`` with each of its ``forward`` neighbours ``(b, d)``:
    one task per block; each marker is opened once and only the views used are read."""
    markers = Markers(marker_dir)
    va = _views(markers.path(a), [d for _, d in forward], mode)
    out = []
    for b, d in forward:
        vb = _views(markers.path(b), [tuple(-x for x in d)], mode)
        out.append(_edges(va, vb, d, mode))
    return out


def row_links(
    marker_dir: str, row: Sequence[tuple[int, Sequence[tuple[int, tuple[int, ...]]]]], mode: str
) -> list[tuple[int, int, NDArray[np.int64]]]:
    """``(a, b, links)`` for each block ``a`` of a row and each of its ``forward``
    neighbours ``b``, in order: one task per row, as a block's links take ~3 ms and a
    Dask task costs about as much."""
    return [
        (a, b, edges)
        for a, forward in row
        for (b, _), edges in zip(forward, block_links(marker_dir, a, forward, mode), strict=True)
    ]


def stitch_ids(
    client: Runner, plan: ImagePlan, segmented: Segmented, progress: ProgressFn = noop
) -> merge.MergedIds:
    """Global consecutive ids: one task per row of blocks turns each block's views and
    those of its forward neighbours (from the segment markers) into links, streamed
    in block order into `merge.merge_ids`, whose memory is bounded by a row of
    blocks; its lookup tables go to scratch."""
    grid = plan.grid(plan.segment_halo)
    marker_dir = str(plan.markers("segment").directory)
    mode = plan.segmenter.stitch
    per_row = grid.grid_shape[-1]  # blocks are numbered row-major: a row is consecutive

    def rows() -> Iterator[list[tuple[int, list[tuple[int, tuple[int, ...]]]]]]:
        row = []
        for a in grid:
            row.append((a.id, [(b.id, d) for b, d in grid.forward_neighbours(a)]))
            if len(row) == per_row:
                yield row
                row = []

    links = imap_blocks(
        client,
        row_links,
        ((marker_dir, row, mode) for row in rows()),
        stage="links",
        total=len(grid) // per_row,
        progress=progress,
    )
    edges = (edge for found in links for edge in found)
    work = storage.location(storage.join(plan.scratch, "merge"))
    store.remove(work, plan.root)
    return merge.merge_ids(grid.grid_shape, segmented.counts, edges, work)

"""Stage statistics: the whole image's extrema and histogram, never per tile.

When the segmenter smooths, a filter pass finds the filtered image's extrema, then a
histogram pass bins it with the edges `np.histogram` would use on the whole image.
The filtered image is never stored: each pass, and the segment stage, filters its
block again from the raw image and the halo the filter needs (`filtered`: from the
neighbours' saved layers, `segpipe.halo`). Storing it took 4 bytes a pixel of
scratch, more than the finished result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe import halo as slabs_of
from segpipe.blocks import Block
from segpipe.engine import Runner, map_blocks
from segpipe.image import ImagePlan, ProgressFn, noop, where
from segpipe.io import omezarr
from segpipe.io.markers import Arrays
from segpipe.stages.ingest import extrema_in, extrema_out
from segpipe.stats import Extrema, ImageStats, block_histogram, hist_range, merge_histograms

__all__ = [
    "as_float32",
    "filter_block",
    "filtered",
    "histogram_block",
    "keeping_filtered",
    "statistics",
]


def as_float32(block: NDArray[Any]) -> NDArray[np.float32]:
    """``block`` as float32 (what every segmenter reads)."""
    return np.asarray(block, dtype=np.float32)


_kept = threading.local()


@contextmanager
def keeping_filtered() -> Iterator[None]:
    """Within it, `filtered` keeps the last region it smoothed in this thread and serves it
    again (a copy) for the same region of the same run.

    For a task that runs every stage of a one-block image: its filter pass, histogram
    pass and segment stage all smooth the same region (the whole image, halos clipped),
    and the Gaussian is most of their cost. Outside it nothing is kept, so a worker
    holds no block between tasks.
    """
    _kept.on = True
    try:
        yield
    finally:
        _kept.on = False
        _kept.last = None


def _smoothed(
    plan: ImagePlan, read: tuple[slice, ...], make: Callable[[], NDArray[np.float32]]
) -> NDArray[np.float32]:
    if not getattr(_kept, "on", False):
        return make()
    key = (plan.token, plan.raw, read)
    last = getattr(_kept, "last", None)
    if last is not None and last[0] == key:
        return last[1].copy()
    smooth = make()
    _kept.last = (key, smooth.copy())
    return smooth


def filtered(plan: ImagePlan, block: Block, halo: Sequence[int]) -> NDArray[np.float32]:
    """``block.read`` (``block`` of ``plan.grid(halo)``) as the segmenter sees it: float32,
    smoothed by its filter where it has one, the same bits as the whole image smoothed.

    The raw block is read with the filter's halo besides, from its own chunk and its
    neighbours' saved layers (`segpipe.halo.assemble`; the region itself where they are
    missing), and filtered here."""
    if not plan.segmenter.has_filter():
        return as_float32(omezarr.read_block(plan.raw, block.read))
    width = plan.segmenter.filter_halo(plan.ndim)
    wide_grid = plan.grid(tuple(h + w for h, w in zip(halo, width, strict=True)))
    wide = wide_grid.block(block.index)

    def smooth_wide() -> NDArray[np.float32]:
        job = plan.slabs
        data = None if job is None else slabs_of.assemble(plan.raw, wide_grid, wide, job.directory)
        if data is None:
            data = omezarr.read_block(plan.raw, wide.read)
        return plan.segmenter.preprocess(as_float32(data))

    smooth = _smoothed(plan, wide.read, smooth_wide)
    inner = tuple(
        slice(r.start - o.start, r.stop - o.start)
        for r, o in zip(block.read, wide.read, strict=True)
    )
    return np.ascontiguousarray(smooth[inner])


def filter_block(plan: ImagePlan, block: Block) -> Extrema:
    """The extrema of ``block``'s core, filtered."""
    return Extrema.of(filtered(plan, block, (0,) * plan.ndim))


def histogram_block(
    plan: ImagePlan, block: Block, lo: np.float32, hi: np.float32
) -> tuple[NDArray[np.int64], float]:
    """The histogram of ``block``'s core as the segmenter sees it, on ``lo``..``hi``."""
    return block_histogram(filtered(plan, block, (0,) * plan.ndim), lo, hi)


def _hist_out(h: tuple[NDArray[np.int64], float]) -> Arrays:
    return {"counts": h[0], "sum": np.array(h[1], np.float64)}


def _hist_in(a: Arrays) -> tuple[NDArray[np.int64], float]:
    return a["counts"].astype(np.int64), float(a["sum"])


def statistics(
    client: Runner, plan: ImagePlan, raw: Extrema, progress: ProgressFn = noop
) -> ImageStats:
    """Filter (when the segmenter smooths) and histogram the whole image."""
    extrema = raw
    blocks = list(plan.grid())
    if plan.segmenter.has_filter():
        parts = map_blocks(
            client,
            filter_block,
            [(plan, b) for b in blocks],
            stage="filter",
            progress=progress,
            markers=plan.markers("filter"),
            run=plan.token,
            codec=(extrema_out, extrema_in),
            names=[where(plan, b.core) for b in blocks],
        )
        extrema = Extrema.merge(parts)
    lo, hi = hist_range(extrema)
    hists = map_blocks(
        client,
        histogram_block,
        [(plan, b, lo, hi) for b in blocks],
        stage="statistics",
        progress=progress,
        markers=plan.markers("statistics"),
        run=plan.token,
        codec=(_hist_out, _hist_in),
        names=[where(plan, b.core) for b in blocks],
    )
    return merge_histograms(hists, extrema)

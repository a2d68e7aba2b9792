"""Stage statistics: the whole image's extrema and histogram, never per tile.

When the segmenter smooths, a filter pass first writes the float32 filtered
image to scratch (block + Gaussian radius, the halo from the neighbours' saved
layers); then one histogram pass over the array the segmenter reads, with the
bin edges `np.histogram` would use on the whole image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe import halo
from segpipe.blocks import Block
from segpipe.engine import Runner, map_blocks, prepare_array
from segpipe.image import ImagePlan, ProgressFn, SlabJob, noop, where
from segpipe.io import omezarr
from segpipe.io.markers import Arrays
from segpipe.segmenters.base import Segmenter
from segpipe.stages.ingest import extrema_in, extrema_out
from segpipe.stats import Extrema, ImageStats, block_histogram, hist_range, merge_histograms

__all__ = ["as_float32", "filter_block", "histogram_block", "statistics"]


def as_float32(block: NDArray[Any]) -> NDArray[np.float32]:
    """``block`` as float32 (what every segmenter reads)."""
    return np.asarray(block, dtype=np.float32)


def filter_block(
    src: str, dst: str, block: Block, segmenter: Segmenter, slabs: SlabJob | None = None
) -> Extrema:
    data = None if slabs is None else halo.assemble(src, slabs.grid, block, slabs.directory)
    if data is None:
        data = omezarr.read_block(src, block.read)
    out = np.ascontiguousarray(segmenter.preprocess(as_float32(data))[block.core_in_read])
    omezarr.write_block(dst, block.core, out)
    return Extrema.of(out)


def histogram_block(
    src: str, region: tuple[slice, ...], lo: np.float32, hi: np.float32
) -> tuple[NDArray[np.int64], float]:
    return block_histogram(as_float32(omezarr.read_block(src, region)), lo, hi)


def _hist_out(h: tuple[NDArray[np.int64], float]) -> Arrays:
    return {"counts": h[0], "sum": np.array(h[1], np.float64)}


def _hist_in(a: Arrays) -> tuple[NDArray[np.int64], float]:
    return a["counts"].astype(np.int64), float(a["sum"])


def statistics(
    client: Runner, plan: ImagePlan, raw: Extrema, progress: ProgressFn = noop
) -> ImageStats:
    """Filter (when the segmenter smooths) and histogram the whole image."""
    extrema = raw
    tile = plan.grid().tile
    if plan.segmenter.has_filter():
        markers = plan.markers("filter")
        prepare_array(
            plan.filtered,
            markers,
            shape=plan.spec.shape,
            chunks=tile,
            dtype=np.float32,
            labels=False,
            compress=False,  # scratch, read twice: raw floats are faster than lz4 on noise
        )
        blocks = list(plan.grid(plan.segmenter.filter_halo(plan.ndim)))
        slabs = plan.slabs
        parts = map_blocks(
            client,
            filter_block,
            [(plan.raw, plan.filtered, b, plan.segmenter, slabs) for b in blocks],
            stage="filter",
            progress=progress,
            markers=markers,
            run=plan.token,
            codec=(extrema_out, extrema_in),
            names=[where(plan, b.core) for b in blocks],
        )
        extrema = Extrema.merge(parts)
    lo, hi = hist_range(extrema)
    blocks = list(plan.grid())
    hists = map_blocks(
        client,
        histogram_block,
        [(plan.source, b.core, lo, hi) for b in blocks],
        stage="statistics",
        progress=progress,
        markers=plan.markers("statistics"),
        run=plan.token,
        codec=(_hist_out, _hist_in),
        names=[where(plan, b.core) for b in blocks],
    )
    return merge_histograms(hists, extrema)

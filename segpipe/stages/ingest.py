"""Stage ingest: copy each input into ``OUT/<name>/0`` block by block.

Each task reads its region of the source (tifffile, zarr or a whole PNG/JPEG on
the worker), writes whole chunks and returns the region's extrema; when the
segmenter smooths, it also keeps each block's outer layers for the filter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segpipe import halo
from segpipe.blocks import BlockGrid
from segpipe.engine import Runner, map_blocks, prepare_array
from segpipe.errors import InputReadError, UnsupportedImageError
from segpipe.image import ImagePlan, ProgressFn, SlabJob, noop, where
from segpipe.io import omezarr
from segpipe.io.markers import Arrays
from segpipe.io.readers import SourceSpec, read_region
from segpipe.stats import Extrema

__all__ = ["extrema_in", "extrema_out", "ingest", "ingest_block", "ingest_regions", "regions"]


def extrema_out(e: Extrema) -> Arrays:
    """`Extrema` as the arrays of a marker."""
    return {"v": np.array([e.min, e.max, e.count, e.nonfinite], np.float64)}


def extrema_in(a: Arrays) -> Extrema:
    """`Extrema` from the arrays of a marker."""
    v = a["v"]
    return Extrema(float(v[0]), float(v[1]), int(v[2]), int(v[3]))


def regions(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[slice, ...]]:
    """The cores of a grid of ``chunks`` over ``shape``, in block order."""
    return [b.core for b in BlockGrid.build(shape, tile=chunks, halo=0)]


def ingest_block(
    spec: SourceSpec, dst: str, region: tuple[slice, ...], slabs: SlabJob | None = None
) -> Extrema:
    try:
        data = read_region(spec, region)
    except InputReadError:
        raise
    except OSError as err:  # deleted, moved or unreadable since the run began
        raise InputReadError(
            f"{spec.path}: cannot read rows {region[-2].start}:{region[-2].stop} "
            f"({err.strerror or err}); the input changed during the run?"
        ) from err
    ext = Extrema.of(data)
    if ext.nonfinite:
        raise UnsupportedImageError(
            f"{spec.path}: {ext.nonfinite} NaN/inf pixels in rows {region[-2].start}:"
            f"{region[-2].stop}; clean the image first."
        )
    omezarr.write_block(dst, region, data)
    if slabs is not None:
        halo.save_region_slabs(slabs.directory, slabs.grid, region, data, slabs.halo)
    return ext


def ingest_regions(plan: ImagePlan) -> list[tuple[slice, ...]]:
    """Regions read per ingest task, aligned to how the source decodes: PNG/JPEG whole,
    full-width bands where a decode unit (a strip) is wider than a block, else blocks."""
    shape = plan.spec.shape
    tile = plan.grid().tile
    if plan.spec.whole_file:
        return [tuple(slice(0, n) for n in shape)]
    if plan.spec.chunks and plan.spec.chunks[-1] > tile[-1]:
        return regions(shape, (*tile[:-1], shape[-1]))
    return regions(shape, tile)


def ingest(client: Runner, plan: ImagePlan, progress: ProgressFn = noop) -> Extrema:
    """Copy the source image into ``OUT/<name>/0`` chunk by chunk; return its extrema."""
    markers = plan.markers("ingest")
    tile = plan.grid().tile
    prepare_array(
        plan.raw,
        markers,
        shape=plan.spec.shape,
        chunks=tile,
        dtype=plan.spec.out_dtype,
        labels=False,
        inner=plan.inner,
    )
    reads = ingest_regions(plan)
    slabs = plan.slabs
    parts = map_blocks(
        client,
        ingest_block,
        [(plan.spec, plan.raw, r, slabs) for r in reads],
        stage="ingest",
        progress=progress,
        markers=markers,
        run=plan.token,
        codec=(extrema_out, extrema_in),
        names=[where(plan, r) for r in reads],
    )
    return Extrema.merge(parts)

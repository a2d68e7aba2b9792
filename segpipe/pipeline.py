"""The stages of segmenting one image on a Dask cluster.

ingest → statistics → segment → stitch → write (then panoptic, measure and
preview, in their own modules). Each stage submits one task per block
(never per pixel, never the whole image) and returns something small. Block
functions run on workers and do their own I/O on whole chunks, so no two
tasks ever write the same chunk; each leaves a completion marker, so a rerun
resumes.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from distributed import Client, as_completed
from numpy.typing import NDArray

from segpipe import halo, merge, stitch
from segpipe.blocks import Block, BlockGrid
from segpipe.deep import provenance
from segpipe.errors import (
    BlockFailedError,
    ConfigError,
    InputReadError,
    OutputConflictError,
    OutputWriteError,
    SegpipeError,
    UnsupportedImageError,
)
from segpipe.io import omezarr, store, written
from segpipe.io.markers import RUN_KEY, UNREADABLE, Arrays, Markers, read_marker, save_npz
from segpipe.io.readers import SourceSpec, read_region
from segpipe.io.store import image_state, mark_image
from segpipe.segmenters.base import Segmenter
from segpipe.stats import Extrema, ImageStats, block_histogram, hist_range, merge_histograms

if TYPE_CHECKING:
    from segpipe.relabel import Relabelled

ProgressFn = Callable[[str, int, int], None]
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}
STAGES = ("ingest", "statistics", "segment", "stitch", "write", "panoptic", "measure", "preview")
"""The stages of one image, in order: one Prefect task each per image (never per block)."""
RETRIES = 2  # a block lost with its worker is recomputed elsewhere
WINDOW = 512  # block tasks in flight per stage: bounds the scheduler's memory
MAX_CHUNK_BYTES = 2**31 - 1  # what numcodecs' Blosc encodes in one call


def _noop(stage: str, done: int, total: int) -> None:
    pass


def check_tile(spec: SourceSpec, tile: Sequence[int]) -> None:
    """Raise `ConfigError` (naming the file) if a block of ``tile`` cannot be one chunk.

    Every array's chunk is a block; numcodecs' Blosc encodes at most 2 GiB at once, and
    panoptic labels take 8 bytes a pixel.
    """
    px = math.prod(min(t, n) for t, n in zip(tile, spec.shape, strict=True))
    if px * 8 > MAX_CHUNK_BYTES:
        raise ConfigError(
            f"{spec.path}: tile {list(tile)} makes blocks of {px} pixels, whose uint64 "
            f"label chunks ({px * 8} bytes) exceed the {MAX_CHUNK_BYTES} bytes a Blosc "
            "chunk holds; choose a smaller tile (`tile: auto` is 2048² for planes and at "
            "most 2^24 voxels for volumes)."
        )


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to segment one image; picklable, paths absolute."""

    spec: SourceSpec
    root: str
    tile: tuple[int, ...]
    segmenter: Segmenter
    halo: tuple[int, ...] | None = None  # None: what the segmenter declares
    catalogue: Any = None  # panoptic.Catalogue; None: the segmenter's classes
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        check_tile(self.spec, self.tile)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ndim(self) -> int:
        return len(self.spec.shape)

    @property
    def group(self) -> str:
        return str(Path(self.root) / self.name)

    @property
    def raw(self) -> str:
        return str(Path(self.group) / "0")

    def label(self, kind: str, level: int = 0) -> str:
        return str(Path(self.group) / "labels" / kind / str(level))

    @property
    def scratch(self) -> str:
        return str(Path(self.root) / omezarr.SCRATCH / "scratch" / self.name)

    @property
    def provenance(self) -> Path:
        """Table of where and how each segment block ran (kept after the run)."""
        return Path(self.root) / omezarr.SCRATCH / "provenance" / f"{self.name}.parquet"

    def markers(self, stage: str) -> Markers:
        """Completion markers of ``stage`` for this image."""
        return Markers(self.blocks / stage)

    @property
    def blocks(self) -> Path:
        """The folder of every stage's completion markers for this image."""
        return Path(self.root) / omezarr.SCRATCH / "blocks" / self.name

    @property
    def manifest(self) -> Path:
        """What the completed image holds: every file with its size and checksum."""
        return Path(self.root) / omezarr.SCRATCH / "manifests" / f"{self.name}.npz"

    @property
    def filtered(self) -> str:
        return str(Path(self.scratch) / "filtered")

    @property
    def slabs(self) -> SlabJob | None:
        """Where ingest saves the blocks' outer layers for the filter; None without one."""
        if not self.segmenter.has_filter():
            return None
        width = self.segmenter.filter_halo(self.ndim)
        return SlabJob(str(Path(self.scratch) / "slabs"), self.grid(), tuple(width))

    @property
    def local_labels(self) -> str:
        return str(Path(self.scratch) / "local")

    @property
    def source(self) -> str:
        """Array the segmenter reads: the filtered image, or the raw one."""
        return self.filtered if self.segmenter.has_filter() else self.raw

    @property
    def segment_halo(self) -> tuple[int, ...]:
        return self.halo if self.halo is not None else self.segmenter.halo(self.ndim)

    def grid(self, halo: Sequence[int] | int = 0) -> BlockGrid:
        return BlockGrid.build(self.spec.shape, tile=self.tile, halo=halo)


# -- block functions (run on workers) ----------------------------------------


def _as_float32(block: NDArray[Any]) -> NDArray[np.float32]:
    return np.asarray(block, dtype=np.float32)


# -- marker codecs: block results as plain arrays (no pickle) ------------------


def _extrema_out(e: Extrema) -> Arrays:
    return {"v": np.array([e.min, e.max, e.count, e.nonfinite], np.float64)}


def _extrema_in(a: Arrays) -> Extrema:
    v = a["v"]
    return Extrema(float(v[0]), float(v[1]), int(v[2]), int(v[3]))


def _hist_out(h: tuple[NDArray[np.int64], float]) -> Arrays:
    return {"counts": h[0], "sum": np.array(h[1], np.float64)}


def _hist_in(a: Arrays) -> tuple[NDArray[np.int64], float]:
    return a["counts"].astype(np.int64), float(a["sum"])


def _none_out(_: object) -> Arrays:
    return {}


def _none_in(_: Arrays) -> None:
    return None


def _count_in(a: Arrays) -> int:
    return int(a["count"])


def _dkey(d: Sequence[int]) -> str:
    return "d" + "_".join(str(x).replace("-", "m") for x in d)


def _marked(
    fn: Callable[..., Any],
    marker_dir: str,
    block_id: int,
    encode: Callable[[Any], Arrays],
    run: str,
    *args: Any,
) -> Any:
    """Run a block function, then write its marker (chunks first, marker last), which
    records the files the function wrote."""
    with written.recording() as files:
        result = fn(*args)
    Markers(marker_dir).save(block_id, encode(result), run=run, files=files)
    return result


# -- block functions (run on workers) ----------------------------------------


@dataclass(frozen=True)
class SlabJob:
    """Where ingest tasks leave each block's outer layers for the filter (`segpipe.halo`)."""

    directory: str
    grid: BlockGrid  # the blocks (tiles); ids as every stage numbers them
    halo: tuple[int, ...]


def ingest_block(
    spec: SourceSpec, dst: str, region: tuple[slice, ...], slabs: SlabJob | None = None
) -> Extrema:
    try:
        data = read_region(spec, region)
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


def filter_block(
    src: str, dst: str, block: Block, segmenter: Segmenter, slabs: SlabJob | None = None
) -> Extrema:
    data = None if slabs is None else halo.assemble(src, slabs.grid, block, slabs.directory)
    if data is None:
        data = omezarr.read_block(src, block.read)
    out = np.ascontiguousarray(segmenter.preprocess(_as_float32(data))[block.core_in_read])
    omezarr.write_block(dst, block.core, out)
    return Extrema.of(out)


def histogram_block(
    src: str, region: tuple[slice, ...], lo: np.float32, hi: np.float32
) -> tuple[NDArray[np.int64], float]:
    return block_histogram(_as_float32(omezarr.read_block(src, region)), lo, hi)


def segment_block(
    plan: ImagePlan,
    block: Block,
    params: dict[str, Any],
    directions: list[tuple[int, ...]],
    marker_dir: str,
) -> int:
    """Segment one block; write semantic and local labels, then a marker holding the
    object count, the block's view toward each neighbour (read by the pair tasks) and
    its provenance (worker, device, seconds, batch, network tiles)."""
    with written.recording() as files:
        count, arrays = _segment_block(plan, block, params, directions)
    Markers(marker_dir).save(block.id, arrays, run=plan.token, files=files)
    return count


def _segment_block(
    plan: ImagePlan, block: Block, params: dict[str, Any], directions: list[tuple[int, ...]]
) -> tuple[int, Arrays]:
    t0 = time.perf_counter()
    data = _as_float32(omezarr.read_block(plan.source, block.read))
    if getattr(plan.segmenter, "wants_origin", False):
        params = {**params, "origin": tuple(s.start for s in block.read)}
    result = plan.segmenter.segment(data, params)
    core = block.core_in_read
    if result.instances is None:
        raise ValueError(f"segmenter {plan.segmenter.name!r} returned no instances")
    semantic = (
        result.semantic[core] if result.semantic is not None else (result.instances[core] > 0)
    ).astype(np.uint8)
    local, full, count = stitch.sequential_core(
        result.instances, core, sequential=result.sequential
    )
    omezarr.write_block(plan.label("semantic"), block.core, semantic)
    omezarr.write_block(plan.local_labels, block.core, local)
    grid = plan.grid(plan.segment_halo)
    arrays: Arrays = {"count": np.array(count, np.int64)}
    for d in directions:
        other = grid.block(tuple(i + k for i, k in zip(block.index, d, strict=True)))
        if plan.segmenter.stitch == "faces":
            labels, classes = stitch.face_view(local, semantic, d)
            arrays[_dkey(d) + "_l"], arrays[_dkey(d) + "_s"] = labels, classes
        else:
            arrays[_dkey(d) + "_v"] = stitch.overlap_view(full, block, other, plan.segment_halo)
    record = provenance.Record(
        worker=provenance.worker_address(),
        device=str(getattr(result, "device", "cpu")),
        seconds=time.perf_counter() - t0,
        batch=int(getattr(result, "batch", 1)),
        tiles=int(getattr(result, "tiles", 1)),
    )
    arrays.update(provenance.encode(record))
    return count, arrays


def _view_keys(d: tuple[int, ...], mode: str) -> tuple[str, ...]:
    return (_dkey(d) + "_l", _dkey(d) + "_s") if mode == "faces" else (_dkey(d) + "_v",)


def _views(marker: Path, directions: Sequence[tuple[int, ...]], mode: str) -> Arrays:
    """Only the views toward ``directions`` from a segment marker (an ``.npz`` reads
    the members asked for, not the other views and the provenance)."""
    with np.load(marker, allow_pickle=False) as data:
        return {k: data[k] for d in directions for k in _view_keys(d, mode)}


def _edges(va: Arrays, vb: Arrays, d: tuple[int, ...], mode: str) -> NDArray[np.int64]:
    back = tuple(-x for x in d)
    if mode == "faces":
        return stitch.face_edges(
            (va[_dkey(d) + "_l"], va[_dkey(d) + "_s"]),
            (vb[_dkey(back) + "_l"], vb[_dkey(back) + "_s"]),
            d,
        )
    return stitch.overlap_edges(va[_dkey(d) + "_v"], vb[_dkey(back) + "_v"])


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


# -- helpers -----------------------------------------------------------------


def map_blocks(
    client: Client,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    *,
    stage: str,
    progress: ProgressFn = _noop,
    window: int = WINDOW,
    markers: Markers | None = None,
    codec: tuple[Callable[[Any], Arrays], Callable[[Arrays], Any]] = (_none_out, _none_in),
    names: Sequence[str] | None = None,
    run: str = "",
    resources: Mapping[str, float] | None = None,
) -> list[Any]:
    """Run ``fn(*a)`` for each ``a``, at most ``window`` in flight; results in order.

    ``resources`` (e.g. ``{"GPU": 1}``) restricts every task to workers that
    advertise them, through ``client.submit`` (annotations on a graph can be lost).

    With ``markers``, item ``i`` whose marker exists is not run: its result is
    read back with ``codec[1]``; a finished item writes its marker with
    ``codec[0]`` after its own writes. An item whose task killed workers
    ``allowed-failures`` times is reported, by ``names[i]``, in a
    `BlockFailedError` once every other item has finished; any other error
    stops the stage at once.
    """
    encode, decode = codec
    token = uuid.uuid4().hex[:8]
    results: list[Any] = [None] * len(args)
    todo: list[int] = []
    for i in range(len(args)):
        if markers is not None and markers.done(i):
            results[i] = decode(markers.load(i))
        else:
            todo.append(i)
    done = len(args) - len(todo)
    progress(stage, done, len(args))
    pending: dict[str, int] = {}
    queue = iter(todo)
    ac = as_completed()
    failed: list[tuple[int, BaseException]] = []

    def submit(i: int, key: str, retries: int) -> Any:
        extra: dict[str, Any] = {"key": key, "retries": retries}
        if resources:
            extra["resources"] = dict(resources)
        if markers is None:
            return client.submit(fn, *args[i], **extra)
        marker_dir = str(markers.directory)
        return client.submit(_marked, fn, marker_dir, i, encode, run, *args[i], **extra)

    def submit_next() -> None:
        for i in queue:
            f = submit(i, f"{stage}-{token}-{i}", RETRIES)
            pending[str(f.key)] = i
            ac.add(f)
            return

    for _ in range(min(window, len(todo))):
        submit_next()
    guilty: list[tuple[int, BaseException]] = []
    try:
        for f in ac:
            i = pending.pop(str(f.key))
            if f.status == "error" and type(f.exception()).__name__ == "KilledWorker":
                failed.append((i, f.exception()))  # let the other blocks finish
            else:
                results[i] = f.result()
                done += 1
                progress(stage, done, len(args))
            f.release()
            submit_next()
        # A dying worker takes the tasks it was running with it, and Dask counts them all
        # as suspects. Give each suspect one more run on its own: the innocent finish.
        for i, _ in failed:
            try:
                results[i] = submit(i, f"{stage}-{token}-{i}-alone", 0).result()
            except Exception as again:
                if type(again).__name__ != "KilledWorker":
                    raise
                guilty.append((i, again))
                continue
            done += 1
            progress(stage, done, len(args))
    except OSError as err:
        client.cancel(list(ac.futures) if hasattr(ac, "futures") else [])
        raise output_error(err, stage) from err
    except BaseException:
        client.cancel(list(ac.futures) if hasattr(ac, "futures") else [])
        raise
    failed = guilty
    if failed:
        which = ", ".join(names[i] if names else f"#{i}" for i, _ in failed)
        raise BlockFailedError(
            f"stage {stage}: {len(failed)} block(s) killed their workers repeatedly and were "
            f"given up: {which}; the other {len(args) - len(failed)} finished. "
            f"Cause: {failed[0][1]}"
        ) from failed[0][1]
    return results


def output_error(err: OSError, stage: str) -> OSError:
    """``err`` as an `OutputWriteError` naming the file when the output cannot take a
    write (disk full, read-only, permissions); else ``err`` itself."""
    if isinstance(err, SegpipeError) or err.errno not in _OUTPUT_ERRNOS:
        return err
    return OutputWriteError(
        f"{err.filename or 'output'}: cannot write ({err.strerror}) during {stage}; "
        "free space or fix permissions, then rerun with --resume."
    )


def _regions(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[slice, ...]]:
    return [b.core for b in BlockGrid.build(shape, tile=chunks, halo=0)]


def span(region: tuple[slice, ...]) -> str:
    """``"0:256, 512:768"``: a region as it is named in messages."""
    return ", ".join(f"{s.start}:{s.stop}" for s in region)


def _where(plan: ImagePlan, region: tuple[slice, ...]) -> str:
    return f"{plan.spec.path} [{span(region)}]"


def ingest_regions(plan: ImagePlan) -> list[tuple[slice, ...]]:
    """Regions read per ingest task, aligned to how the source decodes: PNG/JPEG whole,
    full-width bands where a decode unit (a strip) is wider than a block, else blocks."""
    shape = plan.spec.shape
    tile = plan.grid().tile
    if plan.spec.whole_file:
        return [tuple(slice(0, n) for n in shape)]
    if plan.spec.chunks and plan.spec.chunks[-1] > tile[-1]:
        return _regions(shape, (*tile[:-1], shape[-1]))
    return _regions(shape, tile)


def prepare_array(
    path: str,
    markers: Markers,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    labels: bool = True,
    compress: bool = True,
) -> None:
    """Create the array a stage writes, unless a resumed stage already wrote parts of it."""
    if markers.count():
        try:
            arr = zarr.open_array(path, mode="r")
            if arr.shape == tuple(shape) and arr.dtype == np.dtype(dtype):
                markers.clean_leftovers()
                return
        except Exception:  # missing or unreadable: its markers lie
            pass
        markers.clear()
    omezarr.create_array(
        path, shape=shape, chunks=chunks, dtype=dtype, labels=labels, compress=compress
    )


def build_pyramid(
    client: Client,
    plan: ImagePlan,
    arrays: Sequence[tuple[Callable[[int], str], Any, bool]],
    shapes: Sequence[Sequence[int]],
    *,
    stage: str,
    progress: ProgressFn = _noop,
    start: int = 1,
) -> None:
    """Levels ``start``.. of each ``(path of level k, dtype, is labels)`` by striding
    level k-1 (nearest, never interpolated); one marked task per output chunk."""
    tile = plan.grid().tile
    for k in range(start, len(shapes)):
        markers = plan.markers(f"{stage}-{k}")
        jobs = []
        for path, dtype, labels in arrays:
            prepare_array(
                path(k), markers, shape=shapes[k], chunks=tile, dtype=dtype, labels=labels
            )
            jobs += [(path(k - 1), path(k), r) for r in _regions(shapes[k], tile)]
        map_blocks(
            client,
            omezarr.downsample_block,
            jobs,
            stage=f"{stage}-{k}",
            progress=progress,
            markers=markers,
            run=plan.token,
        )


# -- stages ------------------------------------------------------------------


def ingest(client: Client, plan: ImagePlan, progress: ProgressFn = _noop) -> Extrema:
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
    )
    regions = ingest_regions(plan)
    slabs = plan.slabs
    parts = map_blocks(
        client,
        ingest_block,
        [(plan.spec, plan.raw, r, slabs) for r in regions],
        stage="ingest",
        progress=progress,
        markers=markers,
        run=plan.token,
        codec=(_extrema_out, _extrema_in),
        names=[_where(plan, r) for r in regions],
    )
    return Extrema.merge(parts)


def statistics(
    client: Client, plan: ImagePlan, raw: Extrema, progress: ProgressFn = _noop
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
            codec=(_extrema_out, _extrema_in),
            names=[_where(plan, b.core) for b in blocks],
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
        names=[_where(plan, b.core) for b in blocks],
    )
    return merge_histograms(hists, extrema)


def gpu_resources(client: Client, segmenter: Segmenter) -> dict[str, float] | None:
    """``{"GPU": 1}`` for a segmenter that wants a GPU on a cluster with GPU workers
    (workers started with ``--resources GPU=n``); None otherwise (any worker will do)."""
    if not segmenter.gpu:
        return None
    workers = client.scheduler_info()["workers"].values()
    if any(float((w.get("resources") or {}).get("GPU", 0)) > 0 for w in workers):
        return {"GPU": 1}
    return None


@dataclass(frozen=True)
class Segmented:
    counts: list[int]
    params: dict[str, Any]


def segment(
    client: Client, plan: ImagePlan, stats: ImageStats, progress: ProgressFn = _noop
) -> Segmented:
    """Segment every block (with its halo): semantic + local labels, and in each block's
    marker its object count and its views toward its neighbours (for `stitch_ids`)."""
    params = dict(plan.segmenter.prepare(stats))
    tile = plan.grid().tile
    markers = plan.markers("segment")
    prepare_array(
        plan.label("semantic"), markers, shape=plan.spec.shape, chunks=tile, dtype=np.uint8
    )
    prepare_array(  # scratch; lz4 (1.4 + 0.9 ns/px) costs less than writing raw ids
        plan.local_labels,  # to new files (~3 ms/MiB on this VM's ext4)
        markers,
        shape=plan.spec.shape,
        chunks=tile,
        dtype=np.uint32,
    )
    grid = plan.grid(plan.segment_halo)
    blocks = list(grid)
    pairs = list(grid.neighbour_pairs())
    directions: dict[int, list[tuple[int, ...]]] = {b.id: [] for b in blocks}
    for a, b, d in pairs:
        directions[a.id].append(d)
        directions[b.id].append(tuple(-x for x in d))
    # segment_block writes its own marker (it holds the neighbour views), so it is
    # run without map_blocks' wrapper and its result read back as the count.
    todo = [b for b in blocks if not markers.done(b.id)]
    counts_todo = map_blocks(
        client,
        segment_block,
        [(plan, b, params, directions[b.id], str(markers.directory)) for b in todo],
        stage="segment",
        progress=lambda stage, done, total: progress(
            stage, done + len(blocks) - len(todo), len(blocks)
        ),
        names=[_where(plan, b.core) for b in todo],
        resources=gpu_resources(client, plan.segmenter),
    )
    counts = [0] * len(blocks)
    computed = dict(zip((b.id for b in todo), counts_todo, strict=True))
    for b in blocks:
        counts[b.id] = computed[b.id] if b.id in computed else _count_in(markers.load(b.id))
    return Segmented(counts, {k: _plain(v) for k, v in params.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def imap_blocks(
    client: Client,
    fn: Callable[..., Any],
    args: Iterable[tuple[Any, ...]],
    *,
    stage: str,
    total: int,
    progress: ProgressFn = _noop,
    window: int = WINDOW,
) -> Iterator[Any]:
    """Yield ``fn(*a)`` for each ``a`` in order, with at most ``window`` tasks submitted and
    not yet consumed: a consumer that streams the results holds ``window`` of them, never
    all (the links of 10⁶ blocks)."""
    token = uuid.uuid4().hex[:8]
    items = enumerate(args)
    futures: dict[int, Any] = {}

    def fill() -> None:
        while len(futures) < window:
            nxt = next(items, None)
            if nxt is None:
                return
            i, a = nxt
            futures[i] = client.submit(fn, *a, key=f"{stage}-{token}-{i}", retries=RETRIES)

    progress(stage, 0, total)
    done = 0
    try:
        fill()
        while done in futures:
            # the next result, and those after it already finished: one round trip
            batch = [futures.pop(done)]
            while done + len(batch) in futures and futures[done + len(batch)].done():
                batch.append(futures.pop(done + len(batch)))
            results = client.gather(batch)
            for f in batch:
                f.release()
            done += len(batch)
            progress(stage, done, total)
            fill()
            yield from results
    finally:  # an error here or in the consumer: drop what is still queued
        if futures:
            client.cancel(list(futures.values()))


def stitch_ids(
    client: Client, plan: ImagePlan, segmented: Segmented, progress: ProgressFn = _noop
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
    work = Path(plan.scratch) / "merge"
    shutil.rmtree(work, ignore_errors=True)
    return merge.merge_ids(grid.grid_shape, segmented.counts, edges, work)


class Lazy(Sequence[tuple[Any, ...]]):
    """Task arguments made when a task is submitted, not all up front (10⁶ lookup tables)."""

    def __init__(self, n: int, make: Callable[[int], tuple[Any, ...]]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, ...]:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(i)


def write(
    client: Client,
    plan: ImagePlan,
    ids: merge.MergedIds | stitch.GlobalIds,
    progress: ProgressFn = _noop,
    times: dict[str, float] | None = None,
    catalogue: Any = None,
) -> int:
    """The relabel pass (`segpipe.relabel`: instances and panoptic level 0, object
    statistics), then the pyramids of the image, semantic and instance labels and the
    NGFF metadata; return the level count. ``catalogue``: the classes (default: the
    plan's, else the segmenter's).

    With ``times``, the pass's wall time goes to ``times`` under ``relabel``,
    ``panoptic``, ``measure`` and ``write`` (the pyramid levels the pass writes), in
    proportion to its tasks' compute time in each.
    """
    relabel_pass(client, plan, ids, progress, times, catalogue)
    return write_levels(client, plan, ids.dtype, progress)


def relabel_pass(
    client: Client,
    plan: ImagePlan,
    ids: merge.MergedIds | stitch.GlobalIds,
    progress: ProgressFn = _noop,
    times: dict[str, float] | None = None,
    catalogue: Any = None,
) -> Relabelled:
    """The relabel pass of `write`; returns its `segpipe.relabel.Relabelled`."""
    from segpipe import panoptic, relabel  # they build on this module

    t0 = time.perf_counter()
    catalogue = catalogue or plan.catalogue or panoptic.catalogue_for(plan.segmenter)
    done = relabel.relabel(client, plan, ids, catalogue, progress)
    if times is not None:
        wall = time.perf_counter() - t0
        steps = done.step_seconds()
        busy = sum(steps.values()) or 1.0
        for step, seconds in steps.items():
            times[step] = times.get(step, 0.0) + wall * seconds / busy
    return done


def write_levels(client: Client, plan: ImagePlan, dtype: Any, progress: ProgressFn = _noop) -> int:
    """The rest of `write`: the pyramid levels above those the relabel pass wrote (of the
    image, semantic and ``dtype`` instance labels) and the NGFF metadata; the level count."""
    from segpipe import relabel  # it builds on this module

    shapes = relabel.level_shapes(plan)
    sources = {
        "image": lambda k: str(Path(plan.group) / str(k)),
        "semantic": lambda k: plan.label("semantic", k),
        "instances": lambda k: plan.label("instances", k),
    }
    dtypes = {"image": plan.spec.out_dtype, "semantic": np.uint8, "instances": dtype}
    build_pyramid(
        client,
        plan,
        [(sources[kind], dtypes[kind], kind != "image") for kind in sources],
        shapes,
        stage="pyramid",
        progress=progress,
        start=relabel.written_levels(plan) + 1,
    )
    levels = len(shapes)
    omezarr.write_image_metadata(plan.group, ndim=plan.ndim, levels=levels, name=plan.name)
    classes = plan.segmenter.classes
    omezarr.write_label_group_metadata(
        Path(plan.group) / "labels" / "semantic",
        ndim=plan.ndim,
        levels=levels,
        name="semantic",
        properties=[{"label-value": i, "class": c} for i, c in enumerate(classes)],
    )
    omezarr.write_label_group_metadata(
        Path(plan.group) / "labels" / "instances", ndim=plan.ndim, levels=levels, name="instances"
    )
    omezarr.write_labels_index(Path(plan.group) / "labels", ["instances", "semantic"])
    return levels


@dataclass
class ImageResult:
    name: str
    shape: tuple[int, ...]
    objects: int
    seconds: float
    stages: dict[str, float]

    @property
    def mpx_per_s(self) -> float:
        return math.prod(self.shape) / 1e6 / max(self.seconds, 1e-9)


def source_identity(spec: SourceSpec) -> dict[str, Any]:
    """What says an input is unchanged since a run: its path, and the size and mtime of
    the file or, for Zarr, of every file of the array read (its chunks, not only its
    metadata, which an in-place rewrite leaves alone)."""
    read = Path(getattr(spec, "array_path", None) or spec.path)
    if not read.is_dir():
        st = read.stat()
        return {"path": spec.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256()
    size = count = 0
    for folder, dirs, names in os.walk(read):
        dirs.sort()
        for name in sorted(names):
            st = os.stat(os.path.join(folder, name))
            rel = os.path.relpath(os.path.join(folder, name), read)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            size += st.st_size
            count += 1
    return {"path": spec.path, "size": size, "files": count, "digest": digest.hexdigest()[:32]}


def begin(plan: ImagePlan) -> str:
    """Prepare the image's place in the store; return ``done``, ``resume``, ``repair`` or
    ``fresh``.

    ``done``: complete from the same input, and every file it was completed with is
    intact (nothing to do); ``resume``: an interrupted run of the same input in the
    same blocks (finished blocks are kept, each checked before it is trusted);
    ``repair``: complete from the same input but with files missing or damaged;
    ``fresh``: anything else. ``repair`` and ``fresh`` remove earlier results of this
    name first. The blocks are compared because ``tile: auto`` is resolved per image
    and per version: markers name blocks by number.

    Raises
    ------
    OutputConflictError
        If ``OUT/<name>`` exists but segpipe did not write it (it is never deleted).
    """
    state = image_state(plan.group)
    identity = source_identity(plan.spec)
    start = "fresh"
    if state.get("source") == identity:
        if state.get("complete"):
            if not damaged_result(plan):
                return "done"
            start = "repair"
        elif state.get("tile") == list(plan.tile):
            mark_image(plan.group, complete=False)
            return "resume"
    group = Path(plan.group)
    ours = state or plan.manifest.exists() or plan.blocks.exists()
    if os.path.lexists(group) and not ours:
        raise OutputConflictError(
            f"{group}: exists but was not written by segpipe; it is left alone. Move it, "
            "or rename the input."
        )
    for path in (group, Path(plan.scratch), plan.blocks, plan.provenance, plan.manifest):
        store.remove(path, plan.root)
    group.mkdir(parents=True, exist_ok=True)
    zarr.open_group(plan.group, mode="a", zarr_format=3)
    mark_image(plan.group, complete=False, source=identity, tile=list(plan.tile))
    return start


def _result_files(plan: ImagePlan) -> list[Path]:
    """Every file of the image's result but its group metadata (rewritten when marked)."""
    group = Path(plan.group)
    files = [Path(folder) / n for folder, _, names in os.walk(group) for n in names]
    return sorted(f for f in files if f != group / "zarr.json")


def write_manifest(plan: ImagePlan) -> None:
    """Record every file of the finished image (size, mtime, checksum) in its manifest.

    Checksums come from the block markers where a file is as its block wrote it, and
    are computed here for the rest (metadata, tables, previews)."""
    known: dict[str, written.Written] = {}
    if plan.blocks.exists():
        for stage in plan.blocks.iterdir():
            for marker in stage.glob("*.npz"):
                try:
                    with np.load(marker, allow_pickle=False) as data:
                        if "__files" in data.files:
                            arrays = {k: data[k] for k in ("__files", "__files_v")}
                            for w in written.from_arrays(arrays, stage):
                                known[w.path] = w
                except UNREADABLE:
                    continue
    files = []
    for path in _result_files(plan):
        st = path.stat()
        seen = known.get(str(path))
        if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
            seen = written.Written(str(path), st.st_size, st.st_mtime_ns, written.checksum(path))
        files.append(seen)
    save_npz(plan.manifest, written.to_arrays(files, plan.root))


def damaged_result(plan: ImagePlan) -> list[str]:
    """Files of a completed image that are missing or no longer as it was completed
    with (an unreadable or missing manifest counts as its own path)."""
    arrays = read_marker(plan.manifest)
    if arrays is None:
        return [str(plan.manifest)]
    return written.damaged(written.from_arrays(arrays, plan.root))


def write_provenance(plan: ImagePlan) -> Path | None:
    """The segment markers' provenance records as ``OUT/_segpipe/provenance/<image>.parquet``;
    None when no block recorded any (markers from an older version)."""
    markers = plan.markers("segment")
    rows = []
    for b in plan.grid(plan.segment_halo):
        if not markers.done(b.id):
            continue
        with np.load(markers.path(b.id), allow_pickle=False) as data:
            # only the small entries: the neighbour views stay unread
            keep = [k for k in data.files if k.startswith(provenance.PREFIX) or k == RUN_KEY]
            arrays = {k: data[k] for k in keep}
        record = provenance.decode(arrays)
        if record is not None:
            run = str(arrays.get(RUN_KEY, ""))
            rows.append((b.id, span(b.core), record, run))
    if not rows:
        return None
    return provenance.write_table(plan.provenance, rows)


def finish(plan: ImagePlan, result: ImageResult, stats: ImageStats, params: dict[str, Any]) -> None:
    """Write the provenance table and the manifest of the result, drop scratch data and
    markers, then mark the image complete (written last)."""
    write_provenance(plan)
    tally = {}
    if plan.blocks.exists():
        for d in sorted(plan.blocks.iterdir()):
            computed, total = Markers(d).tally(plan.token)
            tally[d.name] = {"computed": computed, "blocks": total}
    write_manifest(plan)
    store.remove(plan.scratch, plan.root)
    store.remove(plan.blocks, plan.root)
    mark_image(
        plan.group,
        objects=result.objects,
        shape=list(result.shape),
        segmenter=plan.segmenter.describe(),
        params=params,
        statistics=stats.to_dict(),
        seconds=result.seconds,
        blocks=tally,
        complete=True,
    )


def record_failure(plan: ImagePlan, problem: str) -> None:
    """Note on the (incomplete) image why it failed; it is never marked complete."""
    if Path(plan.group).exists():
        mark_image(plan.group, complete=False, error=problem)


def completed_result(plan: ImagePlan) -> ImageResult:
    """The result recorded by an earlier run that completed this image."""
    state = image_state(plan.group)
    return ImageResult(plan.name, plan.spec.shape, int(state["objects"]), 0.0, {"skipped": 1.0})


def run_image(client: Client, plan: ImagePlan, progress: ProgressFn = _noop) -> ImageResult:
    """All stages for one image, without Prefect (the flow calls the stages itself)."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t
        return out

    if begin(plan) == "done":
        return completed_result(plan)
    raw = timed("ingest", lambda: ingest(client, plan, progress))
    stats = timed("statistics", lambda: statistics(client, plan, raw, progress))
    seg = timed("segment", lambda: segment(client, plan, stats, progress))
    ids = timed("stitch", lambda: stitch_ids(client, plan, seg, progress))
    from segpipe import panoptic, preview, relabel  # they build on this module

    catalogue = plan.catalogue or panoptic.catalogue_for(plan.segmenter)
    t = time.perf_counter()
    done = relabel_pass(client, plan, ids, progress, times, catalogue)
    write_levels(client, plan, ids.dtype, progress)
    times["write"] = time.perf_counter() - t - sum(times[s] for s in relabel.STEPS[:3])
    # The preview needs only the image and instance pyramids: its one task runs on a
    # worker while the client finishes the panoptic labels and writes the tables
    # (from the pass's results in memory, not its markers).
    with ThreadPoolExecutor(1, thread_name_prefix="segpipe-preview") as pool:
        shown = pool.submit(timed, "preview", lambda: preview.write_preview(client, plan, progress))
        timed(
            "panoptic+",
            lambda: relabel.finish_panoptic(client, plan, ids.count, catalogue, progress, done),
        )
        timed("measure+", lambda: relabel.write_tables(plan, ids.count, catalogue, done))
        shown.result()
    for step in ("panoptic", "measure"):  # the pass's share plus the stage's own
        times[step] += times.pop(step + "+")
    result = ImageResult(plan.name, plan.spec.shape, ids.count, time.perf_counter() - t0, times)
    finish(plan, result, stats, seg.params)
    return result

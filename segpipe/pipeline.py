"""The stages of segmenting one image on a Dask cluster.

ingest → statistics → segment → stitch → write. Each stage submits one task
per block (never per pixel, never the whole image) and returns something
small. Block functions at the top run on workers and do their own I/O on
whole chunks, so no two tasks ever write the same chunk.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from distributed import Client, Future, as_completed
from numpy.typing import NDArray

from segpipe import stitch
from segpipe.blocks import Block, BlockGrid
from segpipe.errors import UnsupportedImageError
from segpipe.io import omezarr
from segpipe.io.readers import SourceSpec, read_region
from segpipe.io.store import mark_image
from segpipe.segmenters.base import Segmenter
from segpipe.stats import Extrema, ImageStats, block_histogram, hist_range, merge_histograms

ProgressFn = Callable[[str, int, int], None]
RETRIES = 2  # a block lost with its worker is recomputed elsewhere
WINDOW = 512  # block tasks in flight per stage: bounds the scheduler's memory


def _noop(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to segment one image; picklable, paths absolute."""

    spec: SourceSpec
    root: str
    tile: tuple[int, ...]
    segmenter: Segmenter
    halo: tuple[int, ...] | None = None  # None: what the segmenter declares
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

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
    def filtered(self) -> str:
        return str(Path(self.scratch) / "filtered")

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


def _read(path: str, region: tuple[slice, ...]) -> NDArray[Any]:
    return np.asarray(zarr.open_array(path, mode="r")[region])


def _as_float32(block: NDArray[Any]) -> NDArray[np.float32]:
    return np.asarray(block, dtype=np.float32)


def ingest_block(spec: SourceSpec, dst: str, region: tuple[slice, ...]) -> Extrema:
    data = read_region(spec, region)
    ext = Extrema.of(data)
    if ext.nonfinite:
        raise UnsupportedImageError(
            f"{spec.path}: {ext.nonfinite} NaN/inf pixels in rows {region[-2].start}:"
            f"{region[-2].stop}; clean the image first."
        )
    zarr.open_array(dst, mode="r+")[region] = data
    return ext


def filter_block(src: str, dst: str, block: Block, segmenter: Segmenter) -> Extrema:
    data = _as_float32(_read(src, block.read))
    out = segmenter.preprocess(data)[block.core_in_read]
    zarr.open_array(dst, mode="r+")[block.core] = out
    return Extrema.of(out)


def histogram_block(
    src: str, region: tuple[slice, ...], lo: np.float32, hi: np.float32
) -> tuple[NDArray[np.int64], float]:
    return block_histogram(_as_float32(_read(src, region)), lo, hi)


@dataclass
class BlockOutput:
    """A block's labelled core count and its views toward each neighbour."""

    count: int
    views: dict[tuple[int, ...], Any]


def segment_block(
    plan: ImagePlan, block: Block, params: dict[str, Any], directions: list[tuple[int, ...]]
) -> BlockOutput:
    data = _as_float32(_read(plan.source, block.read))
    result = plan.segmenter.segment(data, params)
    core = block.core_in_read
    if result.instances is None:
        raise ValueError(f"segmenter {plan.segmenter.name!r} returned no instances")
    semantic = (
        result.semantic[core] if result.semantic is not None else (result.instances[core] > 0)
    ).astype(np.uint8)
    local, full, count = stitch.sequential_core(result.instances, core)
    zarr.open_array(plan.label("semantic"), mode="r+")[block.core] = semantic
    zarr.open_array(plan.local_labels, mode="r+")[block.core] = local
    grid = plan.grid(plan.segment_halo)
    views: dict[tuple[int, ...], Any] = {}
    for d in directions:
        other = grid.block(tuple(i + k for i, k in zip(block.index, d, strict=True)))
        if plan.segmenter.stitch == "faces":
            views[d] = stitch.face_view(local, semantic, d)
        else:
            views[d] = stitch.overlap_view(full, block, other, plan.segment_halo)
    return BlockOutput(count, views)


def block_count(out: BlockOutput) -> int:
    return out.count


def pair_edges(a: BlockOutput, b: BlockOutput, d: tuple[int, ...], mode: str) -> NDArray[np.int64]:
    back = tuple(-x for x in d)
    if mode == "faces":
        return stitch.face_edges(a.views[d], b.views[back], d)
    return stitch.overlap_edges(a.views[d], b.views[back])


def relabel_block(src: str, dst: str, region: tuple[slice, ...], lut: NDArray[Any]) -> None:
    local = np.asarray(zarr.open_array(src, mode="r")[region])
    zarr.open_array(dst, mode="r+")[region] = lut[local]


# -- helpers -----------------------------------------------------------------


def map_blocks(
    client: Client,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    *,
    stage: str,
    progress: ProgressFn = _noop,
    window: int = WINDOW,
) -> list[Any]:
    """Run ``fn(*a)`` for each ``a`` with at most ``window`` tasks in flight; results in order."""
    token = uuid.uuid4().hex[:8]
    results: list[Any] = [None] * len(args)
    pending: dict[str, int] = {}
    queue = iter(enumerate(args))
    ac = as_completed()

    def submit_next() -> None:
        for i, a in queue:
            f = client.submit(fn, *a, key=f"{stage}-{token}-{i}", retries=RETRIES)
            pending[str(f.key)] = i
            ac.add(f)
            return

    for _ in range(min(window, len(args))):
        submit_next()
    done = 0
    progress(stage, 0, len(args))
    try:
        for f in ac:
            i = pending.pop(str(f.key))
            results[i] = f.result()
            done += 1
            progress(stage, done, len(args))
            submit_next()
    except BaseException:
        client.cancel([f for f in ac.futures] if hasattr(ac, "futures") else [])
        raise
    return results


def _regions(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[slice, ...]]:
    return [b.core for b in BlockGrid.build(shape, tile=chunks, halo=0)]


def ingest_regions(plan: ImagePlan) -> list[tuple[slice, ...]]:
    """Regions read per ingest task: blocks for tiled sources, full-width bands for
    strip TIFFs and PNG/JPEG (which are decoded a row band or whole file at a time)."""
    shape = plan.spec.shape
    tile = plan.grid().tile
    if plan.spec.whole_file:
        return [tuple(slice(0, n) for n in shape)]
    if plan.spec.format == "tiff" and not _tiff_is_tiled(plan.spec.path):
        band = (*tile[:-1], shape[-1])
        return _regions(shape, band)
    return _regions(shape, tile)


def _tiff_is_tiled(path: str) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return bool(tif.series[0].pages[0].is_tiled)  # type: ignore[union-attr]


# -- stages ------------------------------------------------------------------


def ingest(client: Client, plan: ImagePlan, progress: ProgressFn = _noop) -> Extrema:
    """Copy the source image into ``OUT/<name>/0`` chunk by chunk; return its extrema."""
    omezarr.create_array(
        plan.raw, shape=plan.spec.shape, chunks=plan.grid().tile, dtype=plan.spec.out_dtype
    )
    parts = map_blocks(
        client,
        ingest_block,
        [(plan.spec, plan.raw, r) for r in ingest_regions(plan)],
        stage="ingest",
        progress=progress,
    )
    return Extrema.merge(parts)


def statistics(
    client: Client, plan: ImagePlan, raw: Extrema, progress: ProgressFn = _noop
) -> ImageStats:
    """Filter (when the segmenter smooths) and histogram the whole image."""
    extrema = raw
    if plan.segmenter.has_filter():
        omezarr.create_array(
            plan.filtered, shape=plan.spec.shape, chunks=plan.grid().tile, dtype=np.float32
        )
        grid = plan.grid(plan.segmenter.filter_halo(plan.ndim))
        parts = map_blocks(
            client,
            filter_block,
            [(plan.raw, plan.filtered, b, plan.segmenter) for b in grid],
            stage="filter",
            progress=progress,
        )
        extrema = Extrema.merge(parts)
    lo, hi = hist_range(extrema)
    hists = map_blocks(
        client,
        histogram_block,
        [(plan.source, b.core, lo, hi) for b in plan.grid()],
        stage="statistics",
        progress=progress,
    )
    return merge_histograms(hists, extrema)


@dataclass(frozen=True)
class Segmented:
    counts: list[int]
    edges: list[tuple[int, int, NDArray[np.int64]]]
    params: dict[str, Any]


def segment(
    client: Client, plan: ImagePlan, stats: ImageStats, progress: ProgressFn = _noop
) -> Segmented:
    """Segment every block (with its halo), write semantic + local labels, find links."""
    params = dict(plan.segmenter.prepare(stats))
    tile = plan.grid().tile
    omezarr.create_array(
        plan.label("semantic"), shape=plan.spec.shape, chunks=tile, dtype=np.uint8, labels=True
    )
    omezarr.create_array(
        plan.local_labels, shape=plan.spec.shape, chunks=tile, dtype=np.uint32, labels=True
    )
    grid = plan.grid(plan.segment_halo)
    pairs = list(grid.neighbour_pairs())
    directions: dict[int, list[tuple[int, ...]]] = {b.id: [] for b in grid}
    for a, b, d in pairs:
        directions[a.id].append(d)
        directions[b.id].append(tuple(-x for x in d))
    token = uuid.uuid4().hex[:8]
    blocks: dict[int, Future[BlockOutput]] = {}
    for b in grid:
        blocks[b.id] = client.submit(
            segment_block,
            plan,
            b,
            params,
            directions[b.id],
            key=f"segment-{token}-{b.id}",
            retries=RETRIES,
        )
    counts_f = [
        client.submit(block_count, blocks[i], key=f"count-{token}-{i}") for i in sorted(blocks)
    ]
    edge_f = [
        client.submit(
            pair_edges,
            blocks[a.id],
            blocks[b.id],
            d,
            plan.segmenter.stitch,
            key=f"pair-{token}-{a.id}-{b.id}",
        )
        for a, b, d in pairs
    ]
    del blocks  # block outputs are freed once their pairs are computed
    total = len(counts_f)
    progress("segment", 0, total)
    for done, _ in enumerate(as_completed(counts_f), start=1):
        progress("segment", done, total)
    counts = client.gather(counts_f)
    edge_arrays = client.gather(edge_f)
    edges = [(a.id, b.id, e) for (a, b, _), e in zip(pairs, edge_arrays, strict=True)]
    return Segmented(counts, edges, {k: _plain(v) for k, v in params.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def stitch_ids(segmented: Segmented) -> stitch.GlobalIds:
    """Global consecutive ids from block counts and links."""
    return stitch.global_ids(segmented.counts, segmented.edges)


def write(
    client: Client, plan: ImagePlan, ids: stitch.GlobalIds, progress: ProgressFn = _noop
) -> int:
    """Relabel to global ids, build the pyramids and NGFF metadata; return the level count."""
    tile = plan.grid().tile
    omezarr.create_array(
        plan.label("instances"), shape=plan.spec.shape, chunks=tile, dtype=ids.dtype, labels=True
    )
    grid = plan.grid()
    map_blocks(
        client,
        relabel_block,
        [(plan.local_labels, plan.label("instances"), b.core, ids.block_lut(b.id)) for b in grid],
        stage="relabel",
        progress=progress,
    )
    shapes = omezarr.pyramid_shapes(plan.spec.shape, min_size=max(256, min(tile[-2:])))
    sources = {
        "image": lambda k: str(Path(plan.group) / str(k)),
        "semantic": lambda k: plan.label("semantic", k),
        "instances": lambda k: plan.label("instances", k),
    }
    dtypes = {"image": plan.spec.out_dtype, "semantic": np.uint8, "instances": ids.dtype}
    for k in range(1, len(shapes)):
        jobs = []
        for kind, path in sources.items():
            omezarr.create_array(
                path(k), shape=shapes[k], chunks=tile, dtype=dtypes[kind], labels=kind != "image"
            )
            jobs += [(path(k - 1), path(k), r) for r in _regions(shapes[k], tile)]
        map_blocks(client, omezarr.downsample_block, jobs, stage=f"pyramid-{k}", progress=progress)
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


def begin(plan: ImagePlan) -> None:
    """Mark the image incomplete before anything of it is (re)written."""
    Path(plan.group).mkdir(parents=True, exist_ok=True)
    zarr.open_group(plan.group, mode="a", zarr_format=3)
    labels = Path(plan.group) / "labels"
    if labels.exists():
        shutil.rmtree(labels)
    mark_image(plan.group, complete=False, source=plan.spec.path)


def finish(plan: ImagePlan, result: ImageResult, stats: ImageStats, params: dict[str, Any]) -> None:
    """Drop scratch data, then mark the image complete (written last)."""
    shutil.rmtree(plan.scratch, ignore_errors=True)
    mark_image(
        plan.group,
        objects=result.objects,
        shape=list(result.shape),
        segmenter=plan.segmenter.describe(),
        params=params,
        statistics=stats.to_dict(),
        seconds=result.seconds,
        complete=True,
    )


def run_image(client: Client, plan: ImagePlan, progress: ProgressFn = _noop) -> ImageResult:
    """All stages for one image, without Prefect (the flow calls the stages itself)."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t
        return out

    begin(plan)
    raw = timed("ingest", lambda: ingest(client, plan, progress))
    stats = timed("statistics", lambda: statistics(client, plan, raw, progress))
    seg = timed("segment", lambda: segment(client, plan, stats, progress))
    ids = timed("stitch", lambda: stitch_ids(seg))
    timed("write", lambda: write(client, plan, ids, progress))
    result = ImageResult(plan.name, plan.spec.shape, ids.count, time.perf_counter() - t0, times)
    finish(plan, result, stats, seg.params)
    return result


def iter_names(plans: Iterable[ImagePlan]) -> list[str]:
    return [p.name for p in plans]

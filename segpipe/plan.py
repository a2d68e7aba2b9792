"""What a run would cost, from image headers and a calibration, without computing it.

`plan_image` counts blocks, Dask tasks, bytes and memory of each stage of one
image by arithmetic on its shape, tile and halos (never one Python object per
block), and `wall_seconds` turns measured per-pixel costs (`Costs`, shipped in
``segpipe/data/plan_costs.json`` or measured by `measure_costs`) into a time for N
workers. Images are opened with `segpipe.io.readers.open_source` (headers only).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.blocks import Pyramid
from segpipe.config import RunConfig, block_tile
from segpipe.errors import ConfigError
from segpipe.io.readers import SourceSpec, open_source
from segpipe.segmenters import Segmenter, get_segmenter

__all__ = [
    "COMPRESSION",
    "COSTS_FILE",
    "LABEL_SHRINK",
    "Costs",
    "Disk",
    "ImageEstimate",
    "RunPlan",
    "SegmentCost",
    "Stage",
    "Startup",
    "auto_tile",
    "disk_footprint",
    "halo_for",
    "image_disk",
    "load_costs",
    "measure_costs",
    "neighbour_pair_counts",
    "plan_image",
    "plan_run",
    "run_disk",
    "startup_seconds",
    "thread_peaks",
    "tile_for",
    "wall_seconds",
]

# Inside the package, so `segpipe plan` has it wherever segpipe is installed.
COSTS_FILE = Path(__file__).resolve().parent / "data" / "plan_costs.json"
COMPRESSION = (
    "uncompressed array bytes (what a task decodes or encodes); on disk the "
    "image codec (blosc-lz4) saves little on noisy images (~1.3x) and label arrays "
    "(blosc-lz4, no shuffle) shrink ~15x"
)


# -- calibration ---------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentCost:
    """Measured cost of one segmenter's block function, per pixel read (block + halo)."""

    ns_per_px: float
    working_bytes_per_px: float  # tracemalloc peak of ``segment()`` / pixels read


@dataclass(frozen=True)
class Startup:
    """Measured seconds a ``segpipe run`` spends around its blocks (``python -m bench.startup``).

    ``api_*_s`` is the start-up the CLI prints ("started in") with Prefect's local API
    running (reused), stopped (its database there), or on a new database;
    ``local_cluster_s`` a LocalCluster's start and close; ``flow_and_exit_s`` the
    rest of a one-block run (the Prefect flow run, its artifacts, the exit).
    """

    api_running_s: float
    api_stopped_s: float
    api_new_database_s: float
    local_cluster_s: float
    flow_and_exit_s: float
    source: str = ""


@dataclass(frozen=True)
class Costs:
    """Per-block costs measured on one thread (``python -m bench.calibrate`` or ``--calibrate``).

    ``stages`` are ns per core pixel of each stage's block function, except
    ``filter`` (per pixel read, halo included) and ``pyramid`` (per output pixel
    of one array); ``pairs`` are seconds per pair task by stitch mode.
    """

    stages: dict[str, float]
    segment: dict[str, SegmentCost]
    pairs: dict[str, float]
    task_overhead_s: float  # scheduler + worker overhead per Dask task
    merge_s_per_block: float  # client-side stitch per block
    source: str = ""  # what was measured, where
    startup: Startup | None = None  # None: a table from before start-up was measured

    def to_json(self) -> dict[str, Any]:
        table = asdict(self)
        if table["startup"] is None:
            del table["startup"]
        return table

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "") -> Costs:
        return cls(
            stages={k: float(v) for k, v in data["stages"].items()},
            segment={k: SegmentCost(**v) for k, v in data["segment"].items()},
            pairs={k: float(v) for k, v in data["pairs"].items()},
            task_overhead_s=float(data["task_overhead_s"]),
            merge_s_per_block=float(data["merge_s_per_block"]),
            source=source or str(data.get("source", "")),
            startup=Startup(**data["startup"]) if data.get("startup") else None,
        )


def load_costs(path: str | Path = COSTS_FILE) -> Costs:
    """The calibration table shipped in ``segpipe/data/plan_costs.json`` (or another one).

    Raises
    ------
    ConfigError
        If the file is missing or not a calibration table.
    """
    p = Path(path)
    try:
        return Costs.from_json(json.loads(p.read_text(encoding="utf-8")), source=str(p))
    except FileNotFoundError as err:
        raise ConfigError(
            f"{p}: no calibration table; run `python -m bench.calibrate` or plan with --calibrate."
        ) from err
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{p}: not a calibration table ({err}).") from err


# -- arithmetic on the grid ----------------------------------------------------------


def _sum_min(h: int, start: int, step: int, n: int) -> int:
    """``sum(min(h, start + j * step) for j in range(n))`` in O(1)."""
    if n <= 0:
        return 0
    below = min(n, max(0, -(-(h - start) // step)))  # terms still under h
    return below * start + step * below * (below - 1) // 2 + (n - below) * h


def _read_extent(size: int, tile: int, halo: int) -> int:
    """Pixels read along one axis by all blocks: cores plus clipped halos."""
    g = -(-size // tile)
    last = size - (g - 1) * tile
    return size + _sum_min(halo, 0, tile, g) + _sum_min(halo, last, tile, g - 1)


def _blocks(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-s // t) for s, t in zip(shape, tile, strict=True))


def neighbour_pair_counts(grid: Sequence[int]) -> dict[tuple[int, ...], int]:
    """Touching block pairs per offset (as `BlockGrid.neighbour_pairs` yields them), counted.

    Examples
    --------
    >>> sum(neighbour_pair_counts((4, 4)).values())  # 12 + 12 faces, 9 + 9 corners
    42
    """
    out: dict[tuple[int, ...], int] = {}
    for d in itertools.product((-1, 0, 1), repeat=len(grid)):
        if any(d) and next(x for x in d if x) > 0:
            n = math.prod(max(g - abs(k), 0) for g, k in zip(grid, d, strict=True))
            if n:
                out[d] = n
    return out


# -- the plan of one image -----------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of one image: Dask tasks, bytes and one thread's compute seconds."""

    name: str
    tasks: int
    read_bytes: int
    write_bytes: int
    compute_s: float | None  # all tasks on one thread; None: not calibrated
    client: bool = False  # runs on the client (stitch), not as Dask tasks


LABEL_SHRINK = 16
"""Label arrays on disk against their uncompressed bytes, as the disk figures assume:
the three label pyramids of densely packed synthetic nuclei take 1/17 of their
uncompressed bytes (blosc-lz4); sparser images take far less. The image is taken
as it is (noise does not compress), so the figures err on the large side."""


FILE_SLACK = 2048
"""Bytes a file takes on disk beyond its size, on average (half a 4 KiB block)."""


@dataclass(frozen=True)
class Disk:
    """Bytes on disk of one image: its result, and at the run's peak (the result and
    the scratch, markers and saved layers kept while it runs)."""

    final: int
    peak: int

    @property
    def scratch(self) -> int:
        return self.peak - self.final


def disk_footprint(
    shape: Sequence[int],
    item: int,
    tiles: Sequence[int],
    width: Sequence[int],
    pyramid: Pyramid,
) -> Disk:
    """The `Disk` of an image of ``shape`` (``item`` bytes a pixel) in blocks of
    ``tiles``, whose ingest saves layers ``width`` deep (zero without a filter)."""
    npx = math.prod(shape)
    levels = sum(math.prod(s) for s in pyramid.shapes)
    labels = levels * (1 + 4 + 8) // LABEL_SHRINK  # semantic, instances, panoptic
    files = 4 * sum(math.prod(_blocks(s, tiles)) for s in pyramid.shapes)  # four arrays
    preview = 3 * math.prod(_preview_shape(pyramid.shapes)) // 2  # RGB PNG, ~2x on noise
    final = levels * item + labels + files * FILE_SLACK + preview
    layers = sum(2 * min(w, t) / t for w, t in zip(width, tiles, strict=True))
    scratch = 4 * npx // LABEL_SHRINK + int(npx * item * layers)  # local ids, layers
    return Disk(final, final + scratch)


def thread_peaks(
    shape: Sequence[int],
    tiles: Sequence[int],
    segmenter: Segmenter,
    halo: Sequence[int],
    item: int,
    stored_item: int,
    working: float,
) -> dict[str, int]:
    """Bytes one worker thread holds at once for one block, per stage: an image of
    ``shape`` (``item`` bytes a pixel, ``stored_item`` in its file), blocks of ``tiles``,
    the segment ``halo``, and the segmenter's ``working`` bytes a voxel of block + halo."""
    f_halo = segmenter.filter_halo(len(shape)) if segmenter.has_filter() else (0,) * len(shape)

    def grown(*halos: Sequence[int]) -> int:
        return math.prod(
            min(t + 2 * sum(h[k] for h in halos), n)
            for k, (t, n) in enumerate(zip(tiles, shape, strict=True))
        )

    core, read_block, wide = math.prod(tiles), grown(halo), grown(halo, f_halo)
    # the raw block with the filter's halo besides, as float32, and filtered
    filtering = wide * (item + 4 + 4) if segmenter.has_filter() else 0
    return {
        "ingest": core * (stored_item + item),
        "filter": grown(f_halo) * (item + 4 + 4) if segmenter.has_filter() else 0,
        # filtering (its arrays dropped but the result), then the float32 block + halo,
        # the segmenter's working set, full and core labels
        "segment": int(max(filtering, read_block * (4 + working + 4) + core * 5)),
        # local ids, semantic, image, instances, panoptic (+ one row of sums per object)
        "relabel": core * (4 + 1 + item + 4 + 8),
    }


MIN_AUTO_EDGE = 32
"""``tile: auto`` halves a block no further than this edge."""


def auto_tile(
    spec: SourceSpec,
    segmenter: Segmenter,
    budget: float,
    halo: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """``tile: auto`` for ``spec`` and ``segmenter``: `segpipe.config.block_tile`'s block,
    halved along one axis at a time (the one that lowers the peak most) while one worker
    thread would hold more than ``budget`` bytes for it (`thread_peaks`, with the
    segmenter's declared working set).

    Examples
    --------
    >>> from segpipe.segmenters import get_segmenter
    >>> vol = SourceSpec("v.zarr", "v", "zarr", "ZYX", (192, 512, 512), "uint16", None)
    >>> auto_tile(vol, get_segmenter("otsu"), 0.3 * 2**30)
    (192, 256, 256)
    >>> auto_tile(vol, get_segmenter("watershed"), 0.3 * 2**30)
    (192, 64, 64)
    """
    shape = spec.shape
    ndim = len(shape)
    tiles = [min(t, max(n, 1)) for t, n in zip(block_tile("auto", ndim, shape), shape, strict=True)]
    seg_halo = tuple(halo) if halo is not None else segmenter.halo(ndim)
    item = np.dtype(spec.out_dtype).itemsize
    stored = np.dtype(spec.dtype).itemsize * max(spec.n_channels, 1)
    working = segmenter.working_bytes(ndim)

    def peak(t: Sequence[int]) -> int:
        return max(thread_peaks(shape, t, segmenter, seg_halo, item, stored, working).values())

    while peak(tiles) > budget:
        # the halving that sheds the most: an axis taken whole has no halo to keep
        halved = [
            [*tiles[:k], tiles[k] // 2, *tiles[k + 1 :]]
            for k in range(ndim)
            if tiles[k] // 2 >= MIN_AUTO_EDGE
        ]
        if not halved:
            break
        tiles = min(halved, key=peak)
    return tuple(tiles)


def tile_for(config: RunConfig, spec: SourceSpec, segmenter: Segmenter) -> tuple[int, ...]:
    """The block shape of ``spec`` in a run of ``config``: its ``tile``, or `auto_tile`
    within ``thread_memory``."""
    ndim = len(spec.shape)
    if config.tile != "auto":
        return block_tile(config.tile, ndim, spec.shape)
    return auto_tile(spec, segmenter, config.thread_memory * 2**30, halo_for(config, ndim))


def halo_for(config: RunConfig, ndim: int) -> tuple[int, ...] | None:
    """The segment halo ``config`` sets per axis; None for ``auto`` (the segmenter's)."""
    halo = config.halo
    return None if halo == "auto" else ((halo,) * ndim if isinstance(halo, int) else tuple(halo))


def image_disk(
    spec: SourceSpec, tile: Sequence[int], segmenter: Segmenter, halo: Sequence[int] | None = None
) -> Disk:
    """The `Disk` of one image in blocks of ``tile`` (clipped to it), from its header.

    Examples
    --------
    >>> from segpipe.segmenters import get_segmenter
    >>> spec = SourceSpec("x.zarr", "x", "zarr", "YX", (8192, 8192), "uint16", None)
    >>> d = image_disk(spec, (2048, 2048), get_segmenter("otsu"))
    >>> round(d.final / 2**20), round(d.peak / 2**20)
    (242, 260)
    """
    shape = spec.shape
    tiles = [min(t, max(n, 1)) for t, n in zip(tile, shape, strict=True)]
    width = [0] * len(shape)
    if segmenter.has_filter():
        seg_halo = halo if halo is not None else segmenter.halo(len(shape))
        filt = segmenter.filter_halo(len(shape))
        width = [f + h for f, h in zip(filt, seg_halo, strict=True)]
    item = np.dtype(spec.out_dtype).itemsize
    return disk_footprint(shape, item, tiles, width, Pyramid.build(shape, tiles))


@dataclass(frozen=True)
class ImageEstimate:
    """The plan of one image."""

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    tile: tuple[int, ...]
    halo: tuple[int, ...]
    filter_halo: tuple[int, ...]
    grid: tuple[int, ...]
    blocks: int
    pairs: int
    levels: int
    stages: tuple[Stage, ...]
    peak_thread_bytes: dict[str, int]  # per stage: block + halo, working set, labels
    disk: Disk = Disk(0, 0)

    @property
    def pixels(self) -> int:
        return math.prod(self.shape)

    @property
    def dask_tasks(self) -> int:
        return sum(s.tasks for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_thread_bytes.values())

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _per_axis(value: int | Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,) * ndim
    values = tuple(int(v) for v in value)
    return values * ndim if len(values) == 1 else values


def plan_image(
    spec: SourceSpec,
    *,
    tile: int | Sequence[int],
    segmenter: Segmenter,
    halo: int | Sequence[int] | None = None,
    costs: Costs | None = None,
) -> ImageEstimate:
    """Blocks, tasks, bytes, memory and compute seconds of every stage of one image.

    Parameters
    ----------
    spec : SourceSpec
        The image, from `open_source` (no pixels read).
    tile : int or sequence of int
        Block edge per axis (clipped to the image, as `BlockGrid.build` does).
    segmenter : Segmenter
        Decides the halos, the stitch mode and the working set.
    halo : int or sequence of int, optional
        Segment halo; default what the segmenter declares.
    costs : Costs, optional
        Calibration; without it ``compute_s`` is None.

    Returns
    -------
    ImageEstimate

    Examples
    --------
    >>> from segpipe.segmenters import get_segmenter
    >>> spec = SourceSpec("x.zarr", "x", "zarr", "YX", (4096, 4096), "uint16", None)
    >>> est = plan_image(spec, tile=1024, segmenter=get_segmenter("otsu", sigma=0))
    >>> est.blocks, est.pairs, est.stage("segment").tasks
    (16, 42, 16)
    """
    shape = spec.shape
    ndim = len(shape)
    tiles = tuple(
        min(t, max(s, 1)) for t, s in zip(_per_axis(tile, ndim) or (), shape, strict=True)
    )
    seg_halo = _per_axis(halo, ndim) or segmenter.halo(ndim)
    f_halo = segmenter.filter_halo(ndim) if segmenter.has_filter() else (0,) * ndim
    grid = _blocks(shape, tiles)
    n = math.prod(grid)
    npx = math.prod(shape)
    item = np.dtype(spec.out_dtype).itemsize
    stored_item = np.dtype(spec.dtype).itemsize * max(spec.n_channels, 1)
    pair_counts = neighbour_pair_counts(grid)
    pairs = sum(pair_counts.values())
    pyramid = Pyramid.build(shape, tiles)
    shapes = pyramid.shapes
    low = pyramid.pass_levels(tiles)  # levels the relabel pass writes from its blocks
    low_px = sum(math.prod(s) for s in shapes[1 : 1 + low])
    upper = shapes[1 + low :]  # levels written by the pyramid tasks
    up_tasks = sum(math.prod(_blocks(s, tiles)) for s in upper)
    up_px = sum(math.prod(s) for s in upper)
    up_read = sum(math.prod(s) for s in shapes[low:-1])  # each level reads the one below
    read_seg = math.prod(
        _read_extent(s, t, h) for s, t, h in zip(shape, tiles, seg_halo, strict=True)
    )
    read_filt = math.prod(
        _read_extent(s, t, h) for s, t, h in zip(shape, tiles, f_halo, strict=True)
    )
    # a smoothing segmenter reads the raw image with the filter's halo besides, and
    # filters it again in each pass (the filtered image is never stored)
    read_src = math.prod(
        _read_extent(s, t, h + f) for s, t, h, f in zip(shape, tiles, seg_halo, f_halo, strict=True)
    )
    mode = segmenter.stitch
    view_bytes = 0
    for d, count in pair_counts.items():  # both blocks' views toward each other
        if mode == "faces":
            px = math.prod(t if k == 0 else 1 for t, k in zip(tiles, d, strict=True))
            view_bytes += 2 * count * px * 5  # uint32 labels + uint8 classes
        else:
            px = math.prod(
                t if k == 0 else min(2 * h, t) for t, k, h in zip(tiles, d, seg_halo, strict=True)
            )
            view_bytes += 2 * count * px * 4
    if spec.whole_file:
        ingest_tasks = 1
    elif spec.chunks and spec.chunks[-1] > tiles[-1]:  # strips: full-width bands
        ingest_tasks = math.prod(grid[:-1])
    else:
        ingest_tasks = n
    seg_cost = costs.segment.get(segmenter.name) if costs else None

    def secs(stage: str, px: float) -> float | None:
        if costs is None or stage not in costs.stages:
            return None
        return costs.stages[stage] * px * 1e-9

    def add(*xs: float | None) -> float | None:
        return None if any(x is None for x in xs) else float(sum(x for x in xs if x is not None))

    stages = [Stage("ingest", ingest_tasks, npx * stored_item, npx * item, secs("ingest", npx))]
    if segmenter.has_filter():
        stages.append(Stage("filter", n, read_filt * item, 0, secs("filter", read_filt)))
    stages += [
        Stage("statistics", n, read_filt * item, 0, secs("statistics", npx)),
        Stage(
            "segment",
            n,
            read_src * item,
            npx * 5 + view_bytes,
            seg_cost.ns_per_px * read_seg * 1e-9 if seg_cost else None,
        ),
        Stage(
            "links",  # one task per row of blocks: each block's pairs with its forward ones
            n // grid[-1],
            view_bytes,
            0,
            costs.pairs.get(mode, 0.0) * pairs if costs and mode in costs.pairs else None,
        ),
        Stage("stitch", 0, 0, 0, costs.merge_s_per_block * n if costs else None, client=True),
        # one pass: local ids, semantic labels and image in; instances and panoptic out,
        # and the lower pyramid levels of all four
        Stage(
            "relabel",
            n,
            npx * (4 + 1 + item),
            npx * (4 + 8) + low_px * (item + 1 + 4 + 8),
            add(
                secs("relabel", npx),
                secs("panoptic", npx),
                secs("measure", npx),
                secs("pyramid", 4 * low_px),
            ),
        ),
        Stage(
            "pyramid",
            3 * up_tasks,
            up_read * (item + 1 + 4),
            up_px * (item + 1 + 4),
            secs("pyramid", 3 * up_px),
        ),
        Stage("panoptic", up_tasks, up_read * 8, up_px * 8, secs("pyramid", up_px)),
        Stage("measure", 0, 0, 0, 0.0 if costs else None, client=True),  # merge + tables
    ]
    preview_px = math.prod(_preview_shape(shapes))
    stages.append(Stage("preview", 1, preview_px * (item + 4), 0, 0.0 if costs else None))
    working = seg_cost.working_bytes_per_px if seg_cost else segmenter.working_bytes(ndim)
    peaks = thread_peaks(shape, tiles, segmenter, seg_halo, item, stored_item, working)
    return ImageEstimate(
        name=spec.name,
        path=spec.path,
        shape=tuple(shape),
        dtype=str(spec.out_dtype),
        tile=tiles,
        halo=tuple(seg_halo),
        filter_halo=tuple(f_halo),
        grid=grid,
        blocks=n,
        pairs=pairs,
        levels=len(shapes),
        stages=tuple(stages),
        peak_thread_bytes=peaks,
        disk=image_disk(spec, tiles, segmenter, seg_halo),
    )


def _preview_shape(shapes: Sequence[Sequence[int]], max_size: int = 1024) -> tuple[int, ...]:
    level = next((s for s in shapes if max(s[-2:]) <= max_size), shapes[-1])
    return tuple(level[-2:])


def _image_wall(est: ImageEstimate, slots: int, costs: Costs) -> float | None:
    """One image through the stages alone: each stage waits for all its blocks; a stage
    of T tasks runs in ``ceil(T / slots)`` waves of its mean task time plus the per-task
    overhead; client steps (stitch) as they are."""
    total = 0.0
    for s in est.stages:
        if s.compute_s is None:
            return None
        if s.client or s.tasks == 0:
            total += s.compute_s
            continue
        per_task = s.compute_s / s.tasks + costs.task_overhead_s
        total += math.ceil(s.tasks / slots) * per_task
    return total


def wall_seconds(
    estimates: Sequence[ImageEstimate], *, workers: int, threads: int, costs: Costs
) -> float | None:
    """Estimated wall time of the run on ``workers`` × ``threads`` Dask threads.

    Model, as `segpipe.pipeline.run_images` schedules: images of one block run
    whole in packed tasks, their compute spread over every thread; larger images
    run through the stages (`_image_wall` each), two per thread at once, so their
    walls overlap up to the threads' capacity. The run takes the longer of the
    larger images' overlapped walls and all the compute spread over the threads.
    None if a stage is not calibrated (e.g. a segmenter missing from the table).
    """
    slots = max(1, workers * threads)
    work = 0.0  # compute seconds of every task of every image
    walls = []
    for est in estimates:
        if any(s.compute_s is None for s in est.stages):
            return None
        work += sum(s.compute_s or 0.0 for s in est.stages if not s.client)
        if est.blocks > 1:
            walls.append(_image_wall(est, slots, costs) or 0.0)
        else:
            work += costs.task_overhead_s
    client = sum(s.compute_s or 0.0 for est in estimates for s in est.stages if s.client)
    if len(walls) <= 1:  # one large image (or none): its stages' barriers decide
        return max(sum(walls), work / slots + client) if walls else work / slots + client
    overlapped = sum(walls) / min(len(walls), 2 * slots)
    return max(overlapped, work / slots + client)


def startup_seconds(costs: Costs, *, api: str, cluster: str) -> float | None:
    """Seconds a run spends before its first block and after its last.

    Parameters
    ----------
    costs : Costs
        The calibration table (None is returned if it has no start-up figures).
    api : str
        ``running`` (Prefect's local API, reused), ``stopped``, ``new`` (no database
        yet) or ``remote`` (``PREFECT_API_URL`` names a server: as a running one).
    cluster : str
        ``none`` (one image of one block: in the process), ``local`` (a LocalCluster
        is started and closed) or ``external`` (a running scheduler).
    """
    s = costs.startup
    if s is None:
        return None
    api_s = {
        "running": s.api_running_s,
        "remote": s.api_running_s,
        "stopped": s.api_stopped_s,
        "new": s.api_new_database_s,
    }[api]
    return api_s + (s.local_cluster_s if cluster == "local" else 0.0) + s.flow_and_exit_s


# -- a whole run ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """Every image's plan, the inputs that could not be opened, and the calibration."""

    images: list[ImageEstimate]
    bad: list[tuple[str, str]]
    segmenter: str
    costs: Costs | None
    seconds: float = 0.0  # how long planning took
    totals: dict[str, int] = field(default_factory=dict)

    def wall(self, workers: int, threads: int) -> float | None:
        if self.costs is None:
            return None
        return wall_seconds(self.images, workers=workers, threads=threads, costs=self.costs)

    def disk(self, in_flight: int = 2) -> Disk:
        """The run's `Disk`: every result, and at the peak the scratch of the
        ``in_flight`` images with the most (`run_disk`)."""
        return run_disk([i.disk for i in self.images], in_flight)


def run_disk(images: Sequence[Disk], in_flight: int = 2) -> Disk:
    """A run's `Disk` from its images': every result, and at the peak besides the
    scratch of the ``in_flight`` images that keep the most (scratch goes as each image
    finishes; `segpipe.pipeline` keeps two large images per worker thread in flight)."""
    final = sum(d.final for d in images)
    scratch = sorted((d.scratch for d in images), reverse=True)[: max(in_flight, 1)]
    return Disk(final, final + sum(scratch))


def plan_run(
    config: RunConfig,
    *,
    costs: Costs | None = None,
    calibrate: bool = False,
    workdir: str | Path | None = None,
) -> RunPlan:
    """Open every input's header and plan it; with ``calibrate``, measure the costs on one
    block of the first image first (`measure_costs`), else use ``costs``.

    Raises
    ------
    SegpipeError
        A bad segmenter, or (under ``on_error: fail``) bad inputs, as `segpipe run` would.
    """
    from segpipe.errors import InputsError, SegpipeError
    from segpipe.io.collection import resolve_inputs

    t0 = time.perf_counter()
    config = config.resolved()
    segmenter = get_segmenter(config.segmenter.name, **config.segmenter.options())
    paths = resolve_inputs(config.input, missing_ok=config.on_error == "skip")
    specs: list[SourceSpec] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        try:
            specs.append(
                open_source(
                    p,
                    channel=config.channel,
                    axes=config.axes,
                    series=config.series,
                    level=config.level,
                )
            )
        except SegpipeError as err:
            bad.append((p, str(err)))
    if bad and config.on_error == "fail":
        raise InputsError("\n".join(msg for _, msg in bad))
    halo = None if config.halo == "auto" else config.halo
    if calibrate and specs:
        tile = tile_for(config, specs[0], segmenter)
        costs = measure_costs(
            specs[0], segmenter, tile=tile, halo=halo, workdir=workdir, base=costs
        )
    images = [
        plan_image(
            s,
            tile=tile_for(config, s, segmenter),
            segmenter=segmenter,
            halo=halo,
            costs=costs,
        )
        for s in specs
    ]
    return RunPlan(images, bad, segmenter.name, costs, time.perf_counter() - t0)


# -- measuring the costs -------------------------------------------------------------


def _timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Fastest of ``repeats`` runs (block functions rewrite the same chunks: idempotent)."""
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure_costs(
    spec: SourceSpec,
    segmenter: Segmenter,
    *,
    tile: int | Sequence[int] = 1024,
    halo: int | Sequence[int] | None = None,
    workdir: str | Path | None = None,
    base: Costs | None = None,
    repeats: int = 1,
) -> Costs:
    """Time the pipeline's real block functions on one block of ``spec``, one thread.

    Copies a region of up to 3 tiles per axis of the image into a scratch store
    (reading only those pixels), runs every stage's block function on all its
    blocks (later stages need earlier results) and times them on the middle
    block: ingest (from the image itself), filter, histogram, segment, a pair
    task, relabel (its relabel, panoptic and measure steps apart) and downsample.
    The segmenter's working set is the tracemalloc peak of ``segment()`` on that
    block. Per-task overhead and the stitch cost per block come from ``base``
    when given.

    Returns
    -------
    Costs
        ``stages`` in ns per pixel, ``segment[segmenter.name]``, ``pairs[mode]``.
    """
    import zarr

    from segpipe import image as segpipe_image
    from segpipe import stages, stitch
    from segpipe.io import omezarr
    from segpipe.io.readers import read_region
    from segpipe.panoptic import catalogue_for, choose_divisor
    from segpipe.stages import write as relabel
    from segpipe.stats import Extrema, hist_range, merge_histograms

    ndim = len(spec.shape)
    mode = segmenter.stitch
    tiles = tuple(min(t, s) for t, s in zip(_per_axis(tile, ndim) or (), spec.shape, strict=True))
    own = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="segpipe-calibrate-"))
    try:
        region = tuple(slice(0, min(3 * t, s)) for t, s in zip(tiles, spec.shape, strict=True))
        sub = tuple(r.stop for r in region)
        mid = tuple(min(1, -(-s // t) - 1) for s, t in zip(sub, tiles, strict=True))
        # ingest from the user's own file: its format decides that cost
        src = str(root / "source.zarr")
        zarr.create_array(store=src, shape=sub, chunks=tiles, dtype=spec.out_dtype, fill_value=0)
        for r in stages.ingest.regions(sub, tiles):
            zarr.open_array(src, mode="r+")[r] = read_region(spec, r)
        local = open_source(src, axes="ZYX"[3 - ndim :])
        plan = segpipe_image.ImagePlan(
            local,
            str(root / "out.zarr"),
            tiles,
            segmenter,
            None if halo is None else _per_axis(halo, ndim),
        )
        grid = plan.grid(plan.segment_halo)
        middle = grid.block(mid)
        core_px = math.prod(middle.shape)
        ns: dict[str, float] = {}

        def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
            return _timed(fn, repeats)

        def per_px(stage: str, seconds: float, px: int) -> None:
            ns[stage] = seconds / max(px, 1) * 1e9

        omezarr.create_array(plan.raw, shape=sub, chunks=tiles, dtype=local.out_dtype)
        slabs = plan.slabs
        t_ingest, _ = timed(lambda: stages.ingest.ingest_block(spec, plan.raw, middle.core, slabs))
        parts = [stages.ingest.ingest_block(local, plan.raw, b.core, slabs) for b in plan.grid()]
        per_px("ingest", t_ingest, core_px)
        extrema = Extrema.merge(parts)
        cores = plan.grid()
        if segmenter.has_filter():
            extrema = Extrema.merge([stages.statistics.filter_block(plan, b) for b in cores])
            fb = plan.grid(segmenter.filter_halo(ndim)).block(mid)
            t, _ = timed(lambda: stages.statistics.filter_block(plan, cores.block(mid)))
            per_px("filter", t, math.prod(r.stop - r.start for r in fb.read))
        lo, hi = hist_range(extrema)
        hists = [stages.statistics.histogram_block(plan, b, lo, hi) for b in cores]
        t, _ = timed(lambda: stages.statistics.histogram_block(plan, cores.block(mid), lo, hi))
        per_px("statistics", t, core_px)
        params = dict(segmenter.prepare(merge_histograms(hists, extrema)))
        for kind, dtype in (("semantic", np.uint8),):
            omezarr.create_array(plan.label(kind), shape=sub, chunks=tiles, dtype=dtype)
        omezarr.create_array(
            plan.local_labels, shape=sub, chunks=tiles, dtype=np.uint32, compress=False
        )
        blocks = list(grid)
        pairs = list(grid.neighbour_pairs())
        directions: dict[int, list[tuple[int, ...]]] = {b.id: [] for b in blocks}
        for a, b, d in pairs:
            directions[a.id].append(d)
            directions[b.id].append(tuple(-x for x in d))
        mdir = str(plan.markers("segment").directory)
        counts = [
            stages.segment.segment_block(plan, b, params, directions[b.id], mdir) for b in blocks
        ]
        t_seg, _ = timed(
            lambda: stages.segment.segment_block(plan, middle, params, directions[middle.id], mdir)
        )
        read_px = math.prod(r.stop - r.start for r in middle.read)
        data = stages.statistics.filtered(plan, middle, plan.segment_halo)
        tracemalloc.start()
        try:
            segmenter.segment(data, params)
            working = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        seg = SegmentCost(t_seg / read_px * 1e9, working / read_px)
        edges: list[tuple[int, int, Any]] = []
        pair_times: list[float] = []
        for a, b, d in pairs:
            t0 = time.perf_counter()
            e = stages.stitch.pair_edges(mdir, a.id, b.id, d, mode)
            t = time.perf_counter() - t0
            edges.append((a.id, b.id, e))
            if middle.id in (a.id, b.id):
                pair_times.append(t)
        ids = stitch.global_ids(counts, edges)
        catalogue = catalogue_for(segmenter)
        job = relabel.BlockJob(
            local=plan.local_labels,
            semantic=plan.label("semantic"),
            image=plan.raw,
            instances=plan.label("instances"),
            panoptic=plan.label("panoptic"),
            parts=str(root / "parts"),
            shape=sub,
            divisor=choose_divisor(ids.count),
            catalogue=catalogue,
        )
        omezarr.create_array(plan.label("instances"), shape=sub, chunks=tiles, dtype=ids.dtype)
        omezarr.create_array(job.panoptic, shape=sub, chunks=tiles, dtype=np.uint64, labels=True)
        for b in blocks:
            relabel.relabel_block(job, b.core, b.id, ids.block_lut(b.id))
        lut = ids.block_lut(middle.id)
        steps = np.full(len(relabel.STEPS), np.inf)
        for _ in range(max(1, repeats)):  # each step's fastest
            done = relabel.relabel_block(job, middle.core, middle.id, lut)
            steps = np.minimum(steps, done["seconds"])
        for step, seconds in zip(relabel.STEPS[:3], steps[:3], strict=True):
            per_px(step, float(seconds), core_px)  # its levels (the 4th) are priced as pyramid
        half = tuple(-(-s // 2) for s in sub[-2:])
        small = (*sub[:-2], *half)
        down = str(root / "down")
        omezarr.create_array(down, shape=small, chunks=tiles, dtype=local.out_dtype)
        first = tuple(slice(0, min(t, s)) for t, s in zip(tiles, small, strict=True))
        t, _ = timed(lambda: omezarr.downsample_block(plan.raw, down, first))
        per_px("pyramid", t, math.prod(r.stop for r in first))
        pair_s = float(np.median(pair_times)) if pair_times else 0.0
        where = f"{spec.path}: block {mid} of tile {tiles}, {segmenter.name}, one thread"
        return Costs(
            stages={**(base.stages if base else {}), **ns},
            segment={**(base.segment if base else {}), segmenter.name: seg},
            pairs={**(base.pairs if base else {}), mode: pair_s},
            task_overhead_s=base.task_overhead_s if base else 0.0,
            merge_s_per_block=base.merge_s_per_block if base else 0.0,
            source=where,
            startup=base.startup if base else None,
        )
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)

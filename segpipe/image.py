"""One image in the output store: where each of its arrays, markers and tables lives.

`ImagePlan` is the only place that spells the store's paths for an image; stages,
the lifecycle and the engine ask it. Nothing here submits a task or reads pixels.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from segpipe.blocks import BlockGrid
from segpipe.config import VIEWER_CHUNK, viewer_inner
from segpipe.errors import ConfigError
from segpipe.io import omezarr, storage
from segpipe.io.markers import Markers
from segpipe.io.readers import SourceSpec
from segpipe.io.storage import Location
from segpipe.segmenters.base import Segmenter

__all__ = [
    "MAX_CHUNK_BYTES",
    "ImagePlan",
    "ImageResult",
    "ProgressFn",
    "SlabJob",
    "bookkeeping",
    "check_tile",
    "noop",
    "owned",
    "span",
    "where",
]

ProgressFn = Callable[[str, int, int], None]
MAX_CHUNK_BYTES = 2**31 - 1  # what numcodecs' Blosc encodes in one call


def noop(stage: str, done: int, total: int) -> None:
    """A progress callback that reports nowhere."""


def _internal(root: str, kind: str, name: str) -> Location:
    """``OUT/_segpipe/<kind>/<name>``: what segpipe keeps of an image beside its group."""
    return storage.location(storage.join(root, omezarr.SCRATCH, kind, name))


def bookkeeping(root: str, name: str) -> list[Location]:
    """Image ``name``'s scratch data and block markers under ``root``: what it keeps only
    while it runs."""
    return [_internal(root, "scratch", name), _internal(root, "blocks", name)]


def owned(root: str, name: str) -> list[Location]:
    """Every path of the store that image ``name`` owns: its group, scratch data,
    markers, provenance table and manifest."""
    return [
        storage.location(storage.join(root, name)),
        *bookkeeping(root, name),
        _internal(root, "provenance", f"{name}.parquet"),
        _internal(root, "manifests", f"{name}.npz"),
    ]


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
class SlabJob:
    """Where ingest tasks leave each block's outer layers for the filter (`segpipe.halo`)."""

    directory: str
    grid: BlockGrid  # the blocks (tiles); ids as every stage numbers them
    halo: tuple[int, ...]


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
    viewer_chunk: int | tuple[int, ...] | None = VIEWER_CHUNK  # `RunConfig.viewer_chunk`
    work: str | None = None
    """Where the image's markers and scratch go while it runs: None, inside the store
    (``OUT/_segpipe/``, where a resumed run finds them); otherwise a local folder of
    the process that runs every stage of it (`segpipe.pipeline.run_pack`)."""

    def __post_init__(self) -> None:
        check_tile(self.spec, self.tile)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ndim(self) -> int:
        return len(self.spec.shape)

    @property
    def inner(self) -> tuple[int, ...] | None:
        """Inner chunks of the sharded result arrays; None: unsharded."""
        return viewer_inner(self.viewer_chunk, self.ndim)

    @property
    def group(self) -> str:
        return storage.join(self.root, self.name)

    @property
    def raw(self) -> str:
        return storage.join(self.group, "0")

    def label(self, kind: str, level: int = 0) -> str:
        return storage.join(self.group, "labels", kind, str(level))

    @property
    def work_root(self) -> str:
        """The root its markers and scratch lie under: ``work``, or the store."""
        return self.work or self.root

    @property
    def scratch(self) -> str:
        return str(_internal(self.work_root, "scratch", self.name))

    @property
    def provenance(self) -> Location:
        """Table of where and how each segment block ran (kept after the run)."""
        return _internal(self.root, "provenance", f"{self.name}.parquet")

    def markers(self, stage: str) -> Markers:
        """Completion markers of ``stage`` for this image."""
        return Markers(self.blocks / stage)

    @property
    def blocks(self) -> Location:
        """The folder of every stage's completion markers for this image."""
        return _internal(self.work_root, "blocks", self.name)

    @property
    def manifest(self) -> Location:
        """What the completed image holds: every file with its size and checksum."""
        return _internal(self.root, "manifests", f"{self.name}.npz")

    @property
    def slabs(self) -> SlabJob | None:
        """Where ingest saves the blocks' outer layers for the filter, as wide as the
        filter's halo and the segmenter's together (the segment stage filters its block
        and halo again); None without a filter, or for an image of one block, which
        has no neighbour to read them."""
        if not self.segmenter.has_filter() or len(self.grid()) == 1:
            return None
        width = self.segmenter.filter_halo(self.ndim)
        wide = tuple(f + h for f, h in zip(width, self.segment_halo, strict=True))
        return SlabJob(storage.join(self.scratch, "slabs"), self.grid(), wide)

    @property
    def local_labels(self) -> str:
        return storage.join(self.scratch, "local")

    @property
    def segment_halo(self) -> tuple[int, ...]:
        return self.halo if self.halo is not None else self.segmenter.halo(self.ndim)

    def grid(self, halo: Sequence[int] | int = 0) -> BlockGrid:
        return BlockGrid.build(self.spec.shape, tile=self.tile, halo=halo)


@dataclass
class ImageResult:
    name: str
    shape: tuple[int, ...]
    objects: int
    seconds: float
    stages: dict[str, float]
    status: str = "done"
    """``done``, ``repaired`` (complete, but files were damaged), or ``unchanged``."""

    @property
    def mpx_per_s(self) -> float:
        return math.prod(self.shape) / 1e6 / max(self.seconds, 1e-9)


def span(region: tuple[slice, ...]) -> str:
    """``"0:256, 512:768"``: a region as it is named in messages."""
    return ", ".join(f"{s.start}:{s.stop}" for s in region)


def where(plan: ImagePlan, region: tuple[slice, ...]) -> str:
    """``"<input> [0:256, 512:768]"``: a block of an image as messages name it."""
    return f"{plan.spec.path} [{span(region)}]"

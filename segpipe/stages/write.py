"""Stage write: the relabel pass, then the pyramids and their NGFF metadata.

One task per block turns its local labels into every label output: level 0
of ``labels/instances`` (through its slice of the lookup table) and of
``labels/panoptic``, its part of the lower levels of all four pyramids, and
per-object sums for the tables (objects wholly inside the block go to
scratch; those that may continue in another block come back in its marker,
for the measure stage to merge). Each array is read once and swept once
(`segpipe.kernels`). Levels above those the pass writes are strided, one
task per output chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe import kernels, measure, panoptic
from segpipe.blocks import Pyramid
from segpipe.engine import Lazy, Runner, map_blocks, prepare_array
from segpipe.errors import ConfigError, UnsupportedImageError
from segpipe.image import ImagePlan, ProgressFn, noop, span
from segpipe.io import omezarr, storage
from segpipe.io.markers import Arrays, Markers
from segpipe.io.storage import Location
from segpipe.merge import MergedIds
from segpipe.panoptic import Catalogue
from segpipe.stages.ingest import regions
from segpipe.stitch import GlobalIds

__all__ = [
    "PARTS",
    "STAGE",
    "STEPS",
    "BlockJob",
    "Relabelled",
    "build_pyramid",
    "parts_dir",
    "pyramid",
    "relabel",
    "relabel_block",
    "relabelled",
    "write_levels",
    "written_levels",
]

STAGE = "relabel"
PARTS = "relabel-parts"
# the parts of a task's time it reports; "write": the pyramid levels it writes
STEPS = ("relabel", "panoptic", "measure", "write")


@dataclass(frozen=True)
class BlockJob:
    """What one relabel task needs besides its lookup table (all paths absolute)."""

    local: str
    semantic: str
    image: str
    instances: str
    panoptic: str
    parts: str
    shape: tuple[int, ...]
    divisor: int
    catalogue: Catalogue
    levels: tuple[tuple[str, str, str, str], ...] = ()
    """Levels 1, 2, ... written from the block: paths of image, semantic, instances, panoptic."""
    pyramid: Pyramid | None = None


def pyramid(plan: ImagePlan) -> Pyramid:
    """The image's pyramid levels (as every label image has them)."""
    return Pyramid.build(plan.spec.shape, plan.grid().tile)


def written_levels(plan: ImagePlan) -> int:
    """`segpipe.blocks.Pyramid.pass_levels` of ``plan``'s pyramid and tile."""
    return pyramid(plan).pass_levels(plan.grid().tile)


def relabel_block(
    job: BlockJob, region: tuple[slice, ...], block_id: int, lut: NDArray[np.unsignedinteger]
) -> Arrays:
    """Write instances and panoptic level 0 of ``region`` and its part of the lower
    levels of the four pyramids (``job.levels``), save the sums of objects wholly
    inside it; return its open object groups, its unassigned thing pixels and the
    seconds of each step, as the arrays of its marker."""
    t0 = time.perf_counter()
    local = omezarr.read_block(job.local, region)
    instances = kernels.lookup(local, lut)
    omezarr.write_block(job.instances, region, instances)
    t1 = time.perf_counter()
    semantic = omezarr.read_block(job.semantic, region)
    cat = job.catalogue
    encoded = kernels.panoptic(semantic, instances, job.divisor, cat.thing_lut(), cat.known_lut())
    if encoded is None:  # a class outside the catalogue: encode() says which
        try:
            panoptic.encode(semantic, instances, divisor=job.divisor, catalogue=cat)
        except ConfigError as err:
            raise ConfigError(f"{job.semantic}: {err}") from err
        raise AssertionError("kernels.panoptic and panoptic.encode disagree")  # pragma: no cover
    omezarr.write_block(job.panoptic, region, encoded[0])
    t2 = time.perf_counter()
    offset = [s.start for s in region]
    image = omezarr.read_block(job.image, region)
    try:
        groups = measure.local_groups(local, lut, semantic, image, offset=offset)
    except UnsupportedImageError as err:
        raise UnsupportedImageError(f"{job.instances} [{span(region)}]: {err}") from err
    open_groups = measure.keep_closed(
        groups, instances, region, job.shape, job.catalogue.stuff, job.parts, block_id
    )
    t3 = time.perf_counter()
    level: tuple[NDArray[Any], ...] = (image, semantic, instances, encoded[0])
    for k, paths in enumerate(job.levels, start=1):  # every second pixel (nearest) along
        # the axes level k halves, strided from the level below as downsample_block does
        assert job.pyramid is not None
        every = tuple(slice(None, None, f) for f in job.pyramid.steps[k])
        level = tuple(np.ascontiguousarray(a[every]) for a in level)
        for path, data in zip(paths, level, strict=True):
            omezarr.write_block(path, job.pyramid.region(region, k), data)
    t4 = time.perf_counter()
    arrays = measure.groups_out(open_groups)
    arrays["unassigned"] = np.array(encoded[1], np.int64)
    arrays["seconds"] = np.array([t1 - t0, t2 - t1, t3 - t2, t4 - t3], np.float64)
    return arrays


@dataclass(frozen=True)
class Relabelled:
    """What the relabel pass leaves: the panoptic divisor and, per block, its marker
    (open groups, unassigned pixels, seconds per step).

    ``results`` holds the markers' arrays when the pass ran in this process (a block's
    marker takes ~1.7 ms to read back, and three steps read them all); else each is
    read from ``markers`` when asked for.
    """

    divisor: int
    markers: Markers
    blocks: int
    results: Sequence[Arrays] | None = field(default=None, repr=False)

    def _block(self, i: int) -> Arrays:
        return self.results[i] if self.results is not None else self.markers.load(i)

    def open_groups(self) -> list[measure.Groups]:
        return [measure.groups_in(self._block(i)) for i in range(self.blocks)]

    def unassigned(self) -> int:
        return sum(int(self._block(i)["unassigned"]) for i in range(self.blocks))

    def step_seconds(self) -> dict[str, float]:
        """Seconds of compute per step, summed over the blocks."""
        total = np.zeros(len(STEPS))
        for i in range(self.blocks):
            total += self._block(i)["seconds"]
        return dict(zip(STEPS, total.tolist(), strict=True))


def _as_is(arrays: Arrays) -> Arrays:
    return arrays


def relabelled(plan: ImagePlan, count: int) -> Relabelled:
    """The result of the relabel pass for an image of ``count`` instances, read back
    from its markers (by a later Prefect task)."""
    return Relabelled(
        panoptic.choose_divisor(count), plan.markers(STAGE), sum(1 for _ in plan.grid())
    )


def parts_dir(plan: ImagePlan) -> Location:
    """Where relabel tasks leave the sums of objects wholly inside their block."""
    return storage.location(storage.join(plan.scratch, PARTS))


def relabel(
    client: Runner,
    plan: ImagePlan,
    ids: MergedIds | GlobalIds,
    catalogue: Catalogue,
    progress: ProgressFn | None = None,
) -> Relabelled:
    """Run the relabel pass over every block of ``plan`` (resumable by its markers).

    Parameters
    ----------
    client : distributed.Client
        The cluster.
    plan : ImagePlan
        An image whose segment and stitch stages have run.
    ids : MergedIds or GlobalIds
        Global ids per block (`segpipe.stages.stitch.stitch_ids`).
    catalogue : Catalogue
        The run's classes (decide panoptic values and stuff segments).
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    Relabelled
    """

    divisor = panoptic.choose_divisor(ids.count)
    tile = plan.grid().tile
    markers = plan.markers(STAGE)
    shape = plan.spec.shape
    # the panoptic levels carry their divisor and classes from the start, so that the
    # panoptic stage, setting them again, finds nothing to write (`attrs.change`)
    value = {"segpipe": {panoptic.KEY: panoptic.attrs_value(divisor, catalogue)}}
    arrays = [  # (path of level k, dtype, is labels, attributes)
        (lambda k: storage.join(plan.group, str(k)), plan.spec.out_dtype, False, None),
        (lambda k: plan.label("semantic", k), np.uint8, True, None),
        (lambda k: plan.label("instances", k), ids.dtype, True, None),
        (lambda k: plan.label(panoptic.KEY, k), np.uint64, True, value),
    ]
    for path, dtype, _, attributes in arrays[2:]:
        prepare_array(
            path(0),
            markers,
            shape=shape,
            chunks=tile,
            dtype=dtype,
            inner=plan.inner,
            attributes=attributes,
        )
    levels_of = pyramid(plan)
    levels = levels_of.pass_levels(tile)
    for k in range(1, levels + 1):  # chunks of tile / factor: each block writes whole chunks
        chunks = tuple(t // f for t, f in zip(tile, levels_of.factor(k), strict=True))
        for path, dtype, labels, attributes in arrays:
            prepare_array(
                path(k),
                markers,
                shape=levels_of.shapes[k],
                chunks=chunks,
                dtype=dtype,
                labels=labels,
                inner=plan.inner,
                attributes=attributes,
            )
    job = BlockJob(
        local=plan.local_labels,
        semantic=plan.label("semantic"),
        image=plan.raw,
        instances=plan.label("instances"),
        panoptic=plan.label(panoptic.KEY),
        parts=str(parts_dir(plan)),
        shape=tuple(shape),
        divisor=divisor,
        catalogue=catalogue,
        levels=tuple(
            (arrays[0][0](k), arrays[1][0](k), arrays[2][0](k), arrays[3][0](k))
            for k in range(1, levels + 1)
        ),
        pyramid=levels_of,
    )
    blocks = list(plan.grid())
    results = map_blocks(
        client,
        relabel_block,
        Lazy(
            len(blocks), lambda i: (job, blocks[i].core, blocks[i].id, ids.block_lut(blocks[i].id))
        ),
        stage=STAGE,
        progress=progress or noop,
        markers=markers,
        run=plan.token,
        codec=(_as_is, _as_is),
        names=[f"{plan.label('instances')} [{span(b.core)}]" for b in blocks],
    )
    return Relabelled(divisor, markers, len(blocks), results)


def build_pyramid(
    client: Runner,
    plan: ImagePlan,
    arrays: Sequence[tuple[Callable[[int], str], Any, bool]],
    shapes: Sequence[Sequence[int]],
    *,
    stage: str,
    progress: ProgressFn = noop,
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
                path(k),
                markers,
                shape=shapes[k],
                chunks=tile,
                dtype=dtype,
                labels=labels,
                inner=plan.inner,
            )
            jobs += [(path(k - 1), path(k), r) for r in regions(shapes[k], tile)]
        map_blocks(
            client,
            omezarr.downsample_block,
            jobs,
            stage=f"{stage}-{k}",
            progress=progress,
            markers=markers,
            run=plan.token,
        )


def write_levels(client: Runner, plan: ImagePlan, dtype: Any, progress: ProgressFn = noop) -> int:
    """After the relabel pass: the pyramid levels above those it wrote (of the
    image, semantic and ``dtype`` instance labels) and their NGFF metadata (the
    ``labels`` list that names them is the panoptic stage's); the level count."""

    levels_of = pyramid(plan)
    sources = {
        "image": lambda k: storage.join(plan.group, str(k)),
        "semantic": lambda k: plan.label("semantic", k),
        "instances": lambda k: plan.label("instances", k),
    }
    dtypes = {"image": plan.spec.out_dtype, "semantic": np.uint8, "instances": dtype}
    build_pyramid(
        client,
        plan,
        [(sources[kind], dtypes[kind], kind != "image") for kind in sources],
        levels_of.shapes,
        stage="pyramid",
        progress=progress,
        start=written_levels(plan) + 1,
    )
    pixel = plan.spec.pixel
    omezarr.write_image_metadata(plan.group, pyramid=levels_of, name=plan.name, pixel=pixel)
    classes = plan.segmenter.classes
    omezarr.write_label_group_metadata(
        storage.join(plan.group, "labels", "semantic"),
        pyramid=levels_of,
        name="semantic",
        properties=[{"label-value": i, "class": c} for i, c in enumerate(classes)],
        colors=omezarr.rgba(range(len(classes))),
        pixel=pixel,
    )
    omezarr.write_label_group_metadata(
        storage.join(plan.group, "labels", "instances"),
        pyramid=levels_of,
        name="instances",
        pixel=pixel,
    )
    return len(levels_of)

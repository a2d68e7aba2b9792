"""The relabel pass: one task per block turns its local labels into every label output.

From a block's local labels (scratch), its semantic labels and the image, each
task writes level 0 of ``labels/instances`` (global ids) and of
``labels/panoptic``, and reduces the block to per-object statistics for the
tables. Separate relabel, panoptic and measure passes read these arrays three
times and sorted every pixel; here each is read once and swept once
(`segpipe.kernels`). Objects wholly inside the block go to scratch; those that
may continue in another block come back in the block's marker, for
`segpipe.measure.write_tables` to merge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from numpy.typing import NDArray

from segpipe import kernels, measure, panoptic
from segpipe.errors import ConfigError, UnsupportedImageError
from segpipe.io.markers import Arrays, Markers
from segpipe.panoptic import Catalogue

if TYPE_CHECKING:
    from segpipe.merge import MergedIds
    from segpipe.pipeline import ImagePlan, ProgressFn
    from segpipe.stitch import GlobalIds

STAGE = "relabel"
PARTS = "relabel-parts"
STEPS = ("relabel", "panoptic", "measure")  # the parts of a task's time it reports


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


def _read(path: str, region: tuple[slice, ...]) -> NDArray[Any]:
    return np.asarray(zarr.open_array(path, mode="r")[region])


def relabel_block(
    job: BlockJob, region: tuple[slice, ...], block_id: int, lut: NDArray[np.unsignedinteger]
) -> Arrays:
    """Write instances and panoptic level 0 of ``region``; return the block's open
    object groups, its unassigned thing pixels and the seconds of each step, as the
    arrays of its marker."""
    t0 = time.perf_counter()
    local = _read(job.local, region)
    instances = lut[local]
    zarr.open_array(job.instances, mode="r+")[region] = instances
    t1 = time.perf_counter()
    semantic = _read(job.semantic, region)
    cat = job.catalogue
    encoded = kernels.panoptic(semantic, instances, job.divisor, cat.thing_lut(), cat.known_lut())
    if encoded is None:  # a class outside the catalogue: encode() says which
        try:
            panoptic.encode(semantic, instances, divisor=job.divisor, catalogue=cat)
        except ConfigError as err:
            raise ConfigError(f"{job.semantic}: {err}") from err
        raise AssertionError("kernels.panoptic and panoptic.encode disagree")  # pragma: no cover
    zarr.open_array(job.panoptic, mode="r+")[region] = encoded[0]
    t2 = time.perf_counter()
    offset = [s.start for s in region]
    try:
        groups = measure.local_groups(local, lut, semantic, _read(job.image, region), offset=offset)
    except UnsupportedImageError as err:
        from segpipe.pipeline import span

        raise UnsupportedImageError(f"{job.instances} [{span(region)}]: {err}") from err
    open_groups = measure.keep_closed(
        groups, instances, region, job.shape, job.catalogue.stuff, job.parts, block_id
    )
    t3 = time.perf_counter()
    arrays = measure.groups_out(open_groups)
    arrays["unassigned"] = np.array(encoded[1], np.int64)
    arrays["seconds"] = np.array([t1 - t0, t2 - t1, t3 - t2], np.float64)
    return arrays


@dataclass(frozen=True)
class Relabelled:
    """What the relabel pass leaves: the panoptic divisor and, per block, its marker
    (open groups, unassigned pixels, seconds per step)."""

    divisor: int
    markers: Markers
    blocks: int

    def open_groups(self) -> list[measure.Groups]:
        return [measure.groups_in(self.markers.load(i)) for i in range(self.blocks)]

    def unassigned(self) -> int:
        return sum(int(self.markers.load(i)["unassigned"]) for i in range(self.blocks))

    def step_seconds(self) -> dict[str, float]:
        """Seconds of compute per step, summed over the blocks."""
        total = np.zeros(len(STEPS))
        for i in range(self.blocks):
            total += self.markers.load(i)["seconds"]
        return dict(zip(STEPS, total.tolist(), strict=True))


def _as_is(arrays: Arrays) -> Arrays:
    return arrays


def relabelled(plan: ImagePlan, count: int) -> Relabelled:
    """The result of the relabel pass for an image of ``count`` instances, read back
    from its markers (by a later Prefect task)."""
    return Relabelled(
        panoptic.choose_divisor(count), plan.markers(STAGE), sum(1 for _ in plan.grid())
    )


def parts_dir(plan: ImagePlan) -> Path:
    """Where relabel tasks leave the sums of objects wholly inside their block."""
    return Path(plan.scratch) / PARTS


def relabel(
    client: Any,
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
        Global ids per block (`segpipe.pipeline.stitch_ids`).
    catalogue : Catalogue
        The run's classes (decide panoptic values and stuff segments).
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    Relabelled
    """
    from segpipe import pipeline

    divisor = panoptic.choose_divisor(ids.count)
    tile = plan.grid().tile
    markers = plan.markers(STAGE)
    shape = plan.spec.shape
    for path, dtype in (
        (plan.label("instances"), ids.dtype),
        (plan.label(panoptic.KEY), np.uint64),
    ):
        pipeline.prepare_array(path, markers, shape=shape, chunks=tile, dtype=dtype)
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
    )
    blocks = list(plan.grid())
    pipeline.map_blocks(
        client,
        relabel_block,
        pipeline.Lazy(
            len(blocks), lambda i: (job, blocks[i].core, blocks[i].id, ids.block_lut(blocks[i].id))
        ),
        stage=STAGE,
        progress=progress or pipeline._noop,
        markers=markers,
        run=plan.token,
        codec=(_as_is, _as_is),
        names=[f"{plan.label('instances')} [{pipeline.span(b.core)}]" for b in blocks],
    )
    return Relabelled(divisor, markers, len(blocks))

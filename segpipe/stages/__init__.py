"""The stages of one image, in order: the one table the engine, the flow and the plan read.

Each stage is a module holding its block function(s) and its driver. A driver
takes the cluster, the image's `ImageRun` (what earlier stages handed on) and
a progress callback, and leaves its result on the run. A stage marked
``beside`` needs only what the stages before it wrote: it runs alongside the
stages after it (the preview needs the pyramids, not the tables).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from segpipe.engine import Runner
from segpipe.image import ImagePlan, ProgressFn
from segpipe.merge import MergedIds
from segpipe.panoptic import Catalogue
from segpipe.stages import ingest, measure, panoptic, preview, segment, statistics, stitch, write
from segpipe.stages.segment import Segmented
from segpipe.stages.write import Relabelled
from segpipe.stats import Extrema, ImageStats

__all__ = ["STAGES", "ImageRun", "Stage", "names"]


@dataclass
class ImageRun:
    """One image on its way through the stages: each leaves its result here."""

    plan: ImagePlan
    catalogue: Catalogue
    raw: Extrema | None = None
    stats: ImageStats | None = None
    segmented: Segmented | None = None
    ids: MergedIds | None = None
    relabelled: Relabelled | None = None
    preview: str = ""
    times: dict[str, float] = field(default_factory=dict)
    marks: dict[str, Any] = field(default_factory=dict)
    """Attributes the image group records with its completion (`lifecycle.finish`)."""

    def need(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"{self.plan.name}: stage order broken, no {name} yet")
        return value


@dataclass(frozen=True)
class Stage:
    """A stage: its name, its driver, and whether it runs beside the stages after it."""

    name: str
    run: Callable[[Runner, ImageRun, ProgressFn], None]
    beside: bool = False

    def __call__(self, client: Runner, run: ImageRun, progress: ProgressFn) -> None:
        t = time.perf_counter()
        self.run(client, run, progress)
        run.times[self.name] = run.times.get(self.name, 0.0) + time.perf_counter() - t


def _ingest(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    run.raw = ingest.ingest(client, run.plan, progress)


def _statistics(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    run.stats = statistics.statistics(client, run.plan, run.need("raw"), progress)


def _segment(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    run.segmented = segment.segment(client, run.plan, run.need("stats"), progress)


def _stitch(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    run.ids = stitch.stitch_ids(client, run.plan, run.need("segmented"), progress)


def _write(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    # the relabel pass also does the panoptic and measure stages' block work: its wall
    # time is shared out among them in proportion to its tasks' compute in each
    t = time.perf_counter()
    ids = run.need("ids")
    run.relabelled = write.relabel(client, run.plan, ids, run.catalogue, progress)
    wall = time.perf_counter() - t
    steps = run.relabelled.step_seconds()
    busy = sum(steps.values()) or 1.0
    for step, seconds in steps.items():
        if step != "write":
            run.times[step] = run.times.get(step, 0.0) + wall * seconds / busy
    write.write_levels(client, run.plan, ids.dtype, progress)
    run.times["write"] = run.times.get("write", 0.0) - sum(
        wall * steps[s] / busy for s in write.STEPS[:3]
    )


def _panoptic(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    ids = run.need("ids")
    panoptic.panoptic(client, run.plan, ids.count, run.catalogue, progress, run.relabelled)


def _measure(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    done = measure.measure(
        run.plan, run.need("ids").count, run.catalogue, run.relabelled, record=False
    )
    run.marks["tables"] = done.info


def _preview(client: Runner, run: ImageRun, progress: ProgressFn) -> None:
    run.preview = preview.write_preview(client, run.plan, progress, record=False)
    run.marks["previews"] = preview.recorded(run.plan)


STAGES: tuple[Stage, ...] = (
    Stage("ingest", _ingest),
    Stage("statistics", _statistics),
    Stage("segment", _segment),
    Stage("stitch", _stitch),
    Stage("write", _write),
    Stage("preview", _preview, beside=True),
    Stage("panoptic", _panoptic),
    Stage("measure", _measure),
)
"""The stages of one image, in the order they start."""


def names() -> tuple[str, ...]:
    """The stage names in order."""
    return tuple(s.name for s in STAGES)

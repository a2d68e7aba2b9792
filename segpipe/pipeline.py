"""Images through the stage table (`segpipe.stages.STAGES`) on a Dask cluster, without Prefect.

`run_image` takes one image from `segpipe.lifecycle.begin` to
`segpipe.lifecycle.finish`. `run_images` keeps several images in flight at
once, so their stages overlap (one image ingests while another segments) and
the cluster stays busy across the barriers each image needs for its own
whole-image statistics; memory is bounded by the images in flight, not by
the collection. The Prefect flow and the benchmarks call these rather than
spelling the stages out.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from distributed import Client

from segpipe import lifecycle, panoptic
from segpipe.engine import output_error
from segpipe.errors import SegpipeError
from segpipe.image import ImagePlan, ImageResult, ProgressFn, noop
from segpipe.io.store import mark_image
from segpipe.stages import STAGES, ImageRun

__all__ = ["MAX_WAVES", "Outcome", "images_in_flight", "run_image", "run_images", "waves"]


def run_image(
    client: Client, plan: ImagePlan, progress: ProgressFn = noop, *, full: bool = False
) -> ImageResult:
    """Segment one image through every stage, resuming what an earlier run left.

    Parameters
    ----------
    client : distributed.Client
        The cluster.
    plan : ImagePlan
        The image and where its results go.
    progress : callable, optional
        ``progress(stage, done, total)`` as blocks finish.
    full : bool
        Recompute it even if it is complete from an unchanged input.

    Returns
    -------
    ImageResult
        Its object count, seconds and seconds per stage; ``status`` is
        ``unchanged`` (and the stages ``{"skipped": 1}``) for an image complete
        from an unchanged input, ``repaired`` for one computed again because
        files of its result were missing or damaged.
    """
    t0 = time.perf_counter()
    if full and os.path.isdir(plan.group):
        mark_image(plan.group, source=None)  # forget the input it was made from
    start = lifecycle.begin(plan)
    if start == "done":
        return lifecycle.completed_result(plan)
    catalogue = plan.catalogue or panoptic.catalogue_for(plan.segmenter)
    run = ImageRun(plan, catalogue)
    with ThreadPoolExecutor(1, thread_name_prefix="segpipe-beside") as pool:
        beside = []
        for stage in STAGES:
            if stage.beside:
                beside.append(pool.submit(stage, client, run, progress))
            else:
                stage(client, run, progress)
        for future in beside:
            future.result()
    ids = run.need("ids")
    result = ImageResult(
        plan.name,
        plan.spec.shape,
        ids.count,
        time.perf_counter() - t0,
        run.times,
        "repaired" if start == "repair" else "done",
    )
    lifecycle.finish(plan, result, run.need("stats"), run.need("segmented").params)
    return result


@dataclass(frozen=True)
class Outcome:
    """What became of one image of a collection: its result, or why it failed."""

    plan: ImagePlan
    result: ImageResult | None
    error: str = ""


MAX_WAVES = 24
"""Waves a collection is split into at most: one Prefect task run each."""


def waves(n: int, *, most: int = MAX_WAVES) -> list[range]:
    """Split ``n`` images into at most ``most`` consecutive waves of near-equal size.

    >>> [list(w) for w in waves(5, most=2)]
    [[0, 1], [2, 3, 4]]
    """
    count = min(n, most)
    return [range(n * k // count, n * (k + 1) // count) for k in range(count)]


def images_in_flight(client: Client) -> int:
    """How many images to keep in flight: two per worker thread (so one image's barrier
    never leaves a thread idle), at least 2."""
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
    return max(2, 2 * threads)


def _one_line(err: BaseException) -> str:
    if isinstance(err, SegpipeError):
        return str(err)
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text}"


def run_images(
    client: Client,
    plans: Sequence[ImagePlan],
    *,
    progress: Callable[[ImagePlan], ProgressFn] = lambda plan: noop,
    done: Callable[[Outcome], None] = lambda outcome: None,
    skip: bool = False,
    full: bool = False,
    in_flight: int | None = None,
) -> list[Outcome]:
    """Segment ``plans`` with up to ``in_flight`` images at once; outcomes in order.

    Parameters
    ----------
    client : distributed.Client
        The cluster.
    plans : sequence of ImagePlan
        The images.
    progress : callable
        ``progress(plan)`` gives the block progress callback of an image.
    done : callable
        Called with each image's `Outcome` as it ends (from a worker thread).
    skip : bool
        An image that fails (whatever the exception) is recorded and the others go
        on; otherwise the first failure is raised once the images in flight end.
    full : bool
        Recompute images complete from unchanged inputs too.
    in_flight : int, optional
        Images at once (default `images_in_flight`).

    Returns
    -------
    list of Outcome
    """

    def one(plan: ImagePlan) -> Outcome:
        try:
            try:
                outcome = Outcome(plan, run_image(client, plan, progress(plan), full=full))
            except OSError as err:
                raise output_error(err, plan.name) from err
        except Exception as err:
            if not skip:
                raise
            problem = _one_line(err)
            with contextlib.suppress(Exception):  # the disk that failed it, perhaps
                lifecycle.record_failure(plan, problem)
            outcome = Outcome(plan, None, problem)
        done(outcome)
        return outcome

    width = in_flight or images_in_flight(client)
    with ThreadPoolExecutor(width, thread_name_prefix="segpipe-image") as pool:
        futures: list[Future[Outcome]] = [pool.submit(one, plan) for plan in plans]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            raise failed[0].exception()  # type: ignore[misc]
        return [f.result() for f in futures]

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
import dataclasses
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from distributed import Client, as_completed

from segpipe import lifecycle, panoptic
from segpipe.engine import WINDOW, Inline, Runner, gpu_resources, output_error
from segpipe.errors import ConfigError, SegpipeError
from segpipe.image import ImagePlan, ImageResult, ProgressFn, noop
from segpipe.io import markers, storage, store
from segpipe.io.store import mark_image
from segpipe.stages import STAGES, ImageRun
from segpipe.stages.statistics import keeping_filtered

__all__ = [
    "MAX_WAVES",
    "PACK_PIXELS",
    "STALE_WORK",
    "WAVE_IMAGES",
    "WORK_FREE",
    "WORK_PREFIX",
    "Outcome",
    "drop_stale_work",
    "images_in_flight",
    "packs",
    "run_image",
    "run_images",
    "run_pack",
    "waves",
    "work_folder",
]


def run_image(
    client: Runner,
    plan: ImagePlan,
    progress: ProgressFn = noop,
    *,
    full: bool = False,
    overlap: bool = True,
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
    overlap : bool
        Run the stages marked ``beside`` in a thread of their own, alongside the
        stages after them; otherwise in order, in this thread.

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
            if stage.beside and overlap:
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
    lifecycle.finish(plan, result, run.need("stats"), run.need("segmented").params, marks=run.marks)
    return result


@dataclass(frozen=True)
class Outcome:
    """What became of one image of a collection: its result, or why it failed."""

    plan: ImagePlan
    result: ImageResult | None
    error: str = ""


MAX_WAVES = 24
"""Waves a collection is split into at most: one Prefect task run each."""


WAVE_IMAGES = 32
"""Images a wave holds at least (when there are that many): a wave is where the
pipeline drains, so it must hold enough to keep every worker thread busy."""


def waves(n: int, *, most: int = MAX_WAVES, least: int = WAVE_IMAGES) -> list[range]:
    """Split ``n`` images into at most ``most`` consecutive waves of near-equal size, each
    of at least ``least`` images where ``n`` allows.

    >>> [len(w) for w in waves(100, most=2)]
    [50, 50]
    >>> [len(w) for w in waves(40)]
    [40]
    """
    count = max(1, min(most, n // least)) if n else 0
    return [range(n * k // count, n * (k + 1) // count) for k in range(count)]


def _threads(client: Client) -> int:
    """Worker threads of the cluster now."""
    return sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())


def images_in_flight(client: Client) -> int:
    """How many images to keep in flight: two per worker thread (so one image's barrier
    never leaves a thread idle), at least 2."""
    return max(2, 2 * _threads(client))


def _one_line(err: BaseException) -> str:
    if isinstance(err, SegpipeError):
        return str(err)
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text}"


PACK_PIXELS = 1 << 22
"""Pixels of small images one task carries at most (a 2048² block's worth)."""


def _attempt(
    runner: Runner,
    plan: ImagePlan,
    progress: ProgressFn,
    *,
    skip: bool,
    full: bool,
    overlap: bool = True,
) -> Outcome:
    """`run_image` of ``plan``; under ``skip`` a failure (whatever the exception) is
    recorded on the image and returned instead of raised."""
    try:
        try:
            return Outcome(plan, run_image(runner, plan, progress, full=full, overlap=overlap))
        except OSError as err:
            if (mapped := output_error(err, plan.name)) is None:
                raise
            raise mapped from err
    except Exception as err:
        if not skip:
            raise
        problem = _one_line(err)
        with contextlib.suppress(Exception):  # the disk that failed it, perhaps
            lifecycle.record_failure(plan, problem)
        return Outcome(plan, None, problem)


def run_pack(plans: Sequence[ImagePlan], *, skip: bool, full: bool) -> list[Outcome]:
    """Whole images, one after another, every stage in this process (`segpipe.engine.Inline`):
    the task that carries small images, so each costs no scheduler round trip per stage,
    and each image is smoothed once, not once per pass (`statistics.keeping_filtered`).

    Markers and scratch of images in a local store go to a folder of this process
    (`work_folder`), removed with the pack: an image cut short here is computed again
    whole, so they need not outlive the task, and the store's file system is spared
    creating and deleting them. The markers' arrays stay in memory
    (`segpipe.io.markers.held`): no other process reads them."""
    outcomes = []
    folder = work_folder()
    drop_stale_work(folder)
    with (
        tempfile.TemporaryDirectory(prefix=WORK_PREFIX, dir=folder) as work,
        markers.held(work),
    ):
        for plan in plans:
            if not storage.is_url(plan.root):
                plan = dataclasses.replace(plan, work=work)
            with keeping_filtered():
                outcome = _attempt(Inline(), plan, noop, skip=skip, full=full, overlap=False)
                outcomes.append(outcome)
            os.utime(work)  # in use: see `drop_stale_work`
    return outcomes


WORK_FREE = 256 << 20
"""Free bytes a memory-backed folder must have to hold a pack's markers and scratch."""

WORK_PREFIX = "segpipe-pack-"

STALE_WORK = 24 * 3600
"""Seconds after which a pack's folder untouched is a killed worker's leftover."""


def work_folder() -> str:
    """Where `run_pack` keeps markers and scratch: ``$SEGPIPE_PACK_DIR`` when set, else
    ``/dev/shm`` (memory) when it has `WORK_FREE` bytes free, else the system's
    temporary folder.

    Raises
    ------
    ConfigError
        If ``$SEGPIPE_PACK_DIR`` is not a folder this process can write.
    """
    if chosen := os.environ.get("SEGPIPE_PACK_DIR"):
        if not (os.path.isdir(chosen) and os.access(chosen, os.W_OK | os.X_OK)):
            raise ConfigError(
                f"{chosen}: SEGPIPE_PACK_DIR is not a folder this worker can write "
                "(where images of one block keep their markers and scratch while they run)"
            )
        return os.path.abspath(chosen)  # markers are held by absolute path
    with contextlib.suppress(OSError):
        if shutil.disk_usage("/dev/shm").free >= WORK_FREE and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    return tempfile.gettempdir()


def drop_stale_work(folder: str) -> None:
    """Remove pack folders in ``folder`` that a killed worker left: named by `run_pack`,
    owned by this user and untouched for `STALE_WORK` seconds (a pack touches its
    folder after every image)."""
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith(WORK_PREFIX) or entry.is_symlink():
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if entry.is_dir() and st.st_uid == os.getuid() and now - st.st_mtime > STALE_WORK:
                    shutil.rmtree(entry.path)


def packs(plans: Sequence[ImagePlan], indices: Sequence[int], threads: int) -> list[list[int]]:
    """Consecutive groups of the images ``indices`` for `run_pack`, each at most
    `PACK_PIXELS`, and shrinking as the collection runs down (guided scheduling: a
    pack holds at most a quarter of a thread's share of what is left), so the last
    packs are single images and no thread waits long for another's last pack."""
    sizes = [math.prod(plans[i].spec.shape) for i in indices]
    left = sum(sizes)
    out: list[list[int]] = []
    held = limit = 0
    for i, size in zip(indices, sizes, strict=True):
        if out and held + size <= limit:
            out[-1].append(i)
            held += size
        else:
            limit = max(1, min(PACK_PIXELS, left // max(1, 4 * threads)))
            out.append([i])
            held = size
        left -= size
    return out


def run_images(
    client: Runner,
    plans: Sequence[ImagePlan],
    *,
    progress: Callable[[ImagePlan], ProgressFn] = lambda plan: noop,
    done: Callable[[Outcome], None] = lambda outcome: None,
    skip: bool = False,
    full: bool = False,
    in_flight: int | None = None,
) -> list[Outcome]:
    """Segment ``plans`` on the cluster, many images at once; outcomes in order.

    Images of one block are packed into tasks that run all their stages on a
    worker (`run_pack`); larger images go through the stages block by block,
    ``in_flight`` of them at once (their stages overlap), while the packs run.

    Parameters
    ----------
    client : distributed.Client or Inline
        The cluster, or `Inline`: every image in this process, one after another.
    plans : sequence of ImagePlan
        The images.
    progress : callable
        ``progress(plan)`` gives the block progress callback of a large image.
    done : callable
        Called with each image's `Outcome` as it ends (from another thread).
    skip : bool
        An image that fails (whatever the exception) is recorded and the others go
        on; otherwise the first failure is raised once the images in flight end.
    full : bool
        Recompute images complete from unchanged inputs too.
    in_flight : int, optional
        Large images at once (default `images_in_flight`).

    Returns
    -------
    list of Outcome

    Raises
    ------
    OutputConflictError
        If a plate's row or well group is in the store but segpipe did not write it.
    """
    for plan in plans:  # here, before any task: fields of one well would race for it
        store.make_parents(plan.root, plan.name)
    if isinstance(client, Inline):
        inline = []
        for plan in plans:
            inline.append(_attempt(client, plan, progress(plan), skip=skip, full=full))
            done(inline[-1])
        return inline
    outcomes: list[Outcome | None] = [None] * len(plans)
    small = [i for i, plan in enumerate(plans) if len(plan.grid()) == 1]
    large = [i for i, plan in enumerate(plans) if len(plan.grid()) > 1]

    def one(i: int) -> None:
        outcome = _attempt(client, plans[i], progress(plans[i]), skip=skip, full=full)
        outcomes[i] = outcome
        done(outcome)

    width = in_flight or images_in_flight(client)
    with ThreadPoolExecutor(width, thread_name_prefix="segpipe-image") as pool:
        futures: list[Future[None]] = [pool.submit(one, i) for i in large]
        try:
            _run_packs(client, plans, small, outcomes, done, skip=skip, full=full)
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        failed = [f.exception() for f in finished if f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            raise failed[0]  # type: ignore[misc]
    return [o for o in outcomes if o is not None]


def _run_packs(
    client: Client,
    plans: Sequence[ImagePlan],
    small: Sequence[int],
    outcomes: list[Outcome | None],
    done: Callable[[Outcome], None],
    *,
    skip: bool,
    full: bool,
) -> None:
    """`run_pack` over the `packs` of ``small``, at most `WINDOW` tasks submitted at once."""
    if not small:
        return
    queue = iter(packs(plans, small, _threads(client)))
    # a pack runs the segmenter too: a deep one's packs go to the GPU workers
    extra: dict[str, Any] = {}
    resources = gpu_resources(client, plans[small[0]].segmenter)
    if resources:
        extra["resources"] = resources
    token = uuid.uuid4().hex[:8]
    owner: dict[str, list[int]] = {}
    ac = as_completed(loop=client.loop)

    def submit() -> None:
        pack = next(queue, None)
        if pack is None:
            return
        # No retries: an error in a pack is its images' own; a task lost with its
        # worker is rerun by Dask anyway.
        future = client.submit(
            run_pack,
            [plans[i] for i in pack],
            skip=skip,
            full=full,
            key=f"pack-{token}-{pack[0]}",
            **extra,
        )
        owner[str(future.key)] = pack
        ac.add(future)

    for _ in range(WINDOW):
        submit()
    try:
        for future in ac:
            pack = owner.pop(str(future.key))
            for i, outcome in zip(pack, future.result(), strict=True):
                outcomes[i] = outcome
                done(outcome)
            future.release()
            submit()
    except BaseException:
        client.cancel(list(ac.futures) if hasattr(ac, "futures") else [])
        raise

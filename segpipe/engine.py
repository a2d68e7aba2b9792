"""The engine: the only code that submits Dask tasks.

Block tasks are submitted with a bound on how many are in flight, retried when
their worker dies, and skipped on a rerun when their completion marker (and
the files it vouches for) is intact. Stages describe their blocks; this
module runs them.
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from distributed import Client, as_completed

from segpipe.errors import BlockFailedError, OutputWriteError, SegpipeError
from segpipe.image import ProgressFn, noop
from segpipe.io import omezarr, written
from segpipe.io.markers import Arrays, Markers
from segpipe.segmenters.base import Segmenter

__all__ = [
    "RETRIES",
    "WINDOW",
    "Inline",
    "Lazy",
    "Runner",
    "gpu_resources",
    "imap_blocks",
    "map_blocks",
    "output_error",
    "prepare_array",
]


class Inline:
    """Runs block tasks in this process, one after another, instead of on the cluster.

    The engine inside one task that carries whole small images: a one-block image
    needs no scheduler round trip per stage. Markers, retries of the whole task and
    results are as on the cluster.
    """

    def __repr__(self) -> str:
        return "Inline()"


Runner = Client | Inline
"""Where block tasks run: a Dask client, or `Inline` in this process."""

_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}
RETRIES = 2  # a block lost with its worker is recomputed elsewhere
WINDOW = 512  # block tasks in flight per stage: bounds the scheduler's memory


def _none_out(_: object) -> Arrays:
    return {}


def _none_in(_: Arrays) -> None:
    return None


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


def map_blocks(
    client: Runner,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    *,
    stage: str,
    progress: ProgressFn = noop,
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
    if isinstance(client, Inline):
        try:
            for i in todo:
                if markers is None:
                    results[i] = fn(*args[i])
                else:
                    results[i] = _marked(fn, str(markers.directory), i, encode, run, *args[i])
                done += 1
                progress(stage, done, len(args))
        except OSError as err:
            if (mapped := output_error(err, stage)) is None:
                raise
            raise mapped from err
        return results
    pending: dict[str, int] = {}
    queue = iter(todo)
    ac = as_completed(loop=client.loop)
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
        if (mapped := output_error(err, stage)) is None:
            raise
        raise mapped from err
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


def output_error(err: OSError, stage: str) -> OutputWriteError | None:
    """``err`` as an `OutputWriteError` naming the file when the output cannot take a
    write (disk full, read-only, permissions); None for any other error (raise it as
    it is: chaining an error to itself makes a cycle that serialising it never ends)."""
    if isinstance(err, SegpipeError) or err.errno not in _OUTPUT_ERRNOS:
        return None
    return OutputWriteError(
        f"{err.filename or 'output'}: cannot write ({err.strerror}) during {stage}; "
        "free space or fix permissions, then rerun with --resume."
    )


def imap_blocks(
    client: Runner,
    fn: Callable[..., Any],
    args: Iterable[tuple[Any, ...]],
    *,
    stage: str,
    total: int,
    progress: ProgressFn = noop,
    window: int = WINDOW,
) -> Iterator[Any]:
    """Yield ``fn(*a)`` for each ``a`` in order, with at most ``window`` tasks submitted and
    not yet consumed: a consumer that streams the results holds ``window`` of them, never
    all (the links of 10⁶ blocks)."""
    if isinstance(client, Inline):
        progress(stage, 0, total)
        for i, a in enumerate(args):
            yield fn(*a)
            progress(stage, i + 1, total)
        return
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


def gpu_resources(client: Runner, segmenter: Segmenter) -> dict[str, float] | None:
    """``{"GPU": 1}`` for a segmenter that wants a GPU on a cluster with GPU workers
    (workers started with ``--resources GPU=n``); None otherwise (any worker will do)."""
    if not segmenter.gpu or isinstance(client, Inline):
        return None
    workers = client.scheduler_info()["workers"].values()
    if any(float((w.get("resources") or {}).get("GPU", 0)) > 0 for w in workers):
        return {"GPU": 1}
    return None


def prepare_array(
    path: str,
    markers: Markers,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    labels: bool = True,
    compress: bool = True,
    inner: Sequence[int] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Create the array a stage writes, with ``attributes`` when given, unless a resumed
    stage already wrote parts of it in the same layout: chunks, and shards of ``inner``
    chunks when given (a result array of a run with ``viewer_chunk``: `ImagePlan.inner`;
    scratch never is)."""
    if markers.count():
        try:
            arr = zarr.open_array(path, mode="r")
            if (
                arr.shape == tuple(shape)
                and arr.dtype == np.dtype(dtype)
                and omezarr.chunking(shape, chunks, inner) == (arr.shards or arr.chunks, arr.chunks)
            ):
                markers.clean_leftovers()
                return
        except Exception:  # missing or unreadable: its markers lie
            pass
        markers.clear()
    omezarr.create_array(
        path,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        labels=labels,
        compress=compress,
        inner=inner,
        attributes=attributes,
    )

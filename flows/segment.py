"""The collection flow: one Prefect task per wave of images, never per image or tile."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from distributed import Client
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import entry, monitor, unreported
from flows.prepare import Prepared, in_process, make_plan, prepare_run, take_over, unsized
from segpipe import lifecycle, pipeline
from segpipe.cluster import cancel_all, connect_run, dashboard, share_storage
from segpipe.config import RunConfig
from segpipe.engine import Inline
from segpipe.errors import ImagesFailedError, SchedulerLostError, SegpipeError
from segpipe.image import ImagePlan, ImageResult
from segpipe.io import storage
from segpipe.io.readers import image_name
from segpipe.io.store import (
    image_state,
)
from segpipe.workers import WorkerWatch, check_workers

ProgressFn = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


def _silent(message: str) -> None:
    pass


@dataclass
class _Reporter:
    """Where run progress goes (the CLI's progress bar: one row for images, one for
    blocks) and what the run is waiting for (``note``, a line on the terminal); set by
    the caller, not a parameter."""

    fn: ProgressFn = _quiet
    note: Callable[[str], None] = _silent


reporter = _Reporter()


@dataclass
class _Shared:
    """What the running flow shares with its waves, and the CLI with the flow.

    Helpers take it as an argument rather than read it as a global: a served run's
    flow and task functions are copies (pickled by value) whose globals are not
    this module's, and the helpers they call are this module's.
    """

    tracker: monitor.RunProgress | None = None
    """The progress artifact."""
    checked: set[str] = field(default_factory=set)
    """Workers of the run's cluster found fit (`segpipe.workers`)."""
    connection: tuple[Client, str, WorkerWatch] | None = None
    """The run's client (never `Client.current()`, which may be another client of this
    process: a notebook's, a test's), its scheduler's address, its `WorkerWatch`."""
    api_away: BaseException | None = None
    """The error of the run's last artifact that could not be sent."""
    run_id: str | None = None
    """The flow run's id, for `flows.unreported`."""
    thumbnails: monitor.Thumbnails | None = None
    """The previews artifact's thumbnails, made as their images finish."""


shared = _Shared()


def _progress(state: _Shared, plan: ImagePlan) -> ProgressFn:
    blocks = len(plan.grid())

    def report(stage: str, done: int, total: int) -> None:
        tracker = state.tracker
        if tracker is not None:
            tracker.update(plan.name, blocks, stage, done, total)

    return report


def cluster_kind(cluster: str) -> str:
    """``local``, ``tcp``, ``tls``, ``slurm``…: the cluster tag of a run."""
    return cluster.split("://", 1)[0]


def run_tags(config: RunConfig) -> list[str]:
    """Tags of a run in the Prefect UI: the segmenter and the kind of cluster."""
    return [f"segmenter:{config.segmenter.name}", f"cluster:{cluster_kind(config.cluster)}"]


def _previews(group: str) -> list[str]:
    """The preview files the image group at ``group`` records."""
    return [storage.join(group, p) for p in image_state(group).get("previews", [])]


def _row(result: ImageResult, output: str, status: str) -> dict[str, Any]:
    group = storage.join(output, result.name)
    return {
        "preview": ", ".join(_previews(group)),
        "tables": storage.join(group, "tables"),
        "image": result.name,
        "shape": "×".join(map(str, result.shape)),
        "objects": result.objects,
        "seconds": round(result.seconds, 2),
        "Mpx/s": round(result.mpx_per_s, 2) if status != "unchanged" else 0.0,
        "status": status,
        "output": group,
    }


def _failed_row(name: str, path: str, problem: str) -> dict[str, Any]:
    return {
        "image": name,
        "shape": "",
        "objects": 0,
        "seconds": 0.0,
        "Mpx/s": 0.0,
        "status": "failed",
        "output": "",
        "error": problem,
        "source": path,
    }


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a stage for lost workers and I/O hiccups, not for bad input (it stays bad)."""
    try:
        state.result()
    except SegpipeError:
        return False
    except Exception:
        return True
    return True


_STAGE: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": 2,
    "retry_condition_fn": _retry_unless_bad_input,
    "cache_policy": NO_CACHE,
}


def _client(state: _Shared) -> Client:
    connection = state.connection
    if connection is None or connection[0].status in ("closing", "closed"):
        raise _lost(state)  # its scheduler is gone
    return connection[0]


WAVE_END = 20.0  # seconds a failed run waits for its other waves to end
PREVIEWS_LOOK = 0.5  # seconds between looks whether the previews artifact can be sent


def api_url() -> str:
    """The Prefect API this process reports to."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "(none)")


def brief(err: BaseException) -> str:
    """``err``'s message on one line (its type's name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def _lost(state: _Shared) -> SchedulerLostError:
    where = state.connection[1] if state.connection else "of this run"
    return SchedulerLostError(
        f"lost the Dask scheduler {where} (it stopped answering); the blocks and images "
        "that finished are kept: rerun with --resume once it is back"
    )


def _ended(future: PrefectFuture[Any]) -> threading.Event:
    """An event set when ``future`` ends: the main thread waits on it with
    `flows.entry.wait`, so that it hears a Ctrl-C."""
    ended = threading.Event()
    future.add_done_callback(lambda _: ended.set())
    return ended


@task(name="segment-wave", task_run_name="wave {index} of {count}", **_STAGE)
def segment_wave(
    plans: list[ImagePlan], index: int, count: int, skip: bool, full: bool, inline: bool = False
) -> list[pipeline.Outcome]:
    """Segment a wave of images, several at once (`segpipe.pipeline.run_images`), on the
    run's cluster or, ``inline``, in this process.

    Each image of several blocks gets a log line as it ends; images of one block (a
    plate's fields: thousands a run) are summed up in one line at the wave's end, so
    the run's log stays readable and its API calls few. Failures and repairs are
    logged one by one; every image's figures are in the summary table."""
    logger = get_run_logger()
    small = _Tally()

    def done(outcome: pipeline.Outcome) -> None:
        name = outcome.plan.name
        tracker = shared.tracker
        if tracker is not None:
            tracker.image_done(name, len(outcome.plan.grid()), failed=outcome.result is None)
        thumbnails = shared.thumbnails
        if thumbnails is not None and name in thumbnails.names:
            if outcome.result is None:
                thumbnails.make(name, None)
            else:
                thumbnails.make(name, _previews(outcome.plan.group), outcome.result.objects)
        result = outcome.result
        if result is None:
            logger.error("%s failed: %s", name, outcome.error)
            return
        if result.status == "repaired":
            logger.warning("%s: files of its result were missing or damaged; redone", name)
        if len(outcome.plan.grid()) == 1:
            small.add(result)
        elif result.status == "unchanged":
            logger.info("%s: unchanged since the run that completed it; skipped", name)
        else:
            logger.info("%s: %d objects in %.1f s", name, result.objects, result.seconds)

    if not inline and shared.checked:  # workers that joined since are checked before any work
        shared.checked.update(check_workers(_client(shared), shared.checked))
    runner = Inline() if inline else _client(shared)
    try:
        outcomes = pipeline.run_images(
            runner,
            plans,
            progress=lambda plan: _progress(shared, plan),
            done=done,
            skip=skip,
            full=full,
        )
    except BaseException as err:  # a cancelled future raises CancelledError
        connection = shared.connection
        if connection is not None and connection[2].expired:
            raise connection[2].error() from err
        if isinstance(runner, Client) and runner.status != "running":
            raise _lost(shared) from err
        raise
    if small.images:
        logger.info("wave %d of %d: %s", index, count, small.line())
    return outcomes


class _Tally:
    """Images of one block that a wave finished, summed up for its log."""

    def __init__(self) -> None:
        self.images = self.unchanged = self.objects = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, result: ImageResult) -> None:
        with self._lock:
            self.images += 1
            self.unchanged += result.status == "unchanged"
            self.objects += result.objects
            self.seconds += result.seconds

    def line(self) -> str:
        """``32 image(s) of one block done (2 unchanged, skipped): 29440 objects, 3.1 s of
        work``."""
        skipped = f" ({self.unchanged} unchanged, skipped)" if self.unchanged else ""
        return (
            f"{self.images} image(s) of one block done{skipped}: {self.objects} objects, "
            f"{self.seconds:.1f} s of work (each image: the segpipe-summary table)"
        )


def _orphans(prepared: Prepared, plans: list[ImagePlan], logger: Any) -> list[dict[str, Any]]:
    """Rows of the store's images whose input is not among this run's: removed under
    ``prune``, else kept and reported."""
    cfg = prepared.config
    names = {p.name for p in plans} | {image_name(path) for path, _ in prepared.bad}
    rows = []
    for name, source in lifecycle.orphans(cfg.output, names):
        if cfg.prune:
            lifecycle.prune(cfg.output, name)
            status, note = "pruned", f"its input {source} is gone: removed (--prune)"
        else:
            status, note = "orphaned", f"its input {source} is not among this run's: kept"
        logger.warning("%s: %s", name, note)
        output = "" if cfg.prune else storage.join(cfg.output, name)
        rows.append({**_failed_row(name, source, note), "status": status, "output": output})
    return rows


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    config = params.get("config", {})
    source = (
        Path(str(config.get("input", "collection"))).name
        if isinstance(config, dict)
        else "collection"
    )
    return f"{source}-{dt.datetime.now():%Y-%m-%d-%H%M}"


HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")
"""Where a user turns Prefect's flow-run heartbeats on (environment or profile)."""


@contextlib.contextmanager
def heartbeats_as_set() -> Iterator[None]:
    """Run a flow within this: Prefect's flow-run heartbeats only where the user set them.

    Prefect sends one every 180 s by default, from a thread that sleeps in one-second
    steps and that the engine joins as each run context closes: up to a second at the
    end of every run (0.9 s measured), for a signal segpipe does not use (a run that
    ends unreported is marked CRASHED by the next one, `flows.unreported`). A
    heartbeat frequency set in the environment or in the Prefect profile is kept.
    """
    import prefect.context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    from prefect.settings.profiles import load_current_profile

    profile = {s.name for s in load_current_profile().settings}
    if any(name in os.environ or name in profile for name in HEARTBEAT_SETTINGS):
        yield
        return
    # as prefect.settings.temporary_settings, but the copy (0.1 s of pydantic validation)
    # is made once per settings object, not once per run
    context = prefect.context.get_settings_context()
    if not _QUIET or _QUIET[0] is not context.settings:
        quiet = context.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        _QUIET[:] = [context.settings, quiet]
    with prefect.context.SettingsContext(profile=context.profile, settings=_QUIET[1]):
        yield


_QUIET: list[Any] = []
"""The last settings a run started from, and their copy without heartbeats."""


@flow(
    name="segpipe-run",
    flow_run_name=_run_name,
    log_prints=False,
    persist_result=False,  # the output store holds the results: no server storage lookup
    task_runner=cast("TaskRunner[Any]", ThreadPoolTaskRunner(max_workers=2)),
)
def segment_collection(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Segment every image of a collection into the output store.

    Parameters
    ----------
    config : dict
        A `RunConfig` as a mapping (JSON-able, so deployments can carry it).
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    # A retried flow run continues what its earlier attempt wrote.
    retried = (flow_run.run_count or 1) > 1
    handed = None if retried else take_over(config)
    prepared = handed or prepare_run(RunConfig(**config), resume=True if retried else None)
    cfg = prepared.config
    shared.run_id = str(flow_run.get_id())
    unreported.settle(cfg.output, api_url(), logger)
    logger.info(
        "%d image(s) from %s into %s with %s",
        len(prepared.sources),
        cfg.input,
        cfg.output,
        cfg.segmenter.name,
    )
    if (line := unsized(prepared)) is not None:
        logger.warning(line)
        reporter.note(line)
    rows = [_failed_row(image_name(p), p, msg) for p, msg in prepared.bad]
    for _, msg in prepared.bad:
        logger.error("skipped: %s", msg)
    plans = [make_plan(prepared, spec) for spec in prepared.sources]
    parts = pipeline.waves(len(plans))
    reach = monitor.Reach()  # the artifacts: a run goes on while the Prefect API is away
    title = f"segpipe {cfg.segmenter.name} on {cfg.input} → {cfg.output}"
    submitted: list[Any] = []
    try:
        blocks = sum(len(p.grid()) for p in plans)
        tracker = monitor.RunProgress(len(plans), blocks, report=reporter.fn, reach=reach)
        shared.tracker = tracker
        thumbnails = monitor.Thumbnails(p.name for p in plans[: monitor.PREVIEWS])
        shared.thumbnails = thumbnails
        inline = in_process(prepared)
        with contextlib.ExitStack() as stack:
            client = None if inline else stack.enter_context(connect_run(cfg))
            if client is None:
                logger.info("one image of one block: segmented in this process, no cluster")
            else:
                address = str(client.scheduler_info().get("address", cfg.cluster))

                def say(message: str) -> None:
                    logger.warning(message)
                    reporter.note(message)

                watch = stack.enter_context(WorkerWatch(client, address, cfg.worker_wait, say))
                shared.connection = (client, address, watch)
                if cfg.cluster != "local":  # a LocalCluster runs this very environment
                    shared.checked.update(check_workers(client))
                share_storage(client, cfg)
                logger.info(
                    "Dask dashboard: %s (scheduler %s)",
                    dashboard(client),
                    client.scheduler_info().get("address", "?"),
                )
            # Two waves at a time: the next one starts while the last images of the one
            # before finish, so the cluster never drains at a wave's end.
            submitted += [
                segment_wave.submit(
                    [plans[i] for i in part],
                    k + 1,
                    len(parts),
                    cfg.on_error == "skip",
                    cfg.full,
                    inline,
                )
                for k, part in enumerate(parts)
            ]
            try:
                for future in submitted:
                    # the previews are sent from here as soon as their images have ended
                    ended = _ended(future)
                    while not entry.wait(ended, None if thumbnails.sent else PREVIEWS_LOOK):
                        if thumbnails.ready():
                            thumbnails.send(title, reach)
                    for outcome in future.result():
                        if outcome.result is None:
                            spec = outcome.plan.spec
                            rows.append(_failed_row(spec.name, spec.path, outcome.error))
                        else:
                            rows.append(_row(outcome.result, cfg.output, outcome.result.status))
            except BaseException:  # an error or an interrupt: the waves' waits end now
                if client is not None:
                    cancel_all(client)
                raise
        tracker.close()
        thumbnails.send(title, reach)  # fewer images than it shows, or some never ended
        rows += _orphans(prepared, plans, logger)
        lifecycle.write_layout(cfg.output, [p.spec.path for p in plans])
    finally:
        # The output stays locked while a wave still runs: after an error or an
        # interrupt, the waves end within seconds of the client's closing.
        for future in submitted:
            entry.wait(_ended(future), WAVE_END)
        prepared.lock.release()
        shared.tracker, shared.connection, shared.thumbnails = None, None, None
        shared.checked.clear()
    t = monitor.summary_artifacts(rows, title=title, mode=monitor.run_mode(cfg), reach=reach)
    logger.info(monitor.totals_line(t, mode=monitor.run_mode(cfg)))
    if reach.lost is not None:
        logger.warning("the Prefect API was away during the run: %s", brief(reach.lost))
        shared.api_away = reach.lost
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise ImagesFailedError(
            f"{len(failed)} of {t['images']} image(s) failed: "
            + "; ".join(f"{r['image']}: {r['error']}" for r in failed),
            rows,
        )
    return rows

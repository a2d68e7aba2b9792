"""The collection flow: one Prefect task per stage and image, never per tile."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import monitor
from segpipe import pipeline, relabel
from segpipe.cluster import connect_run, dashboard
from segpipe.config import RunConfig, block_tile, check_image_options
from segpipe.errors import ImagesFailedError, InputsError, SegpipeError
from segpipe.io.collection import resolve_inputs
from segpipe.io.readers import SourceSpec, image_name, open_source
from segpipe.io.store import (
    OutputLock,
    check_apart,
    check_local,
    check_name,
    image_state,
    mark_image,
    open_output,
)
from segpipe.measure import Measured
from segpipe.merge import MergedIds
from segpipe.panoptic import PanopticResult, catalogue_for
from segpipe.preview import write_preview
from segpipe.segmenters import Segmenter, get_segmenter
from segpipe.stats import Extrema, ImageStats

ProgressFn = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class _Reporter:
    """Where block progress goes (the CLI's progress bar); set by the caller, not a parameter."""

    fn: ProgressFn = _quiet


reporter = _Reporter()
_tracker: list[monitor.RunProgress] = []  # the running flow's progress artifact


def _progress(image: str) -> ProgressFn:
    def report(stage: str, done: int, total: int) -> None:
        reporter.fn(f"{image}: {stage}", done, total)
        if _tracker:
            _tracker[-1].blocks(done, total)

    return report


def _enter(stage: str) -> None:
    if _tracker:
        _tracker[-1].enter(stage)


def cluster_kind(cluster: str) -> str:
    """``local``, ``tcp``, ``tls``, ``slurm``…: the cluster tag of a run."""
    return cluster.split("://", 1)[0]


def run_tags(config: RunConfig) -> list[str]:
    """Tags of a run in the Prefect UI: the segmenter and the kind of cluster."""
    return [f"segmenter:{config.segmenter.name}", f"cluster:{cluster_kind(config.cluster)}"]


@dataclass(frozen=True)
class Prepared:
    """A checked run: inputs opened (bad ones listed), the output claimed, the segmenter built."""

    config: RunConfig
    sources: list[SourceSpec]
    bad: list[tuple[str, str]]  # (path, problem) of inputs skipped under on_error=skip
    segmenter: Segmenter
    lock: OutputLock


def prepare_run(config: RunConfig, *, resume: bool | None = None) -> Prepared:
    """Check everything before heavy compute: segmenter valid, every input readable,
    output ours (and locked).

    Raises
    ------
    SegpipeError
        The segmenter or output problem; or, under ``on_error: fail``, every bad
        input, one per line.
    """
    check_local(config.input, "--input")
    check_local(config.output, "--output")
    config = config.resolved()
    segmenter = get_segmenter(config.segmenter.name, **config.segmenter.options())
    catalogue_for(segmenter, config.classes)  # a bad catalogue fails before any compute
    paths = resolve_inputs(config.input, missing_ok=config.on_error == "skip", output=config.output)
    sources: list[SourceSpec] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        try:
            spec = open_source(p, channel=config.channel, axes=config.axes, series=config.series)
            check_apart(p, config.output)
            check_name(config.output, spec.name, p)
            check_image_options(config, segmenter, spec)
            pipeline.check_tile(spec, block_tile(config.tile, len(spec.shape), spec.shape))
            sources.append(spec)
        except SegpipeError as err:
            bad.append((p, str(err)))
    if bad and config.on_error == "fail":
        if len(bad) == 1:
            raise InputsError(bad[0][1])
        lines = "\n  ".join(msg for _, msg in bad)
        raise InputsError(f"{len(bad)} of {len(paths)} inputs are bad:\n  {lines}")
    lock = open_output(
        config.output,
        {**config.run_settings(), **segmenter.identity()},
        overwrite=config.overwrite,
        # --full recomputes every image of a store of these settings: it may reuse it.
        resume=(config.resume or config.full) if resume is None else resume,
    )
    return Prepared(config, sources, bad, segmenter, lock)


def make_plan(prepared: Prepared, spec: SourceSpec) -> pipeline.ImagePlan:
    ndim = len(spec.shape)
    tiles = block_tile(prepared.config.tile, ndim, spec.shape)
    halo = prepared.config.halo
    halos = None if halo == "auto" else ((halo,) * ndim if isinstance(halo, int) else tuple(halo))
    catalogue = catalogue_for(prepared.segmenter, prepared.config.classes)
    return pipeline.ImagePlan(
        spec, prepared.config.output, tiles, prepared.segmenter, halos, catalogue=catalogue
    )


def _row(result: pipeline.ImageResult, output: str, status: str) -> dict[str, Any]:
    group = Path(output) / result.name
    previews = image_state(group).get("previews", [])
    return {
        "preview": ", ".join(str(group / p) for p in previews),
        "tables": str(group / "tables"),
        "image": result.name,
        "shape": "×".join(map(str, result.shape)),
        "objects": result.objects,
        "seconds": round(result.seconds, 2),
        "Mpx/s": round(result.mpx_per_s, 2) if status == "done" else 0.0,
        "status": status,
        "output": str(Path(output) / result.name),
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


def _client() -> Client:
    return Client.current()


@task(
    name="ingest",
    task_run_name="ingest-{plan.name}",
    **_STAGE,
)
def ingest_image(plan: pipeline.ImagePlan) -> Extrema:
    return pipeline.ingest(_client(), plan, _progress(plan.name))


@task(
    name="statistics",
    task_run_name="statistics-{plan.name}",
    **_STAGE,
)
def compute_statistics(plan: pipeline.ImagePlan, raw: Extrema) -> ImageStats:
    return pipeline.statistics(_client(), plan, raw, _progress(plan.name))


@task(
    name="segment",
    task_run_name="segment-{plan.name}",
    **_STAGE,
)
def segment_blocks(plan: pipeline.ImagePlan, stats: ImageStats) -> pipeline.Segmented:
    return pipeline.segment(_client(), plan, stats, _progress(plan.name))


@task(name="stitch", task_run_name="stitch-{plan.name}", **_STAGE)
def stitch_labels(plan: pipeline.ImagePlan, segmented: pipeline.Segmented) -> MergedIds:
    return pipeline.stitch_ids(_client(), plan, segmented, _progress(plan.name))


@task(
    name="write",
    task_run_name="write-{plan.name}",
    **_STAGE,
)
def write_outputs(plan: pipeline.ImagePlan, ids: MergedIds) -> int:
    return pipeline.write(_client(), plan, ids, _progress(plan.name), catalogue=plan.catalogue)


@task(name="panoptic", task_run_name="panoptic-{plan.name}", **_STAGE)
def write_panoptic_labels(plan: pipeline.ImagePlan, count: int) -> PanopticResult:
    # level 0 came from the write stage's relabel pass
    return relabel.finish_panoptic(_client(), plan, count, plan.catalogue, _progress(plan.name))


@task(name="measure", task_run_name="measure-{plan.name}", **_STAGE)
def measure_objects(plan: pipeline.ImagePlan, count: int) -> Measured:
    # the write stage's relabel pass summed each block
    return relabel.write_tables(plan, count, plan.catalogue)


@task(name="preview", task_run_name="preview-{plan.name}", **_STAGE)
def write_previews(plan: pipeline.ImagePlan) -> str:
    return str(write_preview(_client(), plan, _progress(plan.name)))


def _segment_one(plan: pipeline.ImagePlan, *, full: bool) -> tuple[pipeline.ImageResult, str]:
    t0 = time.perf_counter()
    if full and Path(plan.group).exists():
        mark_image(plan.group, source=None)  # forget the input it was made from: starts fresh
    start = pipeline.begin(plan)
    if start == "done":
        get_run_logger().info("%s: unchanged since the run that completed it; skipped", plan.name)
        return pipeline.completed_result(plan), "unchanged"
    if start == "repair":
        get_run_logger().warning(
            "%s: files of its completed result are missing or damaged; computing it again",
            plan.name,
        )
    _enter("ingest")
    raw = ingest_image(plan)
    _enter("statistics")
    stats = compute_statistics(plan, raw)
    _enter("segment")
    segmented = segment_blocks(plan, stats)
    _enter("stitch")
    ids = stitch_labels(plan, segmented)
    _enter("write")
    write_outputs(plan, ids)
    # the preview needs only the instance pyramid: its task runs on a worker while
    # the panoptic pyramid is built and the client writes the tables
    shown = write_previews.submit(plan)
    _enter("panoptic")
    write_panoptic_labels(plan, ids.count)
    _enter("measure")
    measure_objects(plan, ids.count)
    _enter("preview")
    shown.result()
    result = pipeline.ImageResult(
        plan.name, plan.spec.shape, ids.count, time.perf_counter() - t0, {}
    )
    pipeline.finish(plan, result, stats, segmented.params)
    return result, "done"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text}"


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


@flow(name="segpipe-run", flow_run_name=_run_name, log_prints=False)
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
    prepared = prepare_run(RunConfig(**config), resume=True if retried else None)
    cfg = prepared.config
    logger.info(
        "%d image(s) from %s into %s with %s",
        len(prepared.sources),
        cfg.input,
        cfg.output,
        cfg.segmenter.name,
    )
    rows = [_failed_row(image_name(p), p, msg) for p, msg in prepared.bad]
    for _, msg in prepared.bad:
        logger.error("skipped: %s", msg)
    try:
        _tracker.append(monitor.RunProgress(len(prepared.sources)))
        with connect_run(cfg) as client:
            logger.info(
                "Dask dashboard: %s (scheduler %s)", dashboard(client), client.scheduler.address
            )
            for spec in prepared.sources:
                plan = make_plan(prepared, spec)
                try:
                    try:
                        result, status = _segment_one(plan, full=cfg.full)
                    except OSError as err:
                        raise pipeline.output_error(err, "the run") from err
                except Exception as err:  # under skip, whatever fails one image fails it alone
                    if cfg.on_error == "fail":
                        raise
                    problem = str(err) if isinstance(err, SegpipeError) else _one_line(err)
                    logger.error("%s failed: %s", spec.name, problem)
                    try:
                        pipeline.record_failure(plan, problem)
                    except Exception as again:  # the disk that failed the image, perhaps
                        logger.error("%s: could not record the failure: %s", spec.name, again)
                    rows.append(_failed_row(spec.name, spec.path, problem))
                    continue
                finally:
                    _tracker[-1].image_done()
                logger.info("%s: %d objects in %.1f s", result.name, result.objects, result.seconds)
                rows.append(_row(result, cfg.output, status))
        _tracker[-1].close()
    finally:
        prepared.lock.release()
        _tracker.clear()
    t = monitor.summary_artifacts(
        rows,
        title=f"segpipe {cfg.segmenter.name} on {cfg.input} → {cfg.output}",
        mode=monitor.run_mode(cfg),
    )
    logger.info(monitor.totals_line(t, mode=monitor.run_mode(cfg)))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise ImagesFailedError(
            f"{len(failed)} of {len(rows)} image(s) failed: "
            + "; ".join(f"{r['image']}: {r['error']}" for r in failed),
            rows,
        )
    return rows

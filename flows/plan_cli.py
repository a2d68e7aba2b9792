"""``segpipe plan``: what a run would cost (blocks, tasks, bytes, memory, time), not run.

Registered on the CLI by `register`.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.console import fail, out
from segpipe.errors import SegpipeError
from segpipe.io import storage

PLAN_EXAMPLES = """
[b]Examples[/b]

  segpipe plan --config run.yaml
  segpipe plan --config run.yaml --workers 1 --workers 8 --workers 64 --threads 4
  segpipe plan --config run.yaml --calibrate   # time one block of the first image here
  segpipe plan --input huge.zarr --output out.zarr --segmenter watershed --json plan.json
"""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _axes(values: tuple[int, ...]) -> str:
    return "×".join(map(str, values))


def _stage_table(title: str, images: list[Any]) -> Table:
    """One row per stage, summed over ``images``."""
    table = Table(title=title)
    for col in ("stage", "grid (halo)", "Dask tasks", "read", "written", "compute, 1 thread"):
        table.add_column(col, justify="left" if col in ("stage", "grid (halo)") else "right")
    first = images[0]
    grids = {
        "ingest": "regions",
        "filter": f"{_axes(first.grid)} (±{_axes(first.filter_halo)})",
        "statistics": _axes(first.grid),
        "segment": f"{_axes(first.grid)} (±{_axes(first.halo)})",
        "links": f"rows of {_axes(first.grid)}: {first.pairs:,} pairs",
        "stitch": "client",
        "relabel": f"{_axes(first.grid)}: instances, panoptic, object sums",
        "pyramid": f"{first.levels - 1} levels × 3 arrays",
        "panoptic": "its pyramid",
        "measure": "client: tables",
        "preview": "1",
    }
    for stage in first.stages:
        rows = [im.stage(stage.name) for im in images]
        secs = [r.compute_s for r in rows]
        table.add_row(
            stage.name,
            grids.get(stage.name, "") if len(images) == 1 else "",
            f"{sum(r.tasks for r in rows):,}",
            _size(sum(r.read_bytes for r in rows)),
            _size(sum(r.write_bytes for r in rows)),
            _time(None if None in secs else sum(s for s in secs if s is not None)),
        )
    return table


_API_CASES = {
    "running": "Prefect's local API running: reused",
    "stopped": "Prefect's local API stopped: started",
    "new": "Prefect's local API on a new database: created",
    "remote": "the Prefect server of PREFECT_API_URL",
}
_CLUSTER_CASES = {
    "none": "one image of one block: no cluster",
    "local": "a LocalCluster started and closed",
    "external": "the running Dask cluster",
}


def _startup_case(cfg: Any, images: list[Any]) -> tuple[str, str]:
    """The Prefect API a run would find now, and what cluster it would start."""
    from flows import local_api

    remote = cfg.prefect is not None and cfg.prefect.api_url
    api = "remote" if remote else local_api.status()
    if cfg.cluster != "local":
        return api, "external"
    return api, "none" if len(images) == 1 and images[0].blocks == 1 else "local"


def _as_json(plan: Any, workers: list[int], threads: int, startup: float | None) -> dict[str, Any]:
    from dataclasses import asdict

    from flows.prepare import IN_FLIGHT

    disk = plan.disk(IN_FLIGHT)
    return {
        "segmenter": plan.segmenter,
        "planning_seconds": plan.seconds,
        "costs": plan.costs.source if plan.costs else None,
        "images": [
            {
                **asdict(im),
                "pixels": im.pixels,
                "dask_tasks": im.dask_tasks,
                "peak_bytes": im.peak_bytes,
            }
            for im in plan.images
        ],
        "bad": [{"path": p, "problem": m} for p, m in plan.bad],
        "disk": {"final_bytes": disk.final, "peak_bytes": disk.peak},
        "wall_seconds": {str(n): plan.wall(n, threads) for n in workers},
        "startup_seconds": startup,  # start-up and end, beside the computing above
        "threads": threads,
    }


def plan(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="run.yaml of the job; flags override it.")
    ] = None,
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="File, directory, glob or manifest.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output store (not touched).")
    ] = None,
    segmenter: Annotated[str | None, typer.Option("--segmenter", "-s")] = None,
    tile: Annotated[str | None, typer.Option(help="Block edge: 1024, or 64,256,256.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Segmenter option key=value; repeatable.")
    ] = None,
    workers: Annotated[
        list[int] | None,
        typer.Option("--workers", "-n", min=1, help="Dask workers to estimate for; repeatable."),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Threads per worker.")] = 1,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help="Time the block functions on one block of the first image (reads it), "
            "instead of the shipped table.",
        ),
    ] = False,
    costs: Annotated[
        Path | None, typer.Option(help="Calibration table (default segpipe/data/plan_costs.json).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the plan as JSON ('-': stdout).")
    ] = None,
) -> None:
    """Plan a run without computing it: per image and in total, blocks, Dask and Prefect
    tasks, bytes read and written per stage, peak memory per worker thread, and the
    estimated wall time for N workers. Images are opened header-only."""
    from flows.cli import _parse_tile
    from flows.prepare import IN_FLIGHT, free_space
    from segpipe.config import load_config, parse_sets
    from segpipe.pipeline import MAX_WAVES, waves
    from segpipe.plan import (
        COMPRESSION,
        COSTS_FILE,
        LABEL_SHRINK,
        load_costs,
        plan_run,
        startup_seconds,
    )

    ns = sorted(set(workers or [1, 4, 16]))
    try:
        if config is None and input is None:
            raise SegpipeError("give --config, or --input (and --output).")
        overrides: dict[str, Any] = {
            "input": input,
            "output": output if output is not None else (None if config else "plan.zarr"),
            "segmenter": segmenter,
            "tile": _parse_tile(tile),
            "set": parse_sets(set_ or []),
        }
        cfg = load_config(config, overrides)
        # without a table the plan still counts everything; only the wall time is missing
        table = load_costs(costs) if costs else None
        if table is None and COSTS_FILE.exists():
            table = load_costs(COSTS_FILE)
        result = plan_run(cfg, costs=table, calibrate=calibrate)
    except SegpipeError as err:
        fail(err)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    api, where = _startup_case(cfg, result.images)
    startup = (
        None if result.costs is None else startup_seconds(result.costs, api=api, cluster=where)
    )
    if json_out is not None:
        text = json.dumps(_as_json(result, ns, threads, startup), indent=2, default=str)
        if str(json_out) == "-":
            sys.stdout.write(text + "\n")
            return
        json_out.write_text(text + "\n", encoding="utf-8")
    images = result.images
    for path, problem in result.bad:
        out.print(f"[red]skipped[/] {path}: {problem}", highlight=False, soft_wrap=True)
    if not images:
        out.print("No image to plan.")
        raise typer.Exit(1)
    summary = Table(title=f"segpipe plan: {len(images)} image(s) with {result.segmenter}")
    for col in ("image", "shape", "dtype", "tile", "blocks", "pairs", "Dask tasks", "peak/thread"):
        summary.add_column(col, justify="left" if col == "image" else "right")
    for im in images:
        summary.add_row(
            im.name,
            _axes(im.shape),
            im.dtype,
            _axes(im.tile),
            f"{im.blocks:,}",
            f"{im.pairs:,}",
            f"{im.dask_tasks:,}",
            _size(im.peak_bytes),
        )
    out.print(summary)
    if len(images) <= 20:
        for im in images:
            out.print(_stage_table(f"{im.name}: {_axes(im.shape)} px", [im]))
    if len(images) > 1:
        out.print(_stage_table("all images", images))
    prefect = len(waves(len(images)))
    peak = max(im.peak_bytes for im in images)
    worst = max(images, key=lambda im: im.peak_bytes)
    parts = ", ".join(f"{k} {_size(v)}" for k, v in worst.peak_thread_bytes.items() if v)
    out.print(
        f"Totals: {sum(im.blocks for im in images):,} blocks, "
        f"{sum(im.dask_tasks for im in images):,} Dask tasks, {prefect} Prefect task runs "
        f"(waves of images, at most {MAX_WAVES} whatever the image count; never per block).",
        highlight=False,
    )
    out.print(
        f"Peak memory per worker thread: {_size(peak)} ({parts}); "
        f"per worker of {threads} thread(s): {_size(peak * threads)}.",
        highlight=False,
        soft_wrap=True,
    )
    out.print(f"Bytes read/written: {COMPRESSION}.", highlight=False, soft_wrap=True)
    disk = result.disk(IN_FLIGHT)
    used = (
        f"Disk: about {_size(disk.final)} when done, {_size(disk.peak)} at the run's peak "
        f"(scratch of the {IN_FLIGHT} largest images in flight; images taken uncompressed, "
        f"labels at 1/{LABEL_SHRINK})"
    )
    if storage.is_url(cfg.output):
        used += "; object storage: no free space to check"
    else:
        folder, free = free_space(cfg.resolved().output)
        used += f"; {_size(free)} free on {folder}" + (
            "" if disk.peak <= free else ": [red]too little[/], `segpipe run` refuses to start"
        )
    out.print(used, highlight=False, soft_wrap=True)
    if result.costs is None:
        out.print("Wall time: no calibration table; run `python -m bench.calibrate`.")
    else:

        def total(n: int) -> str:
            wall = result.wall(n, threads)
            if wall is None or startup is None:
                return _time(wall)
            return f"{_time(wall + startup)} ({_time(wall)} computing)"

        walls = ", ".join(f"{n} worker(s) × {threads} thread(s): {total(n)}" for n in ns)
        out.print(f"Estimated wall time: {walls}.", highlight=False, soft_wrap=True)
        if startup is not None:
            out.print(
                f"  of which start-up and end: {_time(startup)} ({_API_CASES[api]}; "
                f"{_CLUSTER_CASES[where]})",
                highlight=False,
                soft_wrap=True,
            )
        else:
            out.print("  start-up not included: the calibration table has no `startup`.")
        if result.wall(ns[0], threads) is None:
            out.print(
                f"  (segmenter {result.segmenter!r} is not in the calibration table: "
                "plan with --calibrate)",
                highlight=False,
            )
        out.print(f"Costs from: {result.costs.source}", highlight=False, soft_wrap=True)
    out.print(
        f"Planned in {result.seconds:.3f} s, header-only; peak RSS of this process "
        f"{_size(peak_rss)}.",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add the ``plan`` command to ``app``."""
    app.command("plan", epilog=PLAN_EXAMPLES)(plan)

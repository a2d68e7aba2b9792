"""The ``segpipe`` command line (typer + rich)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from flows.console import console, crash, fail, interrupted, out
from flows.entry import STEP, Terminated, terminate
from flows.options import numbers
from segpipe.errors import ImagesFailedError, PrefectApiLostError, SegpipeError
from segpipe.segmenters import available

RESUMABLE = ("run", "demo")  # commands an interrupt leaves to --resume


class _Commands(TyperGroup):
    """Every command ends in one line on stderr, whatever stops it."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer prints these (usage errors) and exits
        except KeyboardInterrupt as err:
            code = 143 if isinstance(err, Terminated) else 130
            interrupted(code, resume=ctx.invoked_subcommand in RESUMABLE)
        except SegpipeError as err:  # one that a command did not catch itself
            fail(err)
        except Exception as err:
            crash(err)
        except BaseException as err:
            if type(err).__name__ == "TerminationSignal":  # Prefect's, for SIGTERM in a flow
                interrupted(143, resume=ctx.invoked_subcommand in RESUMABLE)
            raise


def _version(show: bool) -> None:
    if show:
        try:
            number = version("segpipe")
        except PackageNotFoundError:  # a source tree that was never installed
            from segpipe import __version__ as number
        out.print(f"segpipe {number}", highlight=False)
        raise typer.Exit()


app = typer.Typer(
    name="segpipe",
    help="Segment image collections too large for one machine: Dask blocks, Prefect, OME-Zarr.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    cls=_Commands,
)


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Segment image collections too large for one machine: Dask blocks, Prefect, OME-Zarr."""


RUN_EXAMPLES = """
[b]Examples[/b]

  segpipe run --input 'scans/*.tif' --output out.zarr --segmenter watershed
  segpipe run --input scans/ --output out.zarr --segmenter otsu --tile 2048 --set sigma=1.5
  segpipe run --config run.yaml --cluster tcp://scheduler:8786
  segpipe run --input stack.ome.tif --output out.zarr --channel 1 -s multiotsu --set classes=3
"""


class _BarReporter:
    """A rich progress bar with one row per image stage, fed from Prefect task threads."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.lock = threading.Lock()

    def __call__(self, stage: str, done: int, total: int) -> None:
        with self.lock:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=total)
            self.progress.update(self.tasks[stage], completed=done, total=total)


def _summary(rows: list[dict[str, Any]], output: str, *, mode: str = "") -> None:
    table = Table(title="segpipe summary")
    for col in ("image", "shape", "objects", "seconds", "Mpx/s", "status"):
        table.add_column(col, justify="right" if col != "image" else "left")
    for r in rows:
        table.add_row(
            r["image"],
            r["shape"],
            str(r["objects"]),
            f"{r['seconds']:.1f}",
            f"{r['Mpx/s']:.2f}",
            r.get("status", "done"),
        )
    out.print(table)
    from flows.monitor import totals, totals_line

    out.print(totals_line(totals(rows), mode=mode), highlight=False)
    for r in rows:
        if r.get("preview"):
            out.print(f"Preview {r['image']}: {r['preview']}", soft_wrap=True, highlight=False)
        if r.get("error"):
            out.print(f"[red]{r['image']}[/]: {r['error']}", soft_wrap=True, highlight=False)
    out.print(
        f"Results: {output}  (labels in <image>/labels/instances/0 and labels/semantic/0)",
        soft_wrap=True,
        highlight=False,
    )


def _import_prefect() -> None:
    import fastapi.encoders  # noqa: F401  # Prefect serializes flow parameters with it (0.56 s)
    import prefect.artifacts
    import prefect.cache_policies
    import prefect.task_runners  # noqa: F401


def _exit_after(importer: threading.Thread) -> None:
    """Let Prefect's import end before this process does: an interpreter that exits
    while a thread is inside an extension's import can abort ("FATAL: exception not
    rethrown", SIGABRT) instead of printing its one line."""
    importer.join(timeout=10)


def _call_flow(prepared: Any) -> list[dict[str, Any]]:
    """Run the Prefect flow of the checked run ``prepared`` in this process; an API gone
    at its end is one line, and its run is noted for the next run to mark CRASHED
    (`flows.unreported`)."""
    import httpx
    from prefect import tags
    from prefect.exceptions import PrefectHTTPStatusError

    from flows import segment as seg_flow
    from flows import unreported
    from flows.prepare import hand_over

    cfg = prepared.config

    flow = seg_flow.segment_collection.with_options(
        retries=cfg.retries, retry_delay_seconds=cfg.retry_delay
    )
    seg_flow.shared.run_id = seg_flow.shared.api_away = None
    # Secrets stay out of the flow's parameters (they are shown in the UI).
    params = cfg.model_dump(mode="json", exclude={"prefect"})
    hand_over(prepared, params)
    try:
        with tags(*seg_flow.run_tags(cfg)), seg_flow.heartbeats_as_set():
            rows: list[dict[str, Any]] = flow(params)
    except (httpx.TransportError, PrefectHTTPStatusError) as err:  # the flow's states
        status = getattr(getattr(err, "response", None), "status_code", 500)
        if status < 500:  # an answer, not an absence (e.g. refused credentials)
            raise
        url, why = seg_flow.api_url(), seg_flow.brief(err)
        if seg_flow.shared.run_id is not None:  # the next run marks this one crashed
            unreported.note(cfg.output, seg_flow.shared.run_id, url, why)
        raise PrefectApiLostError(
            f"the Prefect API {url} stopped answering ({why}); the blocks and images "
            "that finished are kept: rerun with --resume once it is back"
        ) from err
    if seg_flow.shared.api_away is not None:  # and back for the run's end
        console.print(
            f"the Prefect API {seg_flow.api_url()} was away during the run "
            f"({seg_flow.brief(seg_flow.shared.api_away)}): the run's progress and "
            "summary artifacts are missing there",
            highlight=False,
            soft_wrap=True,
        )
    return rows


def execute(config: Any, *, show_progress: bool = True) -> list[dict[str, Any]]:
    """Check a run, then run the Prefect flow with a progress bar; returns the summary rows."""
    if config.prefect is not None:  # before Prefect is imported: it reads these once
        if config.prefect.api_url:
            os.environ["PREFECT_API_URL"] = config.prefect.api_url
        if config.prefect.auth_string:
            os.environ["PREFECT_API_AUTH_STRING"] = config.prefect.auth_string
    # Prefect's API takes seconds to start: the machine's local API (`flows.local_api`)
    # is reused when a run left it up, else started beside the checks and the cluster,
    # in a session of its own (a Ctrl-C here leaves it to record the run's end).
    from flows import local_api
    from flows.prepare import in_process, prepare_run
    from segpipe.cluster import prestart_local

    t0 = time.perf_counter()
    api = None if local_api.configured() else local_api.use()
    # Prefect itself imports (a second or more) while the run is checked and the cluster
    # starts; only Prefect's modules, which import nothing of segpipe's.
    importer = threading.Thread(target=_import_prefect, name="segpipe-import", daemon=True)
    importer.start()
    # Fail fast, before the cluster starts; the lock stays held by this process, and
    # the flow (in this process) takes it again as a no-op.
    try:
        prepared = prepare_run(config)
    except BaseException:
        _exit_after(importer)
        raise
    cfg = prepared.config
    try:
        inline = in_process(prepared)
        local = cfg.cluster == "local" and not inline
        starting = [
            *(["a LocalCluster"] if local else []),
            *(["Prefect's local API"] if api is not None and api.started else []),
        ]
        console.print(
            f"segpipe: {len(prepared.sources)} image(s) → {cfg.output} "
            f"with [b]{cfg.segmenter.name}[/b] "
            + ("in this process (one block: no cluster)" if inline else f"on cluster {cfg.cluster}")
            + (f"; starting {' and '.join(starting)}" if starting else ""),
            highlight=False,
            soft_wrap=True,
        )
        if local:
            prestart_local(workers=cfg.workers, threads=cfg.threads)
        while importer.is_alive():  # in steps, to hear a Ctrl-C (flows.entry.wait)
            importer.join(STEP)
        from flows import segment as seg_flow

        if api is not None:
            try:
                api.wait()
            except RuntimeError as err:
                fail(err)
        console.print(f"started in {time.perf_counter() - t0:.1f} s", highlight=False)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not show_progress,
            transient=False,
        )
        with progress:
            seg_flow.reporter.fn = _BarReporter(progress)
            seg_flow.reporter.note = lambda line: console.print(
                line, highlight=False, soft_wrap=True
            )
            try:
                rows = _call_flow(prepared)
            finally:
                seg_flow.reporter.fn, seg_flow.reporter.note = seg_flow._quiet, seg_flow._silent
    except BaseException:  # an interrupt or an error: the output is free again (the flow
        # releases it too when it ran; a second release is a no-op)
        prepared.lock.release()
        _exit_after(importer)
        raise
    return rows


@app.command(epilog=RUN_EXAMPLES)
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="run.yaml; flags override it.")
    ] = None,
    input: Annotated[
        str | None,
        typer.Option("--input", "-i", help="File, directory, glob or manifest (.txt/.csv)."),
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output store, e.g. out.zarr.")
    ] = None,
    segmenter: Annotated[
        str | None,
        typer.Option(
            "--segmenter",
            "-s",
            help=f"{', '.join(available())} (`segpipe segmenters` lists their options).",
        ),
    ] = None,
    tile: Annotated[
        str | None,
        typer.Option(help="Block edge in pixels: 2048, one per axis: 64,256,256, or auto."),
    ] = None,
    halo: Annotated[
        str | None, typer.Option(help="'auto' (what the segmenter declares) or pixels.")
    ] = None,
    viewer_chunk: Annotated[
        str | None,
        typer.Option(
            help="Inner chunk of the sharded outputs: 256 (Y/X; volumes one plane deep), "
            "one per axis: 1,256,256, or 0 for unsharded outputs (one chunk a block)."
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="local, local-cuda, slurm, kubernetes (sections in run.yaml), or "
            "tcp://host:port / tls://host:port of a running Dask scheduler."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Segmenter option key=value; repeatable.")
    ] = None,
    channel: Annotated[
        str | None, typer.Option(help="Channel index, or mean|max|sum, for multichannel images.")
    ] = None,
    series: Annotated[
        int | None, typer.Option(help="Image series of TIFFs that hold several (0, 1, ...).")
    ] = None,
    level: Annotated[
        int | None,
        typer.Option(
            help="Resolution level of OME-Zarr and pyramidal TIFF inputs (0: the finest)."
        ),
    ] = None,
    pixel_size: Annotated[
        str | None,
        typer.Option(
            help="Physical pixel size in µm (pixel_unit in run.yaml): 0.325, or one per "
            "axis: 2,0.325,0.325. Default: what the input states."
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes.")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads per LocalCluster worker.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over in an output that holds a run.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an earlier run of these settings: keeps done work and skips images "
            "unchanged since they completed (incremental).",
        ),
    ] = False,
    full: Annotated[
        bool,
        typer.Option("--full", help="Recompute every image, even unchanged ones."),
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Remove images of the store whose input is gone (else kept, reported orphaned).",
        ),
    ] = False,
    on_error: Annotated[
        str | None,
        typer.Option(
            "--on-error", help="fail: stop before compute on any bad input; skip: do the good ones."
        ),
    ] = None,
    no_space_check: Annotated[
        bool,
        typer.Option(
            "--no-space-check",
            help="Start even when the output's file system has less free space than the "
            "run's planned peak on disk.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Segment a collection into an OME-Zarr store."""
    from segpipe.config import load_config, parse_sets, parse_value

    try:
        overrides: dict[str, Any] = {
            "input": input,
            "output": output,
            "segmenter": segmenter,
            "tile": _parse_tile(tile),
            "halo": None if halo is None else parse_value(halo),
            "viewer_chunk": _parse_viewer_chunk(viewer_chunk),
            "cluster": cluster,
            "set": parse_sets(set_ or []),
            "channel": None if channel is None else parse_value(channel),
            "series": series,
            "level": level,
            "pixel_size": _parse_sizes(pixel_size),
            "workers": workers,
            "threads": threads,
            "overwrite": overwrite or None,
            "resume": resume or None,
            "full": full or None,
            "prune": prune or None,
            "on_error": on_error,
            "space_check": False if no_space_check else None,
        }
        if config is None and (input is None or output is None):
            raise typer.BadParameter("give --config, or both --input and --output.")
        cfg = load_config(config, overrides)
        t0 = time.perf_counter()
        rows = execute(cfg, show_progress=not quiet)
    except ImagesFailedError as err:
        _summary(err.rows, cfg.resolved().output)
        fail(err, 3)
    except SegpipeError as err:
        fail(err)
    except typer.BadParameter as err:
        fail(err, 2)
    except Exception as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status not in (401, 403):
            raise
        url = os.environ.get("PREFECT_API_URL", "the Prefect API")
        fail(
            SegpipeError(
                f"{url}: refused the credentials (HTTP {status}); check prefect.auth_string."
            )
        )
    from flows.monitor import run_mode

    _summary(rows, cfg.resolved().output, mode=run_mode(cfg))
    out.print(f"Done in {time.perf_counter() - t0:.1f} s.")


def _parse_sizes(text: str | None) -> float | list[float] | None:
    if text is None:
        return None
    return numbers(
        text,
        float,
        lambda: typer.BadParameter(f"--pixel-size {text!r}: expected numbers, e.g. 0.325"),
    )


def _parse_tile(text: str | None) -> str | int | list[int] | None:
    if text is None or text == "auto":
        return text
    return numbers(
        text,
        int,
        lambda: SegpipeError(f"--tile {text!r}: expected auto, an int or comma-separated ints."),
    )


def _parse_viewer_chunk(text: str | None) -> int | list[int] | None:
    if text is None:
        return None
    return numbers(
        text,
        int,
        lambda: SegpipeError(
            f"--viewer-chunk {text!r}: expected an int (0: unsharded) or comma-separated ints."
        ),
    )


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo collection and output go.")
    ] = Path("segpipe-demo"),
    segmenter: Annotated[str, typer.Option("--segmenter", "-s")] = "watershed",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Make a small synthetic collection of nuclei and run the whole flow on it locally."""
    from segpipe import synthetic
    from segpipe.config import RunConfig

    images = directory / "images"
    console.print(f"segpipe demo: writing synthetic nuclei to {images}/")
    synthetic.write_tiff(images / "plate-a.tif", (2048, 2048), seed=1)
    synthetic.write_tiff(images / "plate-b.tif", (1536, 2560), seed=2)
    synthetic.write_tiff(images / "stack-c.tif", (24, 512, 512), seed=3)
    cfg = RunConfig.model_validate(
        {
            "input": str(images),
            "output": str(directory / "out.zarr"),
            "tile": 512,
            "segmenter": {"name": segmenter},
            "overwrite": True,
        }
    )
    try:
        rows = execute(cfg, show_progress=not quiet)
    except SegpipeError as err:
        fail(err)
    _summary(rows, cfg.resolved().output)
    out.print(
        f"Open it in napari:  napari --plugin napari-ome-zarr {cfg.resolved().output}/plate-a",
        soft_wrap=True,
        highlight=False,
    )


@app.command()
def segmenters() -> None:
    """List the registered segmenters and their options."""
    from segpipe.segmenters import available, segmenter_class

    table = Table(title="segmenters")
    table.add_column("name")
    table.add_column("stitching")
    table.add_column("options (defaults)")
    for name in available():
        try:
            cls = segmenter_class(name)
        except SegpipeError as err:
            table.add_row(name, "?", f"unavailable: {err}")
            continue
        fields = cls.options_model.model_fields.items()
        opts = ", ".join(
            f"{k} (required)"
            if f.is_required()
            else f"{k}={f.get_default(call_default_factory=True)!r}"
            for k, f in fields
        )
        table.add_row(name, cls.stitch, opts)
    out.print(table)


from flows.cluster_cli import register as register_cluster  # noqa: E402
from flows.export_cli import register as register_export  # noqa: E402
from flows.plan_cli import register as register_plan  # noqa: E402
from flows.serve import register as register_serve  # noqa: E402
from flows.tools import register  # noqa: E402
from flows.train_cli import register as register_train  # noqa: E402

register(app)
register_serve(app)
register_cluster(app)
register_plan(app)
register_train(app)
register_export(app)


def main() -> None:
    """Console entry point."""
    # Prefect's console is silent but for critical records (flows/__init__.py); -v
    # shows its run logs, tracebacks included (Prefect reads this at its import).
    if "-v" in sys.argv or "--verbose" in sys.argv:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO"
        os.environ["PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL"] = "ERROR"
        sys.argv = [a for a in sys.argv if a not in ("-v", "--verbose")]
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    # Prefect's log handler writes each batch it cannot send to an unreachable API on
    # stderr ("--- Error logging to API ---") unless logging's errors are off; the run
    # says once that the API was away.
    logging.raiseExceptions = False
    try:
        app()
    except KeyboardInterrupt:  # before or after a command (its own are caught by _Commands)
        console.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()

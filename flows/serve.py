"""``segpipe serve``: a scheduled deployment of the collection flow, and the process running it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.console import console, fail
from segpipe.errors import SegpipeError

SERVE_EXAMPLES = """
[b]Examples[/b]

  PREFECT_API_URL=http://127.0.0.1:4200/api segpipe serve --config run.yaml --cron "0 2 * * *"
  segpipe serve --config run.yaml --cron "30 1 * * 1-5" --timezone Europe/Berlin --name weekdays
"""


def deployment_parameters(config: Any, *, full: bool = False) -> dict[str, Any]:
    """Flow parameters of a scheduled run: the resolved config, incremental unless ``full``.

    Every night's run reuses the store: images complete from unchanged inputs
    are skipped (``resume``), new and changed ones are segmented.
    """
    cfg = config.resolved().model_copy(update={"resume": not full, "full": full})
    return {"config": cfg.model_dump(mode="json", exclude={"prefect"})}


def check_cron(cron: str, timezone: str | None) -> Any:
    """A Prefect cron schedule, or a `SegpipeError` naming what is wrong."""
    from prefect.schedules import Cron

    try:
        return Cron(cron, timezone=timezone)
    except Exception as err:  # pydantic's ValidationError or a bad time zone
        raise SegpipeError(f"--cron {cron!r} / --timezone {timezone!r}: {err}") from err


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""

    @app.command(epilog=SERVE_EXAMPLES)
    def serve(
        config: Annotated[Path, typer.Option("--config", "-c", help="run.yaml of the job.")],
        cron: Annotated[
            str, typer.Option(help="When to run, as cron: '0 2 * * *' is 02:00 every night.")
        ] = "0 2 * * *",
        timezone: Annotated[
            str | None, typer.Option(help="Time zone of the cron, e.g. Europe/Berlin (UTC).")
        ] = None,
        name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
        full: Annotated[
            bool, typer.Option("--full", help="Every run recomputes every image.")
        ] = False,
    ) -> None:
        """Register a scheduled deployment on the Prefect API in use and run its flow runs.

        Runs are incremental: only images new or changed since the run that
        completed them are segmented. Stop with Ctrl-C (the schedule is paused).
        """
        from segpipe.config import load_config
        from segpipe.segmenters import get_segmenter

        try:
            cfg = load_config(config)
            get_segmenter(cfg.segmenter.name, **cfg.segmenter.options())  # fail before serving
            schedule = check_cron(cron, timezone)
        except SegpipeError as err:
            fail(err)
        if cfg.prefect is not None:  # before Prefect reads its settings
            if cfg.prefect.api_url:
                os.environ["PREFECT_API_URL"] = cfg.prefect.api_url
            if cfg.prefect.auth_string:
                os.environ["PREFECT_API_AUTH_STRING"] = cfg.prefect.auth_string
        from flows import start_embedded_api
        from flows.segment import run_tags, segment_collection

        start_embedded_api()  # in its own session: after Ctrl-C it is there to pause the schedule

        console.print(
            f"segpipe: serving [b]segpipe-run/{name}[/b] ({cron}, {timezone or 'UTC'}) on "
            f"{os.environ.get('PREFECT_API_URL', 'the embedded Prefect API')}",
            highlight=False,
        )
        segment_collection.serve(
            name=name,
            schedules=[schedule],
            parameters=deployment_parameters(cfg, full=full),
            tags=[*run_tags(cfg), "scheduled"],
            description=f"segpipe {cfg.segmenter.name}: {cfg.input} → {cfg.output}",
            limit=1,  # one run of a store at a time; a late one waits for the next
        )

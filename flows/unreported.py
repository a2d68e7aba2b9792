"""A run whose end its Prefect API never heard of: noted in the output, and settled by
the next run there.

A run that ends while the API is unreachable cannot set its final state, and the
API shows it RUNNING for good once it is back. The run writes its flow run's id
beside its results (``_segpipe/unreported.json``); the next run on that output and
that API marks it CRASHED, saying why, and removes the note.
"""

from __future__ import annotations

import json
from typing import Any

from segpipe.io import storage
from segpipe.io.storage import Location
from segpipe.io.store import SCRATCH, write_json

__all__ = ["note", "settle"]

NAME = "unreported.json"


def _path(output: str) -> Location:
    return storage.location(storage.join(output, SCRATCH, NAME))


def note(output: str, flow_run: str, api: str, error: str) -> None:
    """Record that flow run ``flow_run`` of ``api`` ended unreported, because of ``error``."""
    write_json(_path(output), {"flow_run": flow_run, "api": api, "error": error})


def settle(output: str, api: str, logger: Any) -> None:
    """Mark the run noted in ``output`` CRASHED on ``api`` (if it is that API's) and
    remove the note; one the API cannot take now stays for the next run."""
    path = _path(output)
    try:
        noted = json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return
    if noted.get("api") != api:
        return
    from prefect import get_client
    from prefect.states import Crashed

    from flows.monitor import API_ERRORS

    message = (
        f"ended while the Prefect API was unreachable ({noted.get('error', '?')}); its "
        "finished work was kept and a later run took it over"
    )
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(noted["flow_run"], Crashed(message=message), force=True)
    except API_ERRORS as err:
        logger.warning("could not mark the unreported run %s: %s", noted["flow_run"], err)
        return
    except Exception as err:  # e.g. a run the API no longer has
        logger.warning("the unreported run %s: %s", noted["flow_run"], err)
    storage.remove_tree(path)
    logger.info("marked run %s, which ended unreported, crashed", noted["flow_run"])

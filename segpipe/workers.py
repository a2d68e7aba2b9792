"""Whether a cluster's workers can run segpipe as this process does: checked before any
compute, and again for workers that join later.

A worker from another environment (an image or a virtualenv that differs from the
client's) fails every task it is given, and Dask's own version check does not look
at segpipe or the libraries its results depend on. Each worker evaluates one
expression (``eval`` travels by reference, so a worker without segpipe can run it)
and reports its versions; any difference is one line naming the worker.
"""

from __future__ import annotations

from typing import Any

from distributed import Client

from segpipe.errors import SegpipeError

__all__ = ["LIBRARIES", "WorkerMismatchError", "check_workers", "versions"]

LIBRARIES = ("segpipe", "numpy", "zarr", "skimage", "scipy", "numcodecs")
"""Modules whose version decides segpipe's results: a worker must have the client's."""

_PROBE = (
    "dict([('python', '%d.%d' % __import__('sys').version_info[:2])] + "
    "[(n, getattr(__import__(n), '__version__', '?')) for n in " + repr(LIBRARIES) + "])"
)


class WorkerMismatchError(SegpipeError, RuntimeError):
    """A worker cannot run segpipe as the client does."""


def versions() -> dict[str, str]:
    """This process's Python and `LIBRARIES` versions, as the probe reports them."""
    mine: dict[str, str] = eval(_PROBE)  # the workers' very expression
    return mine


def check_workers(client: Client, checked: set[str] | None = None) -> set[str]:
    """Check every worker not in ``checked``; return the addresses checked so far.

    Raises
    ------
    WorkerMismatchError
        Naming each worker that cannot import segpipe or whose versions differ,
        with what differs.
    """
    checked = set() if checked is None else checked
    workers = [w for w in client.scheduler_info()["workers"] if w not in checked]
    if not workers:
        return checked
    try:  # Dask's own check: dask, distributed, cloudpickle, msgpack... and Python
        client.get_versions(check=True)
    except ValueError as err:
        raise WorkerMismatchError(" ".join(str(err).split())) from err
    mine = versions()
    found: dict[str, Any] = client.run(eval, _PROBE, workers=workers, on_error="return")
    problems = []
    for worker, theirs in sorted(found.items()):
        if isinstance(theirs, BaseException):
            problems.append(f"{worker} cannot run segpipe ({type(theirs).__name__}: {theirs})")
            continue
        differ = [f"{k} {theirs.get(k)} (here {v})" for k, v in mine.items() if theirs.get(k) != v]
        if differ:
            problems.append(f"{worker} has {', '.join(differ)}")
    if problems:
        raise WorkerMismatchError(
            f"{len(problems)} of {len(found)} Dask worker(s) do not match this environment: "
            + "; ".join(problems)
            + ". Install segpipe and the same libraries on the workers (same image or venv)."
        )
    return checked | set(found)

"""Whether a cluster's workers can run segpipe as this process does: checked before any
compute, and again for workers that join later.

A worker from another environment (an image or a virtualenv that differs from the
client's) fails every task it is given, and Dask's own version check does not look
at segpipe or the libraries its results depend on. Each worker evaluates one
expression (``eval`` travels by reference, so a worker without segpipe can run it)
and reports its versions; any difference is one line naming the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from distributed import Client

from segpipe.cluster import cancel_all
from segpipe.errors import SegpipeError

__all__ = [
    "LIBRARIES",
    "NoWorkersError",
    "WorkerMismatchError",
    "WorkerWatch",
    "check_workers",
    "versions",
]

LIBRARIES = ("segpipe", "numpy", "zarr", "skimage", "scipy", "numcodecs")
"""Modules whose version decides segpipe's results: a worker must have the client's."""

_PROBE = (
    "dict([('python', '%d.%d' % __import__('sys').version_info[:2])] + "
    "[(n, getattr(__import__(n), '__version__', '?')) for n in " + repr(LIBRARIES) + "])"
)


class WorkerMismatchError(SegpipeError, RuntimeError):
    """A worker cannot run segpipe as the client does."""


class NoWorkersError(SegpipeError, TimeoutError):
    """A run's cluster had no worker for longer than the run waits for one."""


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


class WorkerWatch:
    """Bound the time a run waits on a cluster without workers.

    A thread looks at the scheduler's workers every ``every`` seconds. While there
    are none it says so, once, with ``say``; after ``bound`` seconds without any it
    sets `expired` and cancels the client's futures, so that every wait on them
    ends; the run then raises `error`.

    Parameters
    ----------
    client : distributed.Client
        The run's client.
    address : str
        The scheduler's address, for the messages.
    bound : float
        Seconds without a worker before the run stops.
    say : callable
        Called with a line when the waiting starts and when a worker ends it.
    every : float
        Seconds between looks.
    """

    def __init__(
        self,
        client: Client,
        address: str,
        bound: float,
        say: Callable[[str], None],
        every: float = 1.0,
    ) -> None:
        self.client, self.address, self.bound, self.say = client, address, bound, say
        self.expired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, args=(every,), name="segpipe-worker-watch", daemon=True
        )

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def error(self) -> NoWorkersError:
        """The one line for a run that waited `bound` seconds for a worker."""
        return NoWorkersError(
            f"no Dask worker on {self.address} for {self.bound:g} s (worker_wait); the "
            "blocks and images that finished are kept: start workers, e.g. `dask worker "
            f"{self.address}`, and rerun with --resume"
        )

    def _workers(self) -> int:
        try:
            return len(self.client.scheduler_info()["workers"])
        except Exception:  # a client closing: the run's own error says why
            return 1

    def _watch(self, every: float) -> None:
        since: float | None = None
        while not self._stop.wait(every):
            if self._workers():
                if since is not None:
                    self.say(f"a Dask worker joined {self.address}; going on")
                since = None
                continue
            if since is None:
                since = time.monotonic()
                self.say(
                    f"no Dask worker on {self.address}: waiting up to {self.bound:g} s "
                    "for one (worker_wait)"
                )
            elif time.monotonic() - since > self.bound:
                self.expired = True
                cancel_all(self.client)
                return

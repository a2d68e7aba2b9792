"""Dask cluster construction: a LocalCluster on loopback, an existing scheduler, or a
back-end of `segpipe.backends` (local-cuda, SLURM, Kubernetes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, Future, LocalCluster, WorkerPlugin
from distributed.security import Security

from segpipe import backends
from segpipe.config import (
    CLUSTER_CHOICES,
    KubernetesConfig,
    RunConfig,
    SlurmConfig,
    StorageConfig,
    TLSConfig,
)
from segpipe.errors import ConfigError, SegpipeError
from segpipe.io import storage


def local_cluster(*, workers: int | None = None, threads: int | None = None) -> LocalCluster:
    """A LocalCluster sized to this machine, bound to 127.0.0.1.

    One worker process with a thread per core by default: the block functions
    release the GIL (NumPy, SciPy, scikit-image, Blosc), and one process keeps
    the memory of the whole run small.
    """
    cores = os.cpu_count() or 1
    n = workers or 1
    # A task whose worker dies is retried on another up to this many times, then
    # reported (by block) as killing workers; the other blocks go on.
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        return _local(n, threads or max(cores // n, 1))


ALLOWED_FAILURES = 3


class _ClientGone(logging.Filter):
    """Drops the scheduler's CRITICAL report of a block that erred after its client left
    (a run that stopped at its first error): the error reached the user already, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Closed comm")


logging.getLogger("distributed.scheduler").addFilter(_ClientGone())


class _SchedulerGone(logging.Filter):
    """Drops the client's errors about a lost scheduler (giving up reconnecting, or its
    reconnection cancelled by the run's end, with a traceback; a message sent on its
    closed connection): the run then ends with its own line, which names the scheduler
    and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(("Failed to reconnect to scheduler", "Batched Comm Closed")):
            return False
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


for _name in ("distributed.client", "distributed.batched"):
    logging.getLogger(_name).addFilter(_SchedulerGone())
_prestarted: list[tuple[tuple[int | None, int | None], LocalCluster]] = []


def prestart_local(*, workers: int | None = None, threads: int | None = None) -> None:
    """Start the run's LocalCluster now, while other start-up work goes on (call from the
    main thread); `connect` ``local`` with the same shape takes it instead of starting
    one (and closes it after, as any cluster it starts)."""
    _prestarted.append(((workers, threads), local_cluster(workers=workers, threads=threads)))


def _take_prestarted(workers: int | None, threads: int | None) -> LocalCluster | None:
    for i, (shape, cluster) in enumerate(_prestarted):
        if shape == (workers, threads) and cluster.status.name == "running":
            del _prestarted[i]
            return cluster
    return None


def _local(n: int, threads: int) -> LocalCluster:
    with dask.config.set(backends.worker_env_config()), _signals_held() as held:
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=50,  # block errors reach the user once, through the client
        )
    if held:  # a SIGTERM came while it started: closed whole, then handled as usual
        cluster.close()
        signal.raise_signal(held[0])
    return cluster


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM off while the LocalCluster starts its worker processes.

    A Ctrl-C in a terminal reaches every process of its group: workers would die of
    it, each printing a traceback, while this process closes them anyway. A process
    inherits an ignored signal (a blocked one it does not: the spawn clears the mask),
    so SIGINT is ignored and only this process sees a later Ctrl-C; one within the
    second or two the workers take to start is lost. A SIGTERM (to this process alone)
    is noted and given back once the start ends: one that interrupts it leaves a
    cluster half started, which no one can close. Off the main thread nothing changes.
    """
    held: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield held
        return
    term = signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, term)


@contextmanager
def connect(
    spec: str = "local",
    *,
    workers: int | None = None,
    threads: int | None = None,
    security: TLSConfig | None = None,
    slurm: SlurmConfig | None = None,
    kubernetes: KubernetesConfig | None = None,
) -> Iterator[Client]:
    """A Client for ``spec``; a cluster started here (all but ``tcp://``/``tls://``) is
    closed after, which cancels SLURM jobs and deletes a Kubernetes DaskCluster.

    Parameters
    ----------
    spec : str
        ``local``, ``local-cuda``, ``slurm``, ``kubernetes``, ``tcp://host:port`` or
        ``tls://host:port``.
    workers, threads : int, optional
        LocalCluster shape (``local``); ``threads`` is also per GPU worker (``local-cuda``).
    security : TLSConfig, optional
        Dask TLS: for a ``tls://`` scheduler, and passed on to SLURM's scheduler and jobs.
    slurm, kubernetes : optional
        The run file's sections for those back-ends (SLURM has defaults).

    Raises
    ------
    ConfigError
        If ``spec`` is not a known cluster kind, or its back-end is not installed.
    SegpipeError
        If the scheduler cannot be reached.
    """
    if spec == "local":
        started = _take_prestarted(workers, threads) or local_cluster(
            workers=workers, threads=threads
        )
        with started as cluster, Client(cluster) as client:
            yield client
        return
    if spec in ("local-cuda", "slurm", "kubernetes"):
        config = RunConfig.model_construct(
            cluster=spec, security=security, slurm=slurm, kubernetes=kubernetes
        )
        with _started(spec, config, threads) as cluster, Client(cluster) as client:
            yield client
        return
    if not spec.startswith(("tcp://", "tls://")):
        raise ConfigError(f"cluster {spec!r}: expected {CLUSTER_CHOICES}.")
    kwargs: dict[str, Any] = {}
    if security is not None:
        kwargs["security"] = Security(
            tls_ca_file=security.ca_file,
            tls_client_cert=security.cert,
            tls_client_key=security.key,
            require_encryption=True,
        )
    elif spec.startswith("tls://"):
        raise ConfigError(
            f"cluster {spec}: a tls:// scheduler needs `security` (ca_file, cert, key)."
        )
    try:
        client = Client(spec, timeout="15s", **kwargs)
    except OSError as err:
        raise SegpipeError(f"cluster {spec}: cannot reach the Dask scheduler ({err}).") from err
    try:
        yield client
    finally:
        client.close()


@contextmanager
def connect_run(config: RunConfig) -> Iterator[Client]:
    """`connect` with everything a run file says about its cluster."""
    with connect(
        config.cluster,
        workers=config.workers,
        threads=config.threads,
        security=config.security,
        slurm=config.slurm,
        kubernetes=config.kubernetes,
    ) as client:
        yield client


def share_storage(client: Client, config: RunConfig) -> None:
    """Give every worker, and those that join later, run.yaml's ``storage:``. Call it
    after the workers are checked: a worker that cannot import segpipe would fail to
    load the plugin, where the check names it in one line."""
    client.register_plugin(StorageSettings(config.storage), name="segpipe-storage")


class StorageSettings(WorkerPlugin):
    """run.yaml's ``storage:`` on every worker, those that join later too
    (`segpipe.io.storage.configure`): the workers open the store's URLs themselves."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config

    def setup(self, worker: Any) -> None:
        storage.configure(self.config)


@contextmanager
def _started(kind: str, config: RunConfig, threads: int | None) -> Iterator[Any]:
    if kind == "local-cuda":
        cluster = backends.local_cuda_cluster(threads=threads)
    elif kind == "slurm":
        cluster = backends.slurm_cluster(config)
    else:
        if config.kubernetes is None:
            raise ConfigError(
                "cluster 'kubernetes' needs a `kubernetes:` section (at least `image`)."
            )
        cluster = backends.kubernetes_cluster(config)
    try:
        yield cluster
    finally:
        cluster.close()


def cancel_all(client: Client) -> None:
    """Cancel every future of ``client``, so that each wait on them ends (a closed
    client's loop no longer tells waiters anything)."""
    if client.status != "running":  # its scheduler gone or it closing: nothing to tell
        return
    with contextlib.suppress(Exception):  # the scheduler lost meanwhile
        client.cancel([Future(key, client) for key in list(client.futures)], force=True)


def dashboard(client: Client) -> str:
    """The Dask dashboard address, or a note that it is off."""
    try:
        link = client.dashboard_link
    except Exception:  # no HTTP server (e.g. bokeh missing)
        link = ""
    return link or "(dashboard not available)"

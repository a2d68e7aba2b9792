"""Cluster back-ends beyond one machine: SLURM jobs (dask-jobqueue), a Kubernetes
``DaskCluster`` (dask-kubernetes operator) and one worker per local GPU (dask-cuda).

Each back-end has a pure builder that returns what would be submitted (a job script,
a cluster resource) without submitting anything, and a constructor that starts it.
"""

from __future__ import annotations

import asyncio
import copy
import shlex
import shutil
import signal
import sys
import threading
from typing import Any

import dask
from distributed import LocalCluster
from distributed.security import Security

from segpipe.config import KubernetesConfig, RunConfig, SlurmConfig, TLSConfig
from segpipe.errors import ConfigError, SegpipeError

# glibc malloc settings for worker processes. Dask's nanny sets a 64 KiB trim threshold,
# so every block's arrays (MBs each) go back to the kernel when freed and are faulted
# in again, zeroed, by the next block: 8192² otsu took 9.1 s that way, 7.5 s with these
# (bench/throughput.py). Heap memory kept is bounded by one block's working set per thread.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(64 << 20),  # blocks' arrays come from the heap ...
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),  # ... and stay there for the next block
}
WORKER_ENV_VAR = "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"
"""The environment variable that gives remote nannies `WORKER_ENV` (its value is
``repr(WORKER_ENV)``, which Dask reads as a dict and merges into its default)."""


def worker_env_config() -> dict[str, Any]:
    """Dask config that makes nannies started in this process use `WORKER_ENV`."""
    key = "distributed.nanny.pre-spawn-environ"
    return {key: {**(dask.config.get(key, default=None) or {}), **WORKER_ENV}}


GPU_RESOURCE = "GPU"
"""The Dask worker resource a GPU worker advertises; deep block tasks ask for it."""
K8S_GPU = "nvidia.com/gpu"
"""The extended resource the NVIDIA device plugin offers Kubernetes pods."""
K8S_TLS_DIR = "/etc/segpipe/tls"
"""Where ``kubernetes.tls_secret`` is mounted in scheduler and worker pods."""
SCHEDULER_PORT = 8786


def _need(module: str, package: str, cluster: str) -> Any:
    """Import an optional back-end, or say which package to install.

    The process keeps its SIGINT handler: dask-jobqueue's import replaces it with one
    that exits with status 0, so a Ctrl-C would end the run as if it had succeeded,
    without its one line."""
    import importlib

    handler = signal.getsignal(signal.SIGINT)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"cluster {cluster!r} needs {package}: pip install 'segpipe[cluster]' "
            f"(or pip install {package})."
        ) from err
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def tls_security(tls: TLSConfig) -> Security:
    """One certificate and key for every role (scheduler, worker, client), TLS required.

    Parameters
    ----------
    tls : TLSConfig
        Paths of the CA certificate and of this side's certificate and key; on SLURM
        the workers read the same paths, so they must be on a shared file system.

    Returns
    -------
    distributed.security.Security
    """
    return Security(
        tls_ca_file=tls.ca_file,
        tls_scheduler_cert=tls.cert,
        tls_scheduler_key=tls.key,
        tls_worker_cert=tls.cert,
        tls_worker_key=tls.key,
        tls_client_cert=tls.cert,
        tls_client_key=tls.key,
        require_encryption=True,
    )


# --- SLURM ------------------------------------------------------------------------


def slurm_kwargs(slurm: SlurmConfig, security: TLSConfig | None = None) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for one ``slurm:`` section.

    GPUs become ``--gres=gpu:N`` on the job and ``--resources GPU=n`` on each of its
    worker processes, so deep block tasks (which ask for ``GPU``) land only there.
    """
    directives = list(slurm.job_extra_directives)
    worker_args: list[str] = []
    if slurm.gpus:
        directives.append(f"--gres=gpu:{slurm.gpus}")
        worker_args += ["--resources", f"{GPU_RESOURCE}={slurm.gpus // slurm.processes}"]
    kwargs: dict[str, Any] = {
        "queue": slurm.partition,
        "account": slurm.account,
        "cores": slurm.cores,
        "memory": slurm.memory,
        "processes": slurm.processes,
        "walltime": slurm.walltime,
        "job_name": slurm.job_name,
        "job_extra_directives": directives,
        "job_script_prologue": [*slurm.job_script_prologue, _env_export()],
        "worker_extra_args": worker_args,
        # The compute nodes run the same environment from a shared file system.
        "python": slurm.python or sys.executable,
        "local_directory": slurm.local_directory,
        "log_directory": slurm.log_directory,
        "interface": slurm.interface,
    }
    if security is not None:
        # The scheduler (here) and the workers (job script: --tls-ca-file ...) use TLS.
        kwargs["security"] = tls_security(security)
        kwargs["protocol"] = "tls://"
    return kwargs


def _slurm_section(config: RunConfig) -> SlurmConfig:
    return config.slurm or SlurmConfig()


def slurm_job_script(config: RunConfig) -> str:
    """The batch script dask-jobqueue would submit for each worker job; nothing is submitted.

    The scheduler address in it is dask-jobqueue's placeholder: the real one is known
    only once the scheduler runs.

    Parameters
    ----------
    config : RunConfig
        Its ``slurm`` section (defaults if absent) and ``security``.

    Returns
    -------
    str
        The ``#!/usr/bin/env bash`` script with its ``#SBATCH`` header and worker command.

    Raises
    ------
    ConfigError
        If dask-jobqueue is not installed.

    Examples
    --------
    >>> cfg = RunConfig(input="a.tif", output="o.zarr", cluster="slurm",
    ...                 slurm={"partition": "gpu", "gpus": 1})
    >>> "#SBATCH --gres=gpu:1" in slurm_job_script(cfg)
    True
    """
    jobqueue = _need("dask_jobqueue", "dask-jobqueue", "slurm")
    kwargs = slurm_kwargs(_slurm_section(config), config.security)

    async def script() -> str:
        # Built asynchronously and never awaited, the cluster starts no scheduler
        # and submits no job: only its job template is rendered.
        cluster = jobqueue.SLURMCluster(asynchronous=True, **kwargs)
        try:
            return str(cluster.job_script())
        finally:
            await cluster.close()

    return asyncio.run(script())


def slurm_cluster(config: RunConfig) -> Any:
    """Start a SLURMCluster (its scheduler runs in this process) and request its jobs.

    Returns
    -------
    dask_jobqueue.SLURMCluster
        Scaled to ``slurm.jobs`` jobs (default 1), or adaptive between
        ``slurm.adaptive.minimum`` and ``maximum`` jobs. Closing it cancels the jobs.

    Raises
    ------
    ConfigError
        If dask-jobqueue is missing or ``sbatch`` is not on this machine.
    """
    jobqueue = _need("dask_jobqueue", "dask-jobqueue", "slurm")
    if shutil.which("sbatch") is None:
        # dask-jobqueue would start a scheduler and fail to submit in the background,
        # leaving the run waiting for workers that never come.
        raise ConfigError(
            "cluster 'slurm': sbatch not found; run on a SLURM login node or in a job "
            "(deploy/slurm/segpipe.sbatch). `segpipe cluster-spec` shows the job script."
        )
    slurm = _slurm_section(config)
    cluster = jobqueue.SLURMCluster(**slurm_kwargs(slurm, config.security))
    try:
        if slurm.adaptive is not None:
            cluster.adapt(minimum_jobs=slurm.adaptive.minimum, maximum_jobs=slurm.adaptive.maximum)
        else:
            cluster.scale(jobs=slurm.jobs or 1)
    except BaseException:
        cluster.close()
        raise
    return cluster


# --- Kubernetes -------------------------------------------------------------------


def _tls_args() -> list[str]:
    return [
        "--tls-ca-file",
        f"{K8S_TLS_DIR}/ca.pem",
        "--tls-cert",
        f"{K8S_TLS_DIR}/tls.crt",
        "--tls-key",
        f"{K8S_TLS_DIR}/tls.key",
    ]


def _drop_none(value: Any) -> Any:
    """The CRD's schema types every field: an explicit null (an unset env) is invalid."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def worker_resources(kube: KubernetesConfig) -> dict[str, dict[str, str]]:
    """Requests and limits of one worker container (quantities as strings, as the CRD wants)."""
    requests = {"cpu": str(kube.cores), "memory": kube.memory}
    limits = {"cpu": str(kube.cores), "memory": kube.memory}
    if kube.gpus:
        # Extended resources are set as limits; Kubernetes copies them to requests.
        limits[K8S_GPU] = str(kube.gpus)
    requests.update(kube.requests)
    limits.update(kube.limits)
    return {"requests": requests, "limits": limits}


def kubernetes_cluster_spec(config: RunConfig) -> dict[str, Any]:
    """The ``DaskCluster`` resource (``kubernetes.dask.org/v1``) the operator would run.

    Built by dask-kubernetes' ``make_cluster_spec``, then patched: workers get CPU,
    memory and ``nvidia.com/gpu`` requests/limits and ``--resources GPU=n``; the
    scheduler no GPU; both run ``dask scheduler``/``dask worker`` (the ``dask-scheduler``
    script of the template is gone from distributed); with ``kubernetes.tls_secret``
    both speak TLS with the certificates of that Secret. Workers get the section's
    ``volumes`` and ``volume_mounts``, and ``secret_env`` / ``env_from_secrets`` as
    references to the Secrets. Nothing is submitted.

    Parameters
    ----------
    config : RunConfig
        Its ``kubernetes`` section is required.

    Returns
    -------
    dict
        ``apiVersion``, ``kind``, ``metadata`` and ``spec`` (scheduler, worker); valid
        against the DaskCluster CRD that dask-kubernetes ships.

    Raises
    ------
    ConfigError
        If the ``kubernetes`` section is missing or dask-kubernetes is not installed.
    """
    kube = config.kubernetes
    if kube is None:
        raise ConfigError("cluster 'kubernetes' needs a `kubernetes:` section (at least `image`).")
    operator = _need("dask_kubernetes.operator", "dask-kubernetes", "kubernetes")
    replicas = kube.adaptive.minimum if kube.adaptive is not None else kube.workers
    scheme = "tls" if kube.tls_secret else "tcp"
    worker_command = ["dask", "worker"]
    if kube.tls_secret:
        # The operator's DASK_SCHEDULER_ADDRESS says tcp://: name the TLS address instead.
        worker_command.append(f"tls://{kube.name}-scheduler:{SCHEDULER_PORT}")
    worker_command += ["--nthreads", str(kube.cores)]
    if kube.gpus:
        worker_command += ["--resources", f"{GPU_RESOURCE}={kube.gpus}"]
    if kube.tls_secret:
        worker_command += _tls_args()
    spec: dict[str, Any] = operator.make_cluster_spec(
        name=kube.name,
        image=kube.image,
        n_workers=replicas,
        resources=worker_resources(kube),
        env={WORKER_ENV_VAR: repr(WORKER_ENV), **kube.env},
        worker_command=worker_command,
        scheduler_service_type=kube.scheduler_service_type,
    )
    spec = copy.deepcopy(spec)
    if kube.namespace:
        spec["metadata"]["namespace"] = kube.namespace
    spec["metadata"]["labels"] = {"app.kubernetes.io/part-of": "segpipe"}
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    scheduler["args"] = ["dask", "scheduler", "--host", "0.0.0.0", "--port", str(SCHEDULER_PORT)]
    if kube.tls_secret:
        scheduler["args"] += ["--protocol", scheme, *_tls_args()]
    # Block tasks run on workers; the scheduler needs neither their CPU nor a GPU.
    scheduler["resources"] = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if kube.tls_secret:
        mount = {"name": "dask-tls", "mountPath": K8S_TLS_DIR, "readOnly": True}
        volume = {"name": "dask-tls", "secret": {"secretName": kube.tls_secret}}
        for part in ("scheduler", "worker"):
            pod = spec["spec"][part]["spec"]
            pod["containers"][0]["volumeMounts"] = [mount]
            pod["volumes"] = [volume]
    _worker_data_access(spec["spec"]["worker"]["spec"], kube)
    return dict(_drop_none(spec))


def _worker_data_access(pod: dict[str, Any], kube: KubernetesConfig) -> None:
    """Give the worker pod ``kubernetes.volumes`` and its mounts, and the environment
    from Secrets: references only (``secretKeyRef``, ``secretRef``), so the resource
    never holds a secret's value. The scheduler gets none of them: it reads no data."""
    container = pod["containers"][0]
    if kube.volumes:
        pod["volumes"] = [*pod.get("volumes", []), *copy.deepcopy(kube.volumes)]
    if kube.volume_mounts:
        mounts = copy.deepcopy(kube.volume_mounts)
        container["volumeMounts"] = [*container.get("volumeMounts", []), *mounts]
    for name, ref in kube.secret_env.items():
        value_from = {"secretKeyRef": {"name": ref.secret, "key": ref.key}}
        container.setdefault("env", []).append({"name": name, "valueFrom": value_from})
    if kube.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in kube.env_from_secrets]


def kubernetes_cluster(config: RunConfig) -> Any:
    """Create the ``DaskCluster`` through the operator and wait for its scheduler.

    Returns
    -------
    dask_kubernetes.operator.KubeCluster
        Deleted from Kubernetes when closed.

    Raises
    ------
    SegpipeError
        If Kubernetes refuses or the operator does not answer.
    ConfigError
        With TLS asked for: KubeCluster talks to its scheduler over plain TCP (it
        opens its own connection without certificates), so a TLS cluster is applied
        with kubectl and reached as ``tls://``.
    """
    kube = config.kubernetes
    spec = kubernetes_cluster_spec(config)
    assert kube is not None  # kubernetes_cluster_spec checked it
    if kube.tls_secret or config.security is not None:
        raise ConfigError(
            "cluster 'kubernetes': dask-kubernetes' KubeCluster cannot reach a TLS scheduler. "
            "Apply the spec instead (segpipe cluster-spec --config run.yaml | kubectl apply -f -) "
            f"and run with cluster: tls://{kube.name}-scheduler:{SCHEDULER_PORT} and `security`."
        )
    operator = _need("dask_kubernetes.operator", "dask-kubernetes", "kubernetes")
    try:
        cluster = operator.KubeCluster(
            custom_cluster_spec=spec, namespace=kube.namespace, shutdown_on_close=True, quiet=True
        )
    except Exception as err:  # kr8s and the operator raise plain errors (credentials, timeouts)
        raise SegpipeError(
            f"cluster 'kubernetes': cannot create DaskCluster {kube.name!r} ({err}). Check the "
            "kubectl context (kubectl get daskclusters) and that the dask-kubernetes operator runs."
        ) from err
    try:
        if kube.adaptive is not None:
            cluster.adapt(minimum=kube.adaptive.minimum, maximum=kube.adaptive.maximum)
    except BaseException:
        cluster.close()
        raise
    return cluster


# --- local GPUs -------------------------------------------------------------------


def _env_export() -> str:
    """The job script line that gives the job's nannies segpipe's malloc settings."""
    return f"export {WORKER_ENV_VAR}={shlex.quote(repr(WORKER_ENV))}"


def local_cuda_cluster(*, threads: int | None = None) -> LocalCluster:
    """One worker per visible GPU (dask-cuda), each advertising ``GPU=1``, on 127.0.0.1.

    Raises
    ------
    ConfigError
        If dask-cuda is not installed (it needs a CUDA machine; segpipe does not
        depend on it).
    """
    try:
        from dask_cuda import LocalCUDACluster  # type: ignore[import-not-found,unused-ignore]
    except ImportError as err:
        raise ConfigError(
            "cluster 'local-cuda' needs dask-cuda (one worker per GPU): install it on a "
            "CUDA machine with pip install dask-cuda, or use cluster 'local'."
        ) from err
    with dask.config.set(worker_env_config()):
        cluster: LocalCluster = LocalCUDACluster(
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            threads_per_worker=threads or 1,
            resources={GPU_RESOURCE: 1},
            silence_logs=50,
        )
    return cluster

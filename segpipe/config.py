"""Run configuration: a YAML file and command-line overrides, validated once at the boundary."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from segpipe.errors import ConfigError, SegpipeError

if TYPE_CHECKING:
    from segpipe.io.readers import SourceSpec
    from segpipe.segmenters.base import Segmenter


class SegmenterConfig(BaseModel):
    """``name`` plus any option of that segmenter (validated by the segmenter)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "otsu"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TLSConfig(BaseModel):
    """Dask TLS: CA certificate and this client's certificate and key (paths)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ca_file: str
    cert: str
    key: str


class PrefectConfig(BaseModel):
    """Where the flow reports: an API URL and, for a server started with an auth
    string (``PREFECT_SERVER_API_AUTH_STRING``), the same ``user:password``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    api_url: str | None = None
    auth_string: str | None = Field(None, repr=False)


class AdaptiveConfig(BaseModel):
    """Adaptive scaling bounds: Dask adds and removes workers (SLURM jobs) between these."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    minimum: int = Field(default=0, ge=0)
    """Fewest jobs (SLURM) or workers (Kubernetes) kept while the run lasts."""
    maximum: int = Field(ge=1)
    """Most jobs (SLURM) or workers (Kubernetes)."""

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveConfig:
        if self.minimum > self.maximum:
            raise ValueError(
                f"expected adaptive minimum <= maximum, got {self.minimum} > {self.maximum} instead"
            )
        return self


def _positive_bytes(value: str, example: str) -> str:
    """``value`` if Dask reads it as a byte count above 0 (``64GB``, ``500MiB``)."""
    from dask.utils import parse_bytes

    try:
        size = parse_bytes(value)
    except (ValueError, TypeError):
        size = 0
    if size <= 0:
        raise ValueError(f"expected a memory size above 0 such as {example}, got {value!r}")
    return value


class SlurmConfig(BaseModel):
    """``cluster: slurm``: dask-jobqueue's SLURMCluster; each SLURM job runs Dask workers.

    The scheduler runs where ``segpipe run`` runs (a login node, or the job that
    ``deploy/slurm/segpipe.sbatch`` starts); workers on compute nodes must reach it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    partition: str | None = None
    """SLURM partition (``#SBATCH -p``; dask-jobqueue calls it ``queue``)."""
    account: str | None = None
    """Account charged (``#SBATCH -A``)."""
    cores: int = Field(default=8, ge=1)
    """CPU cores per job (``--cpus-per-task``), shared by the job's worker processes."""
    memory: str = "32GB"
    """Memory per job, e.g. ``64GB`` (``--mem``), shared by the job's worker processes."""
    processes: int = Field(default=1, ge=1)
    """Dask worker processes per job; threads per process = cores / processes."""
    gpus: int = Field(default=0, ge=0)
    """GPUs per job (``--gres=gpu:N``); each worker process advertises ``GPU=gpus/processes``."""
    walltime: str = "04:00:00"
    """Job time limit (``#SBATCH -t``), ``HH:MM:SS`` or ``D-HH:MM:SS``."""
    jobs: int | None = Field(default=None, ge=1)
    """Fixed number of jobs to scale to (default 1 unless ``adaptive`` is given)."""
    adaptive: AdaptiveConfig | None = None
    """Scale between ``minimum`` and ``maximum`` jobs with the load instead of ``jobs``."""
    job_extra_directives: list[str] = []
    """More ``#SBATCH`` directives, without the prefix, e.g. ``["--qos=high", "--exclusive"]``."""
    job_script_prologue: list[str] = []
    """Shell lines run before the worker starts, e.g. ``module load cuda`` or
    ``source /shared/segpipe/.venv/bin/activate``."""
    python: str | None = None
    """Python on the compute nodes (default: this interpreter's path, right on a shared FS)."""
    local_directory: str | None = None
    """Worker scratch (spill) directory on the compute node, e.g. ``$TMPDIR``."""
    log_directory: str | None = None
    """Where SLURM writes the jobs' stdout/stderr (``-o``/``-e``); default: SLURM's."""
    interface: str | None = None
    """Network interface workers and scheduler use, e.g. ``ib0``."""
    job_name: str = "segpipe-worker"
    """SLURM job name (``#SBATCH -J``)."""

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        return _positive_bytes(value, "64GB")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", value.strip())
        if m is None or int(m[3]) > 59 or int(m[4]) > 59 or (m[1] and int(m[2]) > 23):
            raise ValueError(f"expected HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00, got {value!r}")
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> SlurmConfig:
        if self.jobs is not None and self.adaptive is not None:
            raise ValueError("expected `jobs` or `adaptive`, got both instead")
        if self.processes > self.cores:
            raise ValueError(
                f"expected processes <= cores, got {self.processes} > {self.cores} instead"
            )
        if self.gpus % self.processes:
            raise ValueError(
                f"expected gpus divisible by processes (each worker process gets the same "
                f"number of GPUs), got gpus={self.gpus}, processes={self.processes} instead"
            )
        return self


_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label: volume names
_K8S_SECRET = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a DNS subdomain
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MOUNT_KEYS = (
    "name",
    "mountPath",
    "readOnly",
    "subPath",
    "subPathExpr",
    "mountPropagation",
    "recursiveReadOnly",
)
"""The fields of a Kubernetes ``VolumeMount``."""


def _secret_name(value: str) -> str:
    if not _K8S_SECRET.fullmatch(value):
        raise ValueError(
            f"expected a Secret name (lower-case letters, digits, '-' and '.'), got {value!r}"
        )
    return value


class SecretKeyConfig(BaseModel):
    """One key of a Kubernetes Secret, read into an environment variable of the workers
    (``valueFrom.secretKeyRef``): the resource names the Secret, never holds its value."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    secret: str
    """Name of the Secret, in the DaskCluster's namespace."""
    key: str = Field(min_length=1)
    """The key of the Secret whose value the variable gets."""

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        return _secret_name(value)


class KubernetesConfig(BaseModel):
    """``cluster: kubernetes``: a ``DaskCluster`` resource for the dask-kubernetes operator.

    The operator (``helm install dask-kubernetes-operator``) must run in the cluster.
    Data reach the workers through ``volumes`` (a shared file system) or object storage
    (credentials through ``secret_env`` or ``env_from_secrets``); the scheduler gets
    neither, as it never reads pixels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    image: str
    """Image of scheduler and workers: segpipe and its dependencies
    (``deploy/docker/Dockerfile.cpu`` or ``Dockerfile.cuda``)."""
    namespace: str | None = None
    """Namespace (default: the current context's, else ``default``)."""
    name: str = "segpipe"
    """``DaskCluster`` name (scheduler service: ``<name>-scheduler``)."""
    workers: int = Field(default=2, ge=0)
    """Worker pods (``replicas``) unless ``adaptive`` is given."""
    adaptive: AdaptiveConfig | None = None
    """Scale between ``minimum`` and ``maximum`` worker pods with the load."""
    cores: int = Field(default=2, ge=1)
    """CPU per worker pod: its ``cpu`` request and limit and its Dask threads."""
    memory: str = "8Gi"
    """Memory per worker pod (Kubernetes quantity): its ``memory`` request and limit."""

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?", value.strip()):
            raise ValueError(f"expected a Kubernetes quantity such as 8Gi, got {value!r}")
        if float(re.match(r"[\d.]+", value.strip())[0]) <= 0:  # type: ignore[index]
            raise ValueError(f"expected a memory above 0, got {value!r}")
        return value.strip()

    gpus: int = Field(default=0, ge=0)
    """GPUs per worker pod: the ``nvidia.com/gpu`` limit, advertised as Dask ``GPU=n``."""
    env: dict[str, str] = {}
    """Environment of scheduler and worker containers, e.g. ``PREFECT_API_URL``."""
    requests: dict[str, str] = {}
    """Extra or overriding worker resource requests, e.g. ``{ephemeral-storage: 20Gi}``."""
    limits: dict[str, str] = {}
    """Extra or overriding worker resource limits."""
    scheduler_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Service type of the scheduler (``ClusterIP``: reachable inside the cluster only)."""
    tls_secret: str | None = None
    """A Secret with ``ca.pem``, ``tls.crt`` and ``tls.key``: the scheduler and workers
    then speak Dask TLS (``--tls-ca-file`` ...) with these, mounted at ``/etc/segpipe/tls``."""
    volumes: list[dict[str, Any]] = []
    """Volumes of the worker pods, written as in a pod spec (a ``name`` and one source),
    e.g. ``{name: data, persistentVolumeClaim: {claimName: segpipe-data}}``."""
    volume_mounts: list[dict[str, Any]] = []
    """Where the worker container mounts them, e.g. ``{name: data, mountPath: /data}``
    (also ``readOnly``, ``subPath``); each ``name`` is one of ``volumes``."""
    secret_env: dict[str, SecretKeyConfig] = {}
    """Worker environment variables read from Secret keys, e.g.
    ``{AWS_ACCESS_KEY_ID: {secret: segpipe-s3, key: AWS_ACCESS_KEY_ID}}``."""
    env_from_secrets: list[str] = []
    """Secrets whose every key becomes a worker environment variable (``envFrom``)."""

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen: set[str] = set()
        for i, volume in enumerate(value):
            name = volume.get("name")
            if not isinstance(name, str) or not _K8S_NAME.fullmatch(name):
                raise ValueError(
                    f"volumes[{i}]: expected a `name` of lower-case letters, digits and '-' "
                    f"(at most 63), got {name!r} instead"
                )
            if name in seen:
                raise ValueError(f"volumes[{i}]: expected unique names, got {name!r} twice")
            seen.add(name)
        return value

    @field_validator("volume_mounts")
    @classmethod
    def _volume_mounts(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        paths: set[str] = set()
        for i, mount in enumerate(value):
            unknown = sorted(set(mount) - set(_MOUNT_KEYS))
            if unknown:
                raise ValueError(
                    f"volume_mounts[{i}]: expected keys among {', '.join(_MOUNT_KEYS)}, "
                    f"got {', '.join(unknown)} instead"
                )
            path = mount.get("mountPath")
            if not isinstance(mount.get("name"), str) or not isinstance(path, str):
                raise ValueError(
                    f"volume_mounts[{i}]: expected a `name` and a `mountPath`, e.g. "
                    f"{{name: data, mountPath: /data}}, got {mount!r} instead"
                )
            if not path.startswith("/") or path in paths:
                raise ValueError(
                    f"volume_mounts[{i}]: expected an absolute mountPath used once, got {path!r}"
                )
            paths.add(path)
        return value

    @field_validator("secret_env")
    @classmethod
    def _secret_env(cls, value: dict[str, SecretKeyConfig]) -> dict[str, SecretKeyConfig]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"expected environment variable names, got {name!r}")
        return value

    @field_validator("env_from_secrets")
    @classmethod
    def _env_from_secrets(cls, value: list[str]) -> list[str]:
        return [_secret_name(name) for name in value]

    @model_validator(mode="after")
    def _references(self) -> KubernetesConfig:
        volumes = [v["name"] for v in self.volumes]
        for mount in self.volume_mounts:
            if mount["name"] not in volumes:
                have = ", ".join(volumes) or "none"
                raise ValueError(
                    f"volume_mounts: {mount['name']!r} is not one of kubernetes.volumes "
                    f"(those are: {have})"
                )
        if self.tls_secret and "dask-tls" in volumes:
            raise ValueError("volumes: 'dask-tls' is the volume of tls_secret; rename yours")
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"expected each variable in env or secret_env, got {both} in both")
        return self


class StorageConfig(BaseModel):
    """``storage:``: how object-storage URLs (``s3://``, ``gs://``, ``az://``) are reached.

    Credentials are never set here: each library finds them where it always does
    (environment, its config files, instance or pod roles). These settings hold no
    secret, so they may travel to workers and into provenance.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    endpoint: str | None = None
    """Endpoint URL of the service every URL of the run reaches: an S3-compatible one
    (MinIO, Ceph, a local server), e.g. ``http://127.0.0.1:9000``; a GCS emulator's;
    an Azure account's blob endpoint, e.g. Azurite's
    ``http://127.0.0.1:10000/devstoreaccount1`` (its key from ``AZURE_STORAGE_*``,
    see `segpipe.io.storage.options`); default: the provider's own (or
    ``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``)."""
    region: str | None = None
    """Region of the bucket (S3), e.g. ``eu-west-1``."""
    profile: str | None = None
    """Named profile of the provider's config files (``~/.aws/config``)."""
    anonymous: bool = False
    """Reach public buckets without credentials."""
    attempts: int = Field(default=10, ge=1)
    """Tries of one S3 request that is throttled (``SlowDown``, 503) or fails on the
    way (5xx, a dropped connection), with exponential backoff and jitter between
    them (botocore's ``standard`` mode); then the run stops, naming the object."""


CLUSTER_KINDS = ("local", "local-cuda", "slurm", "kubernetes")
CLUSTER_CHOICES = (
    "'local', 'local-cuda', 'slurm', 'kubernetes', 'tcp://host:port' or 'tls://host:port'"
)


AUTO_TILE = {2: 2048, 3: 256}
"""``tile: auto`` per number of axes. Planes: 2048², measured fastest for ``otsu`` on
an 8192² image on 2 workers (3.9 s against 5.0 s at 1024² and 11.5 s at 512²: each
block task carries a few ms of fixed cost). Volumes: `AUTO_VOXELS` per block, 256³
where the depth allows, see `block_tile`."""
AUTO_VOXELS = 2**24
"""Voxels per block of ``tile: auto`` for volumes: ``otsu`` on a 64 × 2048² volume on 2
workers took 12.2-13.0 s with 64 × 512² blocks (2^24), 14.4-14.6 s with 64 × 256² and
16.6-19.9 s with 64 × 1024² (a 1024³ block would hold 4 GiB of float32 alone)."""


def block_tile(
    tile: str | int | Sequence[int], ndim: int, shape: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The block shape for an image of ``ndim`` spatial axes from ``RunConfig.tile``.

    ``auto`` is `AUTO_TILE` for planes. For a volume of ``shape`` it is 256³ where the
    volume is at least 256 deep; a thinner one is taken whole in Z, with the largest
    power-of-two Y/X edge (up to the planes' 2048) that keeps a block within
    `AUTO_VOXELS`. Without ``shape``, volumes get 256³.

    Examples
    --------
    >>> block_tile("auto", 2), block_tile(512, 3), block_tile([64, 256, 256], 3)
    ((2048, 2048), (512, 512, 512), (64, 256, 256))
    >>> block_tile("auto", 3, (1000, 900, 800)), block_tile("auto", 3, (64, 4096, 4096))
    ((256, 256, 256), (64, 512, 512))
    >>> block_tile("auto", 3, (24, 512, 512)), block_tile("auto", 3, (2, 9000, 9000))
    ((24, 512, 512), (2, 2048, 2048))
    """
    if tile == "auto":
        if ndim != 3:
            return (AUTO_TILE.get(ndim, AUTO_TILE[2]),) * ndim
        edge = AUTO_TILE[3]
        if shape is None or shape[0] >= edge:
            return (edge,) * 3
        depth = max(int(shape[0]), 1)
        yx = edge
        while 2 * yx <= AUTO_TILE[2] and depth * (2 * yx) ** 2 <= AUTO_VOXELS:
            yx *= 2
        return (depth, yx, yx)
    if isinstance(tile, int):
        return (tile,) * ndim
    if isinstance(tile, str) or len(tile) != ndim:
        raise ConfigError(f"tile {tile!r}: expected 'auto', an int or {ndim} ints")
    return tuple(int(t) for t in tile)


VIEWER_CHUNK = 0
"""``viewer_chunk`` by default: unsharded outputs. Sharded ones (``viewer_chunk: 256``)
let a viewer read a 256² region by decoding one inner chunk instead of a whole 2048²
block, but measured slower end to end (``python -m bench.sharding``; figures in the
README's output layout): each inner chunk is copied out of the block and coded alone."""


def viewer_inner(value: int | Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    """The inner chunk shape of sharded outputs from ``RunConfig.viewer_chunk``; None
    for unsharded outputs (``0`` or null).

    One int is the Y and X edge, and a volume's inner chunks are one plane deep (what
    a viewer draws of a volume); a list gives every axis.

    Examples
    --------
    >>> viewer_inner(256, 2), viewer_inner(256, 3), viewer_inner([16, 64, 64], 3)
    ((256, 256), (1, 256, 256), (16, 64, 64))
    >>> viewer_inner(0, 2) is None, viewer_inner(None, 3) is None
    (True, True)
    """
    if not value:
        return None
    if isinstance(value, int):
        return (1,) * (ndim - 2) + (value,) * min(ndim, 2)
    if len(value) != ndim:
        raise ConfigError(f"viewer_chunk {list(value)!r}: expected one int or {ndim} ints")
    return tuple(int(v) for v in value)


class RunConfig(BaseModel):
    """What one ``segpipe run`` does. Field names are the keys of ``run.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    input: str
    """A file, a directory, a glob, or a manifest (.txt/.csv, one path per line)."""
    output: str
    """The output store, e.g. ``out.zarr``; results land in ``out.zarr/<image name>/``."""
    tile: Literal["auto"] | int | list[int] = "auto"
    """Block edge in pixels: one int, or one per axis; ``auto``: `block_tile`."""
    viewer_chunk: int | list[int] | None = VIEWER_CHUNK
    """Inner chunk of the output arrays, which are then sharded (Zarr v3 sharding),
    e.g. 256: each block a task writes is one file (a shard) of inner chunks of this
    edge, which viewers read one by one. One int: the Y and X edge (volumes: one plane
    deep); or one per axis. ``0`` or null (the default): unsharded, one chunk a block.
    Scratch is never sharded. A store keeps the layout it was made with: resuming
    with another is refused."""
    halo: Literal["auto"] | int | list[int] = "auto"
    """Context per side in pixels; ``auto`` is what the segmenter declares."""
    cluster: str = "local"
    """``local`` (a LocalCluster on this machine), ``local-cuda`` (one worker per GPU, needs
    dask-cuda), ``slurm`` (SLURM jobs, see ``slurm``), ``kubernetes`` (a DaskCluster, see
    ``kubernetes``), or ``tcp://host:port`` / ``tls://host:port`` of a running scheduler."""
    workers: int | None = Field(None, ge=1)
    """LocalCluster worker processes (default: 1)."""
    threads: int | None = Field(None, ge=1)
    """Threads per LocalCluster worker (default: the machine's cores)."""
    worker_wait: float = Field(600.0, gt=0)
    """Seconds a run waits while its cluster has no Dask worker (none started yet, SLURM
    jobs queued, every worker lost); then it stops, its finished work kept."""
    channel: int | Literal["mean", "max", "sum"] | None = None
    """Channel to segment in multichannel images, or how to reduce them."""
    axes: str | None = None
    """Axes of plain Zarr inputs, e.g. ``ZYX`` or ``CYX``."""
    level: int = Field(0, ge=0)
    """Resolution level of OME-Zarr inputs (their multiscales datasets) and pyramidal
    TIFFs, 0 the finest; the output's scales are that level's."""
    pixel_size: float | list[float] | None = None
    """Physical pixel size, one for every axis or one per spatial axis ((Z,) Y, X), in
    ``pixel_unit``; overrides what the input states (OME-XML, ImageJ or TIFF resolution
    tags, NGFF scales). Without either, outputs are in pixels."""
    pixel_unit: str = "micrometer"
    """Unit of ``pixel_size``: micrometer (µm, um), nanometer, millimeter..."""
    series: int | None = Field(None, ge=0)
    """Image series to read from TIFFs that hold several (required there: such a file is
    refused without it, its series listed); other inputs hold one, series 0."""
    overwrite: bool = False
    """Start over in an output that holds another run (or an earlier one of this)."""
    resume: bool = False
    """Continue an earlier run of these settings: finished images and blocks are kept."""
    full: bool = False
    """Recompute every image, even those complete from unchanged inputs (which an
    incremental run, ``resume``, skips)."""
    prune: bool = False
    """Remove the images of the store whose input is no longer among this run's inputs
    (deleted or renamed); without it they are kept and reported as orphaned."""
    thread_memory: float = Field(0.3, gt=0)
    """GiB one worker thread may hold for one block: ``tile: auto`` halves a block's
    longest edge until the segmenter's working set for it (its declared bytes a voxel of
    block + halo, `segpipe.plan.thread_peaks`) fits. A worker needs its threads times
    this, plus ~0.3 GiB of its own; the default keeps the whole process tree of the
    default LocalCluster on 2 cores under 1.5 GiB for every segmenter."""
    space_check: bool = True
    """Refuse to start, before compute, when the output's file system has less free space
    than the run's planned peak on disk (`segpipe plan` prints it); false: start anyway."""
    retries: int = Field(0, ge=0)
    """Prefect retries of the whole flow run; a retry resumes from the blocks written."""
    retry_delay: float = Field(10.0, ge=0)
    """Seconds before a flow retry."""
    on_error: Literal["fail", "skip"] = "fail"
    """Bad input: ``fail`` stops before any compute (after checking every input);
    ``skip`` segments the good images, reports the bad ones and exits non-zero."""
    classes: list[dict[str, Any]] | None = None
    """Class catalogue ``[{id, name, thing}]``; default: the segmenter's classes, background
    as stuff and the others as things."""
    security: TLSConfig | None = None
    """TLS files for a ``tls://`` scheduler."""
    prefect: PrefectConfig | None = None
    """Prefect API to report to (default: the embedded one, or ``PREFECT_API_URL``)."""
    segmenter: SegmenterConfig = SegmenterConfig()
    slurm: SlurmConfig | None = None
    """SLURM jobs for ``cluster: slurm`` (default: one 8-core, 32 GB job)."""
    kubernetes: KubernetesConfig | None = None
    """The DaskCluster for ``cluster: kubernetes`` (required there: at least ``image``)."""
    storage: StorageConfig = StorageConfig()
    """How ``s3://``, ``gs://`` and ``az://`` inputs and outputs are reached."""

    @field_validator("tile")
    @classmethod
    def _tile_positive(cls, v: str | int | list[int]) -> str | int | list[int]:
        if isinstance(v, str):
            return v  # the Literal allows only "auto"
        values = [v] if isinstance(v, int) else v
        if not values or any(t < 1 for t in values):
            raise ValueError(f"expected a positive tile size, got {v!r} instead")
        return v

    @field_validator("viewer_chunk")
    @classmethod
    def _viewer_chunk(cls, v: int | list[int] | None) -> int | list[int] | None:
        values = [] if v is None else [v] if isinstance(v, int) else v
        if isinstance(v, list) and (not v or any(c < 1 for c in values)):
            raise ValueError(f"expected positive inner chunk edges, got {v!r} instead")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"expected 0 (unsharded) or an edge above 0, got {v!r} instead")
        return v

    @field_validator("halo")
    @classmethod
    def _halo_not_negative(cls, v: str | int | list[int]) -> str | int | list[int]:
        if isinstance(v, str):
            return v  # the Literal allows only "auto"
        values = [v] if isinstance(v, int) else v
        if not values or any(h < 0 for h in values):
            raise ValueError(f"expected 'auto' or pixels >= 0, got {v!r} instead")
        return v

    @field_validator("cluster")
    @classmethod
    def _cluster_known(cls, v: str) -> str:
        if v not in CLUSTER_KINDS and not v.startswith(("tcp://", "tls://")):
            raise ValueError(f"expected {CLUSTER_CHOICES}, got {v!r} instead")
        return v

    @model_validator(mode="after")
    def _cluster_section(self) -> RunConfig:
        if self.cluster == "kubernetes" and self.kubernetes is None:
            raise ValueError(
                "cluster 'kubernetes' needs a `kubernetes:` section (at least `image`)"
            )
        return self

    def resolved(self) -> RunConfig:
        """The same config with input and output made absolute (workers have another cwd)."""
        return self.model_copy(
            update={"input": _absolute(self.input), "output": _absolute(self.output, real=True)}
        )

    def run_settings(self) -> dict[str, Any]:
        """Settings that decide the output (its pixels, blocks and array layout): a changed
        one makes it a different run."""
        settings = {
            "segmenter": self.segmenter.name,
            "options": self.segmenter.options(),
            "tile": self.tile,
            "halo": self.halo,
            "channel": self.channel,
            "axes": self.axes,
            "classes": self.classes,  # the catalogue decides panoptic pixels
        }
        if self.series is not None:  # absent when unset: earlier stores keep their fingerprint
            settings["series"] = self.series
        if self.level:  # likewise
            settings["level"] = self.level
        if self.viewer_chunk:  # the arrays' layout: a resume must not mix two
            settings["viewer_chunk"] = self.viewer_chunk
        return settings


def _absolute(location: str, *, real: bool = False) -> str:
    """``location`` made absolute: a URL as given (``file://`` as its path), a path from
    the current folder (``real``: links resolved too)."""
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    elif "://" in location:
        return location
    location = os.path.expanduser(location)
    if real:
        return str(Path(location).resolve())
    return location if os.path.isabs(location) else os.path.join(os.getcwd(), location)


def check_image_options(config: RunConfig, segmenter: Segmenter, spec: SourceSpec) -> None:
    """Refuse options that do not fit one image, before any compute.

    Checks what `RunConfig` alone cannot: a per-axis ``tile``, ``halo`` or
    ``viewer_chunk`` has one value per axis of the image, and the segmenter's filters
    fit it (`Segmenter.check_image`: ``sigma`` per axis and a Gaussian no wider than
    the image).

    Raises
    ------
    ConfigError
        Naming the image file, the option, and what it should be.
    """
    ndim = len(spec.shape)
    # `block_tile` takes a tile list of ndim values; `parse_per_axis` a halo of 1 or ndim
    for option, value, fits in (
        ("tile", config.tile, {ndim}),
        ("halo", config.halo, {1, ndim}),
        ("viewer_chunk", config.viewer_chunk, {ndim}),
    ):
        if isinstance(value, list) and len(value) not in fits:
            raise ConfigError(
                f"{spec.path}: {option} {value!r} has {len(value)} values for a {ndim}D image "
                f"({'×'.join(map(str, spec.shape))}); give one value or {ndim}."
            )
    try:
        segmenter.check_image(spec.shape)
    except SegpipeError as err:
        raise ConfigError(
            f"{spec.path} ({'×'.join(map(str, spec.shape))}): segmenter {segmenter.name!r}: {err}."
        ) from err


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML would read it (``2`` → int, ``[1, 2]`` → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["sigma=2.0", "markers=h-maxima"]`` → ``{"sigma": 2.0, "markers": "h-maxima"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value.")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Read ``run.yaml`` (if given) and apply ``overrides`` (flags win over the file).

    ``overrides`` may hold ``segmenter`` (a name) and ``set`` (segmenter options).

    Raises
    ------
    ConfigError
        Naming the file and every invalid key.
    """
    data: dict[str, Any] = {}
    source = str(path) if path else "command line"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found.")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            where = " ".join(str(err).split())  # PyYAML's message spans lines
            raise ConfigError(f"{p}: not valid YAML ({where}).") from err
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{p}: not a text file (byte {err.start} is not UTF-8); give a run.yaml."
            ) from err
        except OSError as err:
            raise ConfigError(f"{p}: cannot read the config file ({err.strerror}).") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of settings, got {type(loaded).__name__}.")
        data = loaded
        # Relative paths in a config file are relative to the file.
        for key in ("input", "output"):
            value = data.get(key)
            relative = isinstance(value, str) and not os.path.isabs(os.path.expanduser(value))
            if relative and "://" not in str(value):  # a URL is absolute
                data[key] = str(p.resolve().parent / str(value))
    overrides = dict(overrides or {})
    seg = data.get("segmenter") or {}
    if isinstance(seg, str):
        seg = {"name": seg}
    if not isinstance(seg, dict):
        raise ConfigError(
            f"{source}: segmenter: expected a name (segmenter: otsu) or a mapping "
            f"(segmenter: {{name: otsu, sigma: 2}}), got {seg!r} instead."
        )
    seg = dict(seg)
    if overrides.get("segmenter") and overrides["segmenter"] != seg.get("name"):
        # Another segmenter: the file's options were for the old one.
        seg = {"name": overrides["segmenter"]}
    seg.update(overrides.pop("set", None) or {})
    overrides.pop("segmenter", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["segmenter"] = seg
    try:
        return RunConfig(**data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{source}: {problems}") from err

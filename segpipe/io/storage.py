"""Where segpipe reads and writes: a local path, or an object-storage URL through fsspec.

A location is a `pathlib.Path` for a local (or mounted) path, so that every local
safety check (links, real paths, free space) stays as it is, and a
``upath.UPath`` for an ``s3://``, ``gs://`` or ``az://`` URL, which walks like a path
and reaches the bucket through fsspec (s3fs, gcsfs, adlfs). zarr opens the same URLs
through its ``FsspecStore``.

Writes are whole objects: a local file is written beside its name and renamed over
it (so a reader never sees half a file), an object is one ``PUT`` (which S3, GCS and
Azure make visible whole or not at all). `create` is the one conditional write: a
local ``O_EXCL`` open, or an upload the store refuses when the key exists (S3's and
Azure's ``If-None-Match: *``, GCS's ``ifGenerationMatch=0``). That is what a lock
needs on a store without rename.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import importlib.util
import os
import shutil
import sys
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

import fsspec
from upath import UPath

from segpipe.errors import ConfigError, OutputWriteError, StorageAccessError

if TYPE_CHECKING:
    from segpipe.config import StorageConfig

__all__ = [
    "CONNECTIONS",
    "SCHEMES",
    "Location",
    "Where",
    "check_bucket",
    "configure",
    "create",
    "identity",
    "is_remote",
    "is_url",
    "join",
    "local_text",
    "location",
    "open_new",
    "options",
    "put",
    "read_bytes",
    "read_ranges",
    "remove_tree",
    "stamp",
    "stamps",
]

Location: TypeAlias = Path | UPath
T = TypeVar("T")
Where: TypeAlias = "str | os.PathLike[str] | UPath"
"""Anything that names a location: a path, a URL, a `Location`."""
SCHEMES = {
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
"""Object-storage URL schemes segpipe reads and writes, with the package each needs."""


CONNECTIONS = 16
"""Connections one S3 client (a process's, shared by its threads) keeps open at once:
a block's tile reads go out together, up to this many."""


def is_url(text: Where) -> bool:
    """Whether ``text`` is an object-storage URL (``file://`` is a local path)."""
    text = str(text) if isinstance(text, UPath) else os.fspath(text)
    return "://" in text and not text.startswith("file://")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def location(text: Where) -> Location:
    """The location ``text`` names: a `Path`, or a ``UPath`` for an object-storage URL.

    Raises
    ------
    ConfigError
        For a URL of a scheme segpipe does not read or write, or whose filesystem
        package is not installed, naming the URL.
    """
    if isinstance(text, UPath) and not isinstance(text, Path):
        return text
    raw = str(text) if isinstance(text, UPath) else os.fspath(text)
    if raw.startswith("file://"):
        return Path(raw.removeprefix("file://"))
    if not is_url(raw):
        return Path(raw)
    scheme = _scheme(raw)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{raw}: {scheme}:// URLs are not supported; segpipe reads and writes local paths "
            f"and {', '.join(f'{s}://' for s in sorted(SCHEMES))} URLs."
        )
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as err:
        raise ConfigError(
            f"{raw}: {scheme}:// needs the {SCHEMES[scheme]} package: pip install {SCHEMES[scheme]}"
        ) from err
    if SCHEMES[scheme] == "adlfs":
        _close_azure_at_exit()
    return UPath(raw.rstrip("/"))


_AZURE_HOOK: list[bool] = []


def _close_azure_at_exit() -> None:
    """Close adlfs's clients at exit before zarr closes the event loop they run on.

    adlfs closes each client in a ``weakref.finalize`` run at exit, on the loop the
    filesystem was made on; for zarr's stores that is zarr's loop, which zarr's own exit
    hook has closed by then: two tracebacks ("Loop is not running") after every run.
    A hook registered after zarr's runs before it (exit hooks run last first).
    """
    if _AZURE_HOOK:
        return
    _AZURE_HOOK.append(True)

    def close() -> None:
        adlfs = sys.modules.get("adlfs")
        if adlfs is None:
            return
        for obj in gc.get_objects():
            if type(obj) is weakref.finalize and obj.alive:  # type(): no attribute lookups
                held = obj.peek()
                if held is not None and isinstance(held[0], adlfs.AzureBlobFileSystem):
                    with contextlib.suppress(Exception):
                        obj()

    atexit.register(close)


def local_text(text: str) -> str:
    """``text`` without ``file://``, ``~`` expanded and made absolute; a URL as it is."""
    if is_url(text):
        return text
    return os.path.abspath(os.path.expanduser(text.removeprefix("file://")))


def is_remote(where: Where) -> bool:
    """Whether ``where`` is in object storage (not a local or mounted path)."""
    if isinstance(where, Path):
        return False
    return isinstance(where, UPath) or is_url(where)


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a path or a URL (``/``-separated, never a ``Path`` of a URL,
    which would fold ``s3://`` into ``s3:/``)."""
    if is_url(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root).joinpath(*parts))


def options(config: StorageConfig) -> dict[str, dict[str, Any]]:
    """fsspec's settings per scheme for run.yaml's ``storage:`` section.

    ``endpoint`` is the service every URL of the run reaches: S3's ``endpoint_url``;
    gcsfs's ``endpoint_url``; for Azure (adlfs), the ``account_host`` of an ``https://``
    endpoint, or a connection string naming it as ``BlobEndpoint`` for an ``http://``
    one (an emulator such as Azurite: adlfs makes an ``https://`` URL of any host) or
    where ``AZURE_STORAGE_CONNECTION_STRING`` is set. That connection string's
    credentials come from the environment variables adlfs reads
    (``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME`` with
    ``AZURE_STORAGE_ACCOUNT_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``), never from run.yaml.
    """
    # botocore's standard retries: exponential backoff with jitter, on throttling
    # (SlowDown, 503), 5xx answers and dropped connections
    retries = {"max_attempts": config.attempts, "mode": "standard"}
    kwargs = {"retries": retries, "max_pool_connections": CONNECTIONS}
    s3: dict[str, Any] = {"config_kwargs": kwargs}
    client: dict[str, Any] = {}
    if config.endpoint:
        client["endpoint_url"] = config.endpoint
    if config.region:
        client["region_name"] = config.region
    if client:
        s3["client_kwargs"] = client
    if config.profile:
        s3["profile"] = config.profile
    if config.anonymous:
        s3["anon"] = True
    out: dict[str, dict[str, Any]] = {"s3": s3}
    gcs: dict[str, Any] = {}
    if config.endpoint:
        gcs["endpoint_url"] = config.endpoint.rstrip("/")
    if config.anonymous:
        gcs["token"] = "anon"
    if gcs:
        out["gs"] = out["gcs"] = gcs
    azure = _azure(config)
    if azure:
        out["az"] = out["abfs"] = out["abfss"] = azure
    return out


def _azure(config: StorageConfig) -> dict[str, Any]:
    """adlfs's settings for ``storage:`` (see `options`)."""
    out: dict[str, Any] = {"anon": True} if config.anonymous else {}
    if not config.endpoint:
        return out
    endpoint = config.endpoint.rstrip("/")
    given = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if endpoint.startswith("https://") and not given:
        # adlfs's own way, which keeps every credential it finds (key, SAS, Entra ID)
        out["account_host"] = endpoint.removeprefix("https://")
        return out
    parts: dict[str, str] = {}
    if given:
        parts = dict(p.split("=", 1) for p in given.split(";") if "=" in p)
    else:
        for key, name in [
            ("AccountName", "AZURE_STORAGE_ACCOUNT_NAME"),
            ("AccountKey", "AZURE_STORAGE_ACCOUNT_KEY"),
            ("SharedAccessSignature", "AZURE_STORAGE_SAS_TOKEN"),
        ]:
            parts[key] = os.environ.get(name, "")
    kept = {
        k: v
        for k, v in parts.items()
        if v and k.lower() in ("accountname", "accountkey", "sharedaccesssignature")
    }
    if config.anonymous:
        kept = {k: v for k, v in kept.items() if k.lower() == "accountname"}
    out["connection_string"] = ";".join(
        [f"BlobEndpoint={endpoint}", *(f"{k}={v.lstrip('?')}" for k, v in kept.items())]
    )
    return out


def configure(config: StorageConfig) -> None:
    """Make ``config`` fsspec's default for new filesystems of this process.

    zarr, tifffile's file handles and ``UPath`` all make their filesystems through
    fsspec, so one setting reaches them all. Filesystems fsspec has cached with other
    settings are dropped.
    """
    _gcs_class(config.endpoint)
    wanted = options(config)
    if all(fsspec.config.conf.get(k) == v for k, v in wanted.items()):
        return
    fsspec.config.conf.update(wanted)
    for scheme in SCHEMES:
        # only the classes fsspec has loaded: one never loaded has no cached filesystem,
        # and importing gcsfs and adlfs to ask would add seconds to every run
        if (loaded := fsspec.registry.get(scheme)) is not None:
            loaded.clear_instance_cache()


def _gcs_class(endpoint: str | None) -> None:
    """gs:// through gcsfs's JSON-API filesystem where an endpoint is set, else its
    default class.

    gcsfs's default class asks Google's gRPC storage-control API what layout each bucket
    has, before its first request to it and again after each failed answer; a server
    other than Google's (an emulator) has no such API, so every such request would wait
    for that call to time out.
    """
    if importlib.util.find_spec("gcsfs") is None:
        return
    if not endpoint and "gcsfs" not in sys.modules:
        return  # nothing registered yet: fsspec will load the default
    target = "gcsfs.core.GCSFileSystem" if endpoint else "gcsfs.GCSFileSystem"
    chosen: str | type = target  # by name: imported on first use, not at every start
    if "gcsfs" in sys.modules:  # already loaded: the class replaces the loaded one
        module, name = target.rsplit(".", 1)
        chosen = getattr(importlib.import_module(module), name)
    for scheme in ("gs", "gcs"):
        fsspec.register_implementation(scheme, chosen, clobber=True)


def check_bucket(where: Location) -> None:
    """Refuse, in one line naming the URL, a bucket (container) that does not exist or
    that these credentials may not reach; a local path passes.

    Raises
    ------
    ConfigError
        If the bucket is missing.
    PermissionError
        If the credentials are refused (a missing or wrong key, no right to the bucket).
    """
    if isinstance(where, Path):
        return
    bucket = where.path.split("/", 1)[0]
    kind = "container" if where.protocol in ("az", "abfs", "abfss") else "bucket"
    try:
        where.fs.ls(bucket, detail=False)
    except FileNotFoundError as err:
        raise ConfigError(
            f"{where}: the {kind} {bucket!r} does not exist at "
            f"{_endpoint(where)}; create it or correct the URL."
        ) from err
    except OSError as err:
        if not isinstance(err, PermissionError):
            raise StorageAccessError(f"{where}: cannot be reached ({_reason(err)}).") from err
        raise _refused(where, kind, err) from err
    except Exception as err:
        # azure-storage-blob's errors are no OSErrors: a refused key is a 403 HttpResponseError
        if getattr(err, "status_code", None) not in (401, 403):
            raise
        raise _refused(where, kind, err) from err


def _refused(where: UPath, kind: str, err: BaseException) -> StorageAccessError:
    return StorageAccessError(
        f"{where}: access refused by {_endpoint(where)} ({_reason(err)}); check the "
        f"credentials (environment, config files, role) and the {kind}'s policy."
    )


def _endpoint(where: UPath) -> str:
    """The service ``where`` is reached at, for messages: its URL without a query, which
    could hold a SAS token."""
    fs = where.fs
    if where.protocol in ("s3", "s3a"):
        client = getattr(fs, "client_kwargs", None) or {}
        endpoint = client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    elif where.protocol in ("gs", "gcs"):
        endpoint = getattr(fs, "_endpoint", None) or os.environ.get("STORAGE_EMULATOR_HOST")
    else:
        endpoint = getattr(getattr(fs, "service_client", None), "url", None)
    if not endpoint:
        return where.protocol
    url = urlsplit(str(endpoint))
    return f"{url.scheme}://{url.netloc}{url.path}".rstrip("/") if url.netloc else where.protocol


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())[:200]


def _failed(where: Location, err: Exception, doing: str) -> OutputWriteError:
    return OutputWriteError(f"{where}: could not {doing} ({_reason(err)}).")


def _in_folder(path: Path, make: Callable[[], T]) -> T:
    """``make()``, which creates ``path``; its folders are created first if they are
    missing (the open is tried first: most writes go to a folder that exists, and a
    ``mkdir`` per file is a system call and an exception each)."""
    try:
        return make()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return make()


def open_new(path: Path, permissions: int = 0o666) -> IO[bytes]:
    """A new file at ``path`` (none must be there), open for writing bytes, created with
    ``permissions`` (less the umask), and its folders if they are missing."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    return os.fdopen(_in_folder(path, lambda: os.open(path, flags, permissions)), "wb")


def put(where: Location, data: bytes | memoryview) -> tuple[int, int] | None:
    """Write ``data`` as the whole of ``where``: readers see the old bytes or the new.
    Returns its `stamp` where the store said it in answer (S3's and Azure's ETag, GCS's
    generation), so that no ``HEAD`` follows; else None.

    Not synced to disk: what segpipe writes this way is vouched for by a marker or a
    manifest that checks it (`segpipe.io.written`), and is written again if damaged.

    Raises
    ------
    OutputWriteError
        If an object cannot be written (after the client's retries), naming it.
    """
    if isinstance(where, Path):
        tmp = where.with_name(f".{where.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open_new(tmp) as fh:
                fh.write(data)
            os.replace(tmp, where)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.filename is None:
                err.filename = str(where)  # a failed write names no file: say which
            raise
        return None
    payload = bytes(data)
    try:
        answer = where.fs.pipe_file(where.path, payload)
    except Exception as err:
        raise _failed(where, err, "write it") from err
    tag = _tag(answer) if isinstance(answer, dict) else ""
    return (len(payload), version(tag)) if tag else None


def create(where: Location, data: bytes) -> bool:
    """Write ``data`` to ``where`` only if nothing is there; whether it was written.

    Locally an ``O_EXCL`` open; in object storage a conditional upload, which the
    store refuses with 412 (409 on Azure) when the key exists: of two runs creating
    one key at once, exactly one succeeds. s3fs and adlfs send ``If-None-Match: *``
    (adlfs through azure-storage-blob's ``overwrite=False``), gcsfs
    ``ifGenerationMatch=0``; each raises ``FileExistsError`` on refusal.
    """
    if isinstance(where, Path):
        try:
            fh = open_new(where, 0o600)
        except FileExistsError:
            return False
        with fh:
            fh.write(data)
        return True
    try:
        where.fs.pipe_file(where.path, data, mode="create")
    except FileExistsError:
        return False
    except Exception as err:
        raise _failed(where, err, "create it") from err
    return True


def read_bytes(where: Location) -> bytes:
    """The whole of ``where`` (``FileNotFoundError`` if absent): one ``GET`` for an
    object (``UPath.read_bytes`` asks for its size first)."""
    if isinstance(where, Path):
        return where.read_bytes()
    if where.protocol in ("s3", "s3a"):  # one request: no HEAD for a concurrent download
        return bytes(where.fs.cat_file(where.path, max_concurrency=1))
    return bytes(where.fs.cat_file(where.path))


def remove_tree(where: Location) -> None:
    """Delete ``where``, a file or everything under a folder or prefix; absent is fine.

    Callers check that segpipe wrote it (`segpipe.io.store.remove`).
    """
    if isinstance(where, Path):
        if where.is_dir() and not where.is_symlink():
            shutil.rmtree(where)
        else:
            where.unlink(missing_ok=True)
        return
    try:
        where.fs.rm(where.path, recursive=True)
    except FileNotFoundError:
        return
    except Exception as err:
        raise _failed(where, err, "delete it") from err


def stamp(where: Location) -> tuple[int, int]:
    """``(size, version)`` of a file or object: the version changes when it is rewritten
    (a local file's mtime in ns; an object's ETag, as a number)."""
    if isinstance(where, Path):
        st = where.stat()
        return st.st_size, st.st_mtime_ns
    info = where.fs.info(where.path)
    return int(info["size"]), version(_tag(info) or str(info.get("LastModified") or ""))


def identity(where: Location) -> tuple[int, int, int]:
    """What changes when the file at ``where`` is replaced or rewritten, for caches of
    what was read from it: a local file's mtime, size and inode; an object's size and
    ETag."""
    if isinstance(where, Path):
        st = where.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    return (*stamp(where), 0)


def _tag(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten, from a listing, a ``HEAD`` or an
    upload's answer: GCS's generation (its own version number; its ETag also changes
    with metadata), else the ETag (S3's, Azure's)."""
    return str(info.get("generation") or info.get("ETag") or info.get("etag") or "")


def version(etag: str) -> int:
    """An object's ETag as a 63-bit number (what a marker's version field holds)."""
    return int.from_bytes(hashlib.blake2b(etag.encode(), digest_size=8).digest()) >> 1


def read_ranges(where: Location, ranges: list[tuple[int, int]], size: int) -> list[bytes]:
    """The bytes of ``where`` in each ``(start, stop)`` range (cut at ``size``): one open
    and seeks locally, concurrent range requests in object storage."""
    ranges = [(a, min(b, size)) for a, b in ranges if a < size] or [(0, 0)]
    if isinstance(where, Path):
        out = []
        with open(where, "rb") as fh:
            for a, b in ranges:
                fh.seek(a)
                out.append(fh.read(b - a))
        return out
    got = where.fs.cat_ranges([where.path] * len(ranges), *map(list, zip(*ranges, strict=True)))
    return [bytes(g) for g in got]


def stamps(where: Location) -> Iterator[tuple[Location, tuple[int, int]]]:
    """Every file under the folder (prefix) ``where`` with its `stamp`, in name order:
    one listing in object storage, not a request per object."""
    if isinstance(where, Path):
        for folder, dirs, names in os.walk(where):
            dirs.sort()
            for name in sorted(names):
                path = Path(folder) / name
                yield path, stamp(path)
        return
    try:
        found = where.fs.find(where.path, detail=True)
    except FileNotFoundError:
        return
    for key in sorted(found):
        info = found[key]
        tag = _tag(info) or str(info.get("LastModified") or "")
        yield UPath(f"{where.protocol}://{key}"), (int(info["size"]), version(tag))

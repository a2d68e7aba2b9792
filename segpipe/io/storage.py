"""Where segpipe reads and writes: a local path, or an object-storage URL through fsspec.

A location is a `pathlib.Path` for a local (or mounted) path, so that every local
safety check (links, real paths, free space) stays as it is, and a
``upath.UPath`` for an ``s3://``, ``gs://`` or ``az://`` URL, which walks like a path
and reaches the bucket through fsspec (s3fs, gcsfs, adlfs). zarr opens the same URLs
through its ``FsspecStore``.

Writes are whole objects: a local file is written beside its name and renamed over
it (so a reader never sees half a file), an object is one ``PUT`` (which S3, GCS and
Azure make visible whole or not at all). `create` is the one conditional write: a
local ``O_EXCL`` open, or a ``PUT`` with ``If-None-Match: *`` that the store refuses
when the key exists. That is what a lock needs on a store without rename.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

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
    "location",
    "options",
    "put",
    "read_bytes",
    "read_ranges",
    "remove_tree",
    "stamp",
    "stamps",
]

Location: TypeAlias = Path | UPath
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
    return UPath(raw.rstrip("/"))


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
    """fsspec's settings per scheme for run.yaml's ``storage:`` section."""
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
    if config.anonymous:
        out["gcs"] = {"token": "anon"}
        out["gs"] = {"token": "anon"}
        out["az"] = out["abfs"] = {"anon": True}
    return out


def configure(config: StorageConfig) -> None:
    """Make ``config`` fsspec's default for new filesystems of this process.

    zarr, tifffile's file handles and ``UPath`` all make their filesystems through
    fsspec, so one setting reaches them all. Filesystems fsspec has cached with other
    settings are dropped.
    """
    wanted = options(config)
    if all(fsspec.config.conf.get(k) == v for k, v in wanted.items()):
        return
    fsspec.config.conf.update(wanted)
    for scheme in SCHEMES:
        try:
            fsspec.get_filesystem_class(scheme).clear_instance_cache()
        except (ImportError, ValueError):
            continue


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
    try:
        where.fs.ls(bucket, detail=False)
    except FileNotFoundError as err:
        raise ConfigError(
            f"{where}: the bucket {bucket!r} does not exist at "
            f"{_endpoint(where)}; create it or correct the URL."
        ) from err
    except PermissionError as err:
        raise StorageAccessError(
            f"{where}: access refused by {_endpoint(where)} ({_reason(err)}); check the "
            "credentials (environment, config files, role) and the bucket's policy."
        ) from err
    except OSError as err:
        raise StorageAccessError(f"{where}: cannot be reached ({_reason(err)}).") from err


def _endpoint(where: UPath) -> str:
    client = getattr(where.fs, "client_kwargs", None) or {}
    endpoint = client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    return str(endpoint) if endpoint and where.protocol in ("s3", "s3a") else where.protocol


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())[:200]


def _failed(where: Location, err: Exception, doing: str) -> OutputWriteError:
    return OutputWriteError(f"{where}: could not {doing} ({_reason(err)}).")


def put(where: Location, data: bytes | memoryview) -> tuple[int, int] | None:
    """Write ``data`` as the whole of ``where``: readers see the old bytes or the new.
    Returns its `stamp` where the store said it in answer (S3's ETag), else None.

    Not synced to disk: what segpipe writes this way is vouched for by a marker or a
    manifest that checks it (`segpipe.io.written`), and is written again if damaged.

    Raises
    ------
    OutputWriteError
        If an object cannot be written (after the client's retries), naming it.
    """
    if isinstance(where, Path):
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_name(f".{where.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, where)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return None
    payload = bytes(data)
    try:
        answer = where.fs.pipe_file(where.path, payload)
    except Exception as err:
        raise _failed(where, err, "write it") from err
    etag = answer.get("ETag") if isinstance(answer, dict) else None
    return None if etag is None else (len(payload), version(str(etag)))


def create(where: Location, data: bytes) -> bool:
    """Write ``data`` to ``where`` only if nothing is there; whether it was written.

    Locally an ``O_EXCL`` open; in object storage a conditional ``PUT``
    (``If-None-Match: *``), which S3 and its compatible servers refuse with 412 when
    the key exists: of two runs creating one key at once, exactly one succeeds.
    """
    if isinstance(where, Path):
        where.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(where, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
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
    etag = str(info.get("ETag") or info.get("etag") or info.get("LastModified") or "")
    return int(info["size"]), version(etag)


def identity(where: Location) -> tuple[int, int, int]:
    """What changes when the file at ``where`` is replaced or rewritten, for caches of
    what was read from it: a local file's mtime, size and inode; an object's size and
    ETag."""
    if isinstance(where, Path):
        st = where.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    return (*stamp(where), 0)


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
        tag = str(info.get("ETag") or info.get("etag") or info.get("LastModified") or "")
        yield UPath(f"{where.protocol}://{key}"), (int(info["size"]), version(tag))

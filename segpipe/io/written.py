"""What a block task wrote, so that its completion marker can vouch for it.

A block task records every file it writes (chunks, halo layers, parts of
tables) with its size, modification time and CRC-32 while the bytes are in
memory. A resumed run checks a marker's files before trusting it: a file is
intact when it is there with the recorded size and either the same version
(a local file's modification time, an object's ETag: nothing rewrote it) or,
where it differs (a copy, a rewrite), the same checksum. A check therefore
costs a ``stat`` (or a ``HEAD``) per file and reads only files that something
else touched.
"""

from __future__ import annotations

import os
import posixpath
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe.io import storage
from segpipe.io.storage import Where

__all__ = ["Written", "checksum", "damaged", "from_arrays", "note", "recording", "to_arrays"]

_local = threading.local()
_READ = 1 << 22


@dataclass(frozen=True)
class Written:
    """One file as it was written: path, size in bytes, version and CRC-32.

    The version is a local file's mtime in ns, an object's ETag as a number
    (`segpipe.io.storage.stamp`)."""

    path: str
    size: int
    mtime_ns: int
    crc: int

    def intact(self, path: Where | None = None) -> bool:
        """Whether the file (at ``path``, default its own) is still what was written."""
        where = storage.location(path or self.path)
        try:
            size, version = storage.stamp(where)
        except OSError:
            return False
        if size != self.size:
            return False
        if version == self.mtime_ns:
            return True
        try:
            return checksum(where) == self.crc
        except OSError:
            return False


def checksum(path: Where) -> int:
    """CRC-32 of a file's (or object's) bytes (read 4 MiB at a time)."""
    crc = 0
    with storage.location(path).open("rb") as fh:
        while chunk := fh.read(_READ):
            crc = zlib.crc32(chunk, crc)
    return crc


@contextmanager
def recording() -> Iterator[list[Written]]:
    """Collect, in this thread, the files that `note` is told about until the block ends."""
    outer = getattr(_local, "files", None)
    files: list[Written] = []
    _local.files = files
    try:
        yield files
    finally:
        _local.files = outer
        if outer is not None:
            outer.extend(files)


def note(path: Where, payload: Any = None, stamp: tuple[int, int] | None = None) -> None:
    """Record that ``path`` was just written (with ``payload``, its bytes, if at hand,
    and its ``stamp`` if the store told it), when a block is `recording`; otherwise do
    nothing."""
    files = getattr(_local, "files", None)
    if files is None:
        return
    size, version = stamp or storage.stamp(storage.location(path))
    view = None if payload is None else memoryview(payload).cast("B")
    crc = zlib.crc32(view) if view is not None and view.nbytes == size else checksum(path)
    files.append(Written(str(path), size, version, crc))


def to_arrays(files: Sequence[Written], base: Where) -> dict[str, NDArray[np.generic]]:
    """``files`` as plain arrays for an ``.npz`` marker, paths relative to ``base`` (the
    marker's folder, so that a moved store still checks)."""
    return {
        "__files": np.array([_relative(f.path, str(base)) for f in files], dtype=str),
        "__files_v": np.array([(f.size, f.mtime_ns, f.crc) for f in files], np.int64).reshape(
            -1, 3
        ),
    }


def from_arrays(arrays: dict[str, NDArray[np.generic]], base: Where) -> list[Written]:
    """The files a marker's arrays record (`to_arrays`), paths made absolute again."""
    if "__files" not in arrays:
        return []
    names = arrays["__files"].tolist()
    values = arrays["__files_v"].tolist()
    return [
        Written(_absolute(n, str(base)), int(s), int(m), int(c))
        for n, (s, m, c) in zip(names, values, strict=True)
    ]


def _split(path: str) -> tuple[str, str]:
    """``("s3://", "bucket/key")`` of a URL, ``("", path)`` of a local path."""
    if storage.is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://", rest
    return "", path


def _relative(path: str, base: str) -> str:
    (scheme, p), (_, b) = _split(path), _split(base)
    if scheme:
        return posixpath.relpath("/" + p, "/" + b)
    return os.path.relpath(p, b)


def _absolute(name: str, base: str) -> str:
    scheme, b = _split(base)
    if scheme:
        return scheme + posixpath.normpath(posixpath.join("/" + b, name)).lstrip("/")
    return os.path.normpath(os.path.join(b, name))


def damaged(files: Sequence[Written]) -> list[str]:
    """The paths of ``files`` that are missing or no longer what was written."""
    return [f.path for f in files if not f.intact()]

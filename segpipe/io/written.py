"""What a block task wrote, so that its completion marker can vouch for it.

A block task records every file it writes (chunks, halo layers, parts of
tables) with its size, modification time and CRC-32 while the bytes are in
memory. A resumed run checks a marker's files before trusting it: a file is
intact when it is there with the recorded size and either the same
modification time (nothing rewrote it) or, where the time differs (a copy, a
rewrite), the same checksum. A check therefore costs a ``stat`` per file and
reads only files that something else touched.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["Written", "checksum", "damaged", "from_arrays", "note", "recording", "to_arrays"]

_local = threading.local()
_READ = 1 << 22


@dataclass(frozen=True)
class Written:
    """One file as it was written: path, size in bytes, mtime (ns) and CRC-32."""

    path: str
    size: int
    mtime_ns: int
    crc: int

    def intact(self, path: str | Path | None = None) -> bool:
        """Whether the file (at ``path``, default its own) is still what was written."""
        where = Path(path or self.path)
        try:
            st = where.stat()
        except OSError:
            return False
        if st.st_size != self.size:
            return False
        if st.st_mtime_ns == self.mtime_ns:
            return True
        try:
            return checksum(where) == self.crc
        except OSError:
            return False


def checksum(path: str | Path) -> int:
    """CRC-32 of a file's bytes (read 4 MiB at a time)."""
    crc = 0
    with open(path, "rb") as fh:
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


def note(path: str | Path, payload: Any = None) -> None:
    """Record that ``path`` was just written (with ``payload``, its bytes, if at hand),
    when a block is `recording`; otherwise do nothing."""
    files = getattr(_local, "files", None)
    if files is None:
        return
    st = os.stat(path)
    view = None if payload is None else memoryview(payload).cast("B")
    crc = zlib.crc32(view) if view is not None and view.nbytes == st.st_size else checksum(path)
    files.append(Written(os.fspath(path), st.st_size, st.st_mtime_ns, crc))


def to_arrays(files: Sequence[Written], base: str | Path) -> dict[str, NDArray[np.generic]]:
    """``files`` as plain arrays for an ``.npz`` marker, paths relative to ``base`` (the
    marker's folder, so that a moved store still checks)."""
    return {
        "__files": np.array([os.path.relpath(f.path, base) for f in files], dtype=str),
        "__files_v": np.array([(f.size, f.mtime_ns, f.crc) for f in files], np.int64).reshape(
            -1, 3
        ),
    }


def from_arrays(arrays: dict[str, NDArray[np.generic]], base: str | Path) -> list[Written]:
    """The files a marker's arrays record (`to_arrays`), paths made absolute again."""
    if "__files" not in arrays:
        return []
    names = arrays["__files"].tolist()
    values = arrays["__files_v"].tolist()
    return [
        Written(os.path.normpath(os.path.join(base, n)), int(s), int(m), int(c))
        for n, (s, m, c) in zip(names, values, strict=True)
    ]


def damaged(files: Sequence[Written]) -> list[str]:
    """The paths of ``files`` that are missing or no longer what was written."""
    return [f.path for f in files if not f.intact()]

"""Whole-chunk reads and writes of local Zarr v3 arrays, beside zarr-python's pipeline.

Block tasks read and write whole chunks. Through zarr-python each call goes to its
event-loop thread and codec thread pool and back: ~0.6 ms per read and ~1.2 ms per
write on top of the codec and the file (1024² chunks, this 2-core VM), paid about
fifteen times per block. For the plain layout segpipe creates (a regular grid,
default ``c/i/j`` keys, little-endian ``bytes``, at most one ``blosc`` codec, a
local store) and a region that is exactly one chunk, `layout` describes the array
and `read_chunk` / `write_chunk` do the same file operations zarr does (the same
codec through numcodecs, an atomic replace); callers fall back to zarr for anything
else.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numcodecs
import numpy as np
import zarr
from numpy.typing import NDArray
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.storage import LocalStore

from segpipe.io import written

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@dataclass(frozen=True)
class Layout:
    """Where an array's chunk files are and how they are encoded."""

    root: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: Any
    blosc: numcodecs.Blosc | None

    def index(self, region: tuple[slice, ...]) -> tuple[int, ...] | None:
        """The chunk ``region`` covers exactly (a chunk cut by the array's end counts
        whole), or None."""
        if len(region) != len(self.shape):
            return None
        out = []
        for s, c, n in zip(region, self.chunks, self.shape, strict=True):
            start = 0 if s.start is None else s.start
            stop = n if s.stop is None else s.stop
            if s.step not in (None, 1) or start % c or stop != min(start + c, n):
                return None
            out.append(start // c)
        return tuple(out)

    def covered(self, region: tuple[slice, ...]) -> list[tuple[int, ...]]:
        """Indices of the chunks that ``region`` (plain slices) touches."""
        ranges = []
        for s, c, n in zip(region, self.chunks, self.shape, strict=True):
            start, stop, _ = s.indices(n)
            ranges.append(range(start // c, -(-stop // c)) if stop > start else range(0))
        return list(itertools.product(*ranges))

    def path(self, index: tuple[int, ...]) -> Path:
        return self.root.joinpath("c", *(str(i) for i in index))

    def extent(self, index: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            min(c, n - i * c) for i, c, n in zip(index, self.chunks, self.shape, strict=True)
        )


def layout(array: zarr.Array[Any]) -> Layout | None:
    """The array's `Layout` when its chunks can be read and written here, else None."""
    meta = array.metadata
    if meta.zarr_format != 3 or not isinstance(array.store, LocalStore):
        return None
    keys = meta.chunk_key_encoding
    if not isinstance(keys, DefaultChunkKeyEncoding) or keys.separator != "/":
        return None
    if not isinstance(meta.chunk_grid, RegularChunkGrid):
        return None
    codecs = list(meta.codecs)
    dtype = np.dtype(array.dtype)
    if not codecs or not isinstance(codecs[0], BytesCodec) or dtype.kind not in "biuf":
        return None
    if dtype.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
        return None
    blosc = None
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        c = codecs[1]
        blosc = numcodecs.Blosc(
            cname=c.cname.value,
            clevel=c.clevel,
            shuffle=_SHUFFLE[c.shuffle.value],
            blocksize=c.blocksize,
            typesize=c.typesize,
        )
    elif len(codecs) != 1:
        return None
    root = Path(array.store.root) / array.path if array.path else Path(array.store.root)
    return Layout(
        root,
        tuple(array.shape),
        tuple(meta.chunk_grid.chunk_shape),
        dtype.newbyteorder("<"),
        array.fill_value,
        blosc,
    )


def layout_of(root: Path, meta: dict[str, Any]) -> Layout | None:
    """`layout` from an array's parsed ``zarr.json`` at ``root``, without opening it
    through zarr (~2-4 ms an array); None for anything but segpipe's plain layout."""
    try:
        if (meta["zarr_format"], meta["node_type"]) != (3, "array"):
            return None
        keys, grid = meta["chunk_key_encoding"], meta["chunk_grid"]
        if keys["name"] != "default" or keys.get("configuration", {}).get("separator") != "/":
            return None
        if grid["name"] != "regular" or meta.get("storage_transformers"):
            return None
        dtype = np.dtype(meta["data_type"])
        codecs = meta["codecs"]
        if dtype.kind not in "biuf" or not codecs or codecs[0]["name"] != "bytes":
            return None
        endian = codecs[0].get("configuration", {}).get("endian")
        if dtype.itemsize > 1 and endian != "little":
            return None
        blosc = None
        if len(codecs) == 2 and codecs[1]["name"] == "blosc":
            c = codecs[1]["configuration"]
            blosc = numcodecs.Blosc(
                cname=c["cname"],
                clevel=c["clevel"],
                shuffle=_SHUFFLE[c["shuffle"]],
                blocksize=c["blocksize"],
                typesize=c["typesize"],
            )
        elif len(codecs) != 1:
            return None
        fill = meta["fill_value"]
        if isinstance(fill, bool) or not isinstance(fill, int | float):
            return None
        return Layout(
            Path(root),
            tuple(int(n) for n in meta["shape"]),
            tuple(int(n) for n in grid["configuration"]["chunk_shape"]),
            dtype.newbyteorder("<"),
            dtype.type(fill),
            blosc,
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def read_chunk(lay: Layout, index: tuple[int, ...]) -> NDArray[Any]:
    """Chunk ``index``, cut to the array's extent (fill value where it was never written)."""
    extent = lay.extent(index)
    out = np.empty(lay.chunks, lay.dtype)
    try:
        with open(lay.path(index), "rb") as f:
            if lay.blosc is not None:
                lay.blosc.decode(f.read(), out=out)
            elif f.readinto(cast(Any, out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise ValueError(f"{lay.path(index)}: chunk shorter than {out.nbytes} bytes")
    except FileNotFoundError:
        return np.full(extent, lay.fill_value, dtype=lay.dtype)
    if extent != lay.chunks:
        out = np.ascontiguousarray(out[tuple(slice(0, e) for e in extent)])
    return out.astype(lay.dtype.newbyteorder("="), copy=False)


def write_chunk(lay: Layout, index: tuple[int, ...], data: NDArray[Any]) -> None:
    """Write chunk ``index`` (``data`` of its extent; the rest of an edge chunk is the
    fill value, as zarr pads it), replacing the file atomically."""
    extent = lay.extent(index)
    if data.shape != extent:
        raise ValueError(f"chunk {index}: expected data of shape {extent}, got {data.shape}")
    if extent != lay.chunks:
        full = np.full(lay.chunks, lay.fill_value, dtype=lay.dtype)
        full[tuple(slice(0, e) for e in extent)] = data
    else:
        full = np.ascontiguousarray(data, dtype=lay.dtype)
    payload: Any = full if lay.blosc is None else lay.blosc.encode(full)
    path = lay.path(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(payload).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    written.note(path, payload)

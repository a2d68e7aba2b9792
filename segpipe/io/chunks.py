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

A sharded array (zarr's ``sharding_indexed`` codec, index at the end with
``bytes`` + ``crc32c``, inner chunks in the same plain codecs) is handled the same
way a shard at a time: `Layout.chunks` is then the shard, `Layout.inner` the inner
chunk, and a shard file is its inner chunks encoded one by one in Morton order (as
zarr orders them) followed by the index of their offsets and lengths.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import google_crc32c
import numcodecs
import numpy as np
import zarr
from numpy.typing import NDArray
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.core.indexing import morton_order_iter
from zarr.storage import FsspecStore, LocalStore

from segpipe.io import storage, written
from segpipe.io.storage import Location

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
_EMPTY = 2**64 - 1  # offset and length of an inner chunk a shard does not hold


@dataclass(frozen=True)
class Layout:
    """Where an array's chunk files are and how they are encoded.

    For a sharded array ``chunks`` is the shard (one file) and ``inner`` the chunks
    it holds, each encoded alone; ``inner`` is None for an unsharded one."""

    root: Location
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: Any
    blosc: numcodecs.Blosc | None
    inner: tuple[int, ...] | None = None

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

    def path(self, index: tuple[int, ...]) -> Location:
        return self.root.joinpath("c", *(str(i) for i in index))

    def extent(self, index: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            min(c, n - i * c) for i, c, n in zip(index, self.chunks, self.shape, strict=True)
        )


def _blosc(cname: str, clevel: int, shuffle: str, blocksize: int, typesize: int | None) -> Any:
    return numcodecs.Blosc(
        cname=cname,
        clevel=clevel,
        shuffle=_SHUFFLE[shuffle],
        blocksize=blocksize,
        typesize=typesize,
    )


def _plain(codecs: list[Any], dtype: np.dtype[Any]) -> tuple[bool, numcodecs.Blosc | None]:
    """Whether ``codecs`` (zarr's codec objects) are little-endian ``bytes`` and at most
    one ``blosc``, and that blosc as numcodecs'."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return False, None
    if dtype.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
        return False, None
    if len(codecs) == 1:
        return True, None
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        c = codecs[1]
        return True, _blosc(c.cname.value, c.clevel, c.shuffle.value, c.blocksize, c.typesize)
    return False, None


def layout(array: zarr.Array[Any]) -> Layout | None:
    """The array's `Layout` when its chunks can be read and written here, else None."""
    meta = array.metadata
    if meta.zarr_format != 3 or not isinstance(array.store, LocalStore | FsspecStore):
        return None
    keys = meta.chunk_key_encoding
    if not isinstance(keys, DefaultChunkKeyEncoding) or keys.separator != "/":
        return None
    if not isinstance(meta.chunk_grid, RegularChunkGrid):
        return None
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biuf":
        return None
    codecs = list(meta.codecs)
    inner = None
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        shard = codecs[0]
        index = list(shard.index_codecs)
        if (
            shard.index_location.value != "end"
            or len(index) != 2
            or not isinstance(index[0], BytesCodec)
            or index[0].endian is None
            or index[0].endian.value != "little"
            or not isinstance(index[1], Crc32cCodec)
        ):
            return None
        inner = tuple(int(n) for n in shard.chunk_shape)
        codecs = list(shard.codecs)
    plain, blosc = _plain(codecs, dtype)
    if not plain:
        return None
    if isinstance(array.store, LocalStore):
        base = storage.location(array.store.root)
    else:
        base = storage.location(f"{array.store.fs.protocol[0]}://{array.store.path}")
    root = base / array.path if array.path else base
    return Layout(
        root,
        tuple(array.shape),
        tuple(meta.chunk_grid.chunk_shape),
        dtype.newbyteorder("<"),
        array.fill_value,
        blosc,
        inner,
    )


def _plain_of(codecs: list[dict[str, Any]], dtype: np.dtype[Any]) -> tuple[bool, Any]:
    """`_plain` from the codecs' JSON."""
    if not codecs or codecs[0]["name"] != "bytes":
        return False, None
    endian = codecs[0].get("configuration", {}).get("endian")
    if dtype.itemsize > 1 and endian != "little":
        return False, None
    if len(codecs) == 1:
        return True, None
    if len(codecs) == 2 and codecs[1]["name"] == "blosc":
        c = codecs[1]["configuration"]
        return True, _blosc(c["cname"], c["clevel"], c["shuffle"], c["blocksize"], c["typesize"])
    return False, None


def layout_of(root: Location, meta: dict[str, Any]) -> Layout | None:
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
        if dtype.kind not in "biuf" or not codecs:
            return None
        inner = None
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            shard = codecs[0]["configuration"]
            index = shard["index_codecs"]
            if (
                shard.get("index_location", "end") != "end"
                or [c["name"] for c in index] != ["bytes", "crc32c"]
                or index[0].get("configuration", {}).get("endian") != "little"
            ):
                return None
            inner = tuple(int(n) for n in shard["chunk_shape"])
            codecs = shard["codecs"]
        plain, blosc = _plain_of(codecs, dtype)
        if not plain:
            return None
        fill = meta["fill_value"]
        if isinstance(fill, bool) or not isinstance(fill, int | float):
            return None
        return Layout(
            root,
            tuple(int(n) for n in meta["shape"]),
            tuple(int(n) for n in grid["configuration"]["chunk_shape"]),
            dtype.newbyteorder("<"),
            dtype.type(fill),
            blosc,
            inner,
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def _decode(lay: Layout, payload: Any, out: NDArray[Any], where: Location) -> None:
    """One stored chunk's bytes into ``out`` (a whole chunk, C-contiguous)."""
    if lay.blosc is not None:
        lay.blosc.decode(payload, out=out)
    elif len(payload) != out.nbytes:
        raise ValueError(f"{where}: chunk shorter than {out.nbytes} bytes")
    else:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(payload, np.uint8)


def _inner_grid(lay: Layout) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Inner chunks per shard and their coordinates in zarr's (Morton) order."""
    assert lay.inner is not None
    per = tuple(c // i for c, i in zip(lay.chunks, lay.inner, strict=True))
    return per, list(morton_order_iter(per))


def _inner_slice(lay: Layout, at: tuple[int, ...]) -> tuple[slice, ...]:
    assert lay.inner is not None
    return tuple(slice(a * i, (a + 1) * i) for a, i in zip(at, lay.inner, strict=True))


def _read_shard(lay: Layout, path: Location, out: NDArray[Any]) -> None:
    """The shard file at ``path`` into ``out`` (a whole shard; fill where it holds no chunk)."""
    data = storage.read_bytes(path)
    per, order = _inner_grid(lay)
    size = 16 * int(np.prod(per)) + 4
    if len(data) < size:
        raise ValueError(f"{path}: shard shorter than its {size}-byte index")
    raw = data[len(data) - size : -4]
    if google_crc32c.value(raw) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{path}: the shard's index fails its crc32c checksum")
    index = np.frombuffer(raw, "<u8").reshape(*per, 2)
    inner = np.empty(cast(tuple[int, ...], lay.inner), lay.dtype)
    for at in order:
        start, length = (int(v) for v in index[at])
        where = _inner_slice(lay, at)
        if start == _EMPTY:
            out[where] = lay.fill_value
            continue
        if start + length > len(data) - size:
            raise ValueError(f"{path}: the shard's index points past its data")
        _decode(lay, memoryview(data)[start : start + length], inner, path)
        out[where] = inner


def _encode_shard(lay: Layout, full: NDArray[Any], extent: tuple[int, ...]) -> bytes:
    """A whole shard as zarr's sharding codec stores it: each inner chunk that starts
    within the array's ``extent`` encoded (chunks of the fill value too, as zarr
    writes them with ``write_empty_chunks``), then the little-endian index of
    (offset, length) and its crc32c."""
    per, order = _inner_grid(lay)
    index = np.full((*per, 2), _EMPTY, "<u8")
    parts: list[Any] = []
    offset = 0
    inner = cast(tuple[int, ...], lay.inner)
    for at in order:
        if any(a * i >= e for a, i, e in zip(at, inner, extent, strict=True)):
            continue  # wholly past the array's end: zarr stores nothing for it
        block = np.ascontiguousarray(full[_inner_slice(lay, at)])
        part = block.tobytes() if lay.blosc is None else lay.blosc.encode(block)
        index[at] = (offset, len(part))
        offset += len(part)
        parts.append(part)
    raw = index.tobytes()
    parts += [raw, google_crc32c.value(raw).to_bytes(4, "little")]
    return b"".join(parts)


def read_chunk(lay: Layout, index: tuple[int, ...]) -> NDArray[Any]:
    """Chunk (or shard) ``index``, cut to the array's extent (fill value where it was
    never written)."""
    extent = lay.extent(index)
    out = np.empty(lay.chunks, lay.dtype)
    path = lay.path(index)
    try:
        if lay.inner is not None:
            _read_shard(lay, path, out)
        elif isinstance(path, Path):
            with open(path, "rb") as f:
                if lay.blosc is not None:
                    lay.blosc.decode(f.read(), out=out)
                elif f.readinto(cast(Any, out.reshape(-1).view(np.uint8))) != out.nbytes:
                    raise ValueError(f"{path}: chunk shorter than {out.nbytes} bytes")
        else:
            _decode(lay, storage.read_bytes(path), out, path)
    except FileNotFoundError:
        return np.full(extent, lay.fill_value, dtype=lay.dtype)
    if extent != lay.chunks:
        out = np.ascontiguousarray(out[tuple(slice(0, e) for e in extent)])
    return out.astype(lay.dtype.newbyteorder("="), copy=False)


def write_chunk(lay: Layout, index: tuple[int, ...], data: NDArray[Any]) -> None:
    """Write chunk (or shard) ``index`` (``data`` of its extent; the rest of an edge
    chunk is the fill value, as zarr pads it), replacing the file atomically."""
    extent = lay.extent(index)
    if data.shape != extent:
        raise ValueError(f"chunk {index}: expected data of shape {extent}, got {data.shape}")
    if extent != lay.chunks:
        full = np.full(lay.chunks, lay.fill_value, dtype=lay.dtype)
        full[tuple(slice(0, e) for e in extent)] = data
    else:
        full = np.ascontiguousarray(data, dtype=lay.dtype)
    payload: Any
    if lay.inner is not None:
        payload = _encode_shard(lay, full, extent)
    else:
        payload = full if lay.blosc is None else lay.blosc.encode(full)
    path = lay.path(index)
    stamp = storage.put(path, memoryview(payload).cast("B"))
    written.note(path, payload, stamp)

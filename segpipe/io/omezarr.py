"""OME-Zarr 0.5 (Zarr v3) layout of a segpipe output store.

``OUT/<name>/0..n`` image pyramid, ``OUT/<name>/labels/<label>/0..n`` label
pyramids (strided, never interpolated), NGFF metadata through ome-zarr's
writers, and segpipe's own attributes (run fingerprint, completion).
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from segpipe.blocks import Pyramid
from segpipe.io import attrs, chunks, physical, storage, written
from segpipe.io.physical import PixelSize

SCRATCH = "_segpipe"
IMAGE_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# Labels are long runs of equal ids. lz4 without shuffle, measured on 1024² blocks of
# Otsu labels (one thread, encode/decode ns/px, ratio): uint32 1.4/0.9, 16x; uint64
# panoptic 1.6/1.1, 37x; zstd-1 gave 4.8/3.6, 49x and 8.7/6.8, 61x: 3-6x the time of
# every label write and read for 3x less space on data already >10x smaller than the image.
LABEL_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")


@functools.lru_cache(maxsize=64)
def _opened(path: str, mode: str, stamp: tuple[int, int, int]) -> zarr.Array[Any]:
    # write_empty_chunks: otherwise every chunk written is first compared with the fill
    # value, a whole extra pass (15 % of a run's CPU time, by py-spy); a chunk of zeros
    # compresses to a few bytes anyway.
    return zarr.open_array(path, mode=mode).with_config({"write_empty_chunks": True})


def _stamp(path: str | Path) -> tuple[int, int, int]:
    return storage.identity(storage.location(path) / "zarr.json")


def open_array(path: str | Path, mode: str = "r") -> zarr.Array[Any]:
    """``zarr.open_array(path, mode=mode)`` for block tasks: kept per process while the
    array's ``zarr.json`` is the same file version (opening reads and parses it, ~1 ms,
    once per block and array otherwise; a re-created or re-attributed array is opened
    anew), and writing chunks of zeros rather than testing each chunk for them."""
    return _opened(str(path), mode, _stamp(path))


@functools.lru_cache(maxsize=64)
def _layout(path: str, stamp: tuple[int, int, int]) -> chunks.Layout | None:
    where = storage.location(path)
    try:
        meta = json.loads(storage.read_bytes(where / "zarr.json"))
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and (lay := chunks.layout_of(where, meta)) is not None:
        return lay
    return chunks.layout(_opened(path, "r", stamp))


def array_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of the array at ``path``, from its ``zarr.json`` as `read_block` reads
    it (kept while the file is unchanged), not by opening it through zarr's event loop."""
    lay = _layout(str(path), _stamp(path))
    return lay.shape if lay is not None else tuple(open_array(path).shape)


def _one_chunk(
    path: str | Path, region: tuple[slice, ...]
) -> tuple[chunks.Layout, tuple[int, ...]] | None:
    if not all(isinstance(s, slice) for s in region):
        return None
    lay = _layout(str(path), _stamp(path))
    index = None if lay is None else lay.index(region)
    return None if lay is None or index is None else (lay, index)


def read_block(path: str | Path, region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
    """``region`` of the array at ``path`` as a NumPy array: one whole chunk straight
    from its file (`segpipe.io.chunks`), anything else through zarr (`open_array`)."""
    one = _one_chunk(path, region)
    if one is not None:
        return chunks.read_chunk(*one)
    return np.asarray(open_array(path, mode="r")[region])


def write_block(path: str | Path, region: tuple[slice, ...], data: np.ndarray[Any, Any]) -> None:
    """Write ``data`` to ``region`` of the array at ``path``, as `read_block` reads."""
    one = _one_chunk(path, region)
    if one is not None:
        chunks.write_chunk(*one, data)
        return
    open_array(path, mode="r+")[region] = data
    lay = _layout(str(path), _stamp(path))
    if lay is not None:  # the chunk files the region touched, for the block's marker
        for index in lay.covered(region):
            if lay.path(index).exists():
                written.note(lay.path(index))


def create_array(
    path: str | Path,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    labels: bool = False,
    compress: bool = True,
    inner: Sequence[int] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Create (replacing) a chunked Zarr v3 array with segpipe's codec choices, and
    ``attributes`` when given.

    ``compress=False`` is for scratch arrays of noisy floats (the filtered image):
    they shrink ~1.2x, and compressing costs more time than it saves in I/O.
    ``inner`` makes each chunk (the block a task writes) a shard of inner chunks of
    about that shape (`inner_chunks`), so that a viewer reads a small region
    without decoding the whole block; None, or inner chunks as large as the chunk,
    leave the array unsharded.
    """
    where = storage.location(path)
    if where.exists():
        storage.remove_tree(where)
    grid, small = chunking(shape, chunks, inner)
    edges = list(grid)
    sharded = small != grid
    codec = "none" if not compress else "labels" if labels else "image"
    meta = dict(_array_template(np.dtype(dtype).str, codec, len(shape), sharded))
    meta["shape"] = list(shape)
    meta["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": edges}}
    if sharded:
        shard = dict(meta["codecs"][0])
        shard["configuration"] = {**shard["configuration"], "chunk_shape": list(small)}
        meta["codecs"] = [shard]
    if attributes:
        meta["attributes"] = dict(attributes)
    if isinstance(where, Path):
        where.mkdir(parents=True)
        (where / "zarr.json").write_text(json.dumps(meta), encoding="utf-8")
    else:
        storage.put(where / "zarr.json", json.dumps(meta).encode())


def chunking(
    shape: Sequence[int], chunks: Sequence[int], inner: Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The chunk grid (shards, when sharded) and the chunks inside them that
    `create_array` gives an array of ``shape``: equal when it is unsharded; zarr's
    ``(array.shards or array.chunks, array.chunks)``."""
    grid = tuple(min(c, max(s, 1)) for c, s in zip(chunks, shape, strict=True))
    small = None if inner is None else inner_chunks(grid, inner)
    return grid, grid if small is None else small


def inner_chunks(chunks: Sequence[int], inner: Sequence[int]) -> tuple[int, ...] | None:
    """The inner chunks of a shard of shape ``chunks``: per axis the largest edge up to
    ``inner`` that divides the shard's (zarr requires whole inner chunks), at least
    half of ``inner``, else the shard's whole edge; None when that is the whole shard.

    Examples
    --------
    >>> inner_chunks((2048, 2048), (256, 256)), inner_chunks((300, 1000), (256, 256))
    ((256, 256), (150, 250))
    >>> inner_chunks((256, 256), (256, 256)) is None, inner_chunks((64, 997), (1, 256))
    (True, (1, 997))
    """
    out = []
    for c, i in zip(chunks, inner, strict=True):
        fits = [d for d in range(min(i, c), max(i // 2, 1) - 1, -1) if c % d == 0]
        out.append(fits[0] if c > i and fits else c)
    small = tuple(out)
    return None if small == tuple(chunks) else small


@functools.lru_cache(maxsize=32)
def _array_template(dtype: str, codec: str, ndim: int, sharded: bool = False) -> dict[str, Any]:
    """The ``zarr.json`` zarr writes for one of segpipe's arrays of this dtype, codec and
    dimensionality, sharded or not (made once per process in memory; each array then
    gets its shape, chunks and inner chunks written straight to its file: through zarr
    a creation took ~2 ms)."""
    store: dict[str, Any] = {}
    compressors = {"none": None, "labels": LABEL_CODEC, "image": IMAGE_CODEC}[codec]
    zarr.create_array(
        store=store,
        shape=(2 if sharded else 1,) * ndim,
        chunks=(1,) * ndim,
        shards=(2,) * ndim if sharded else None,
        dtype=np.dtype(dtype),
        compressors=compressors,
        fill_value=0,
        zarr_format=3,
        dimension_names=axes_names(ndim),
    )
    return dict(json.loads(store["zarr.json"].to_bytes()))


def axes_names(ndim: int) -> list[str]:
    return ["z", "y", "x"][3 - ndim :]


def _datasets(pyramid: Pyramid, pixel: PixelSize | None) -> list[dict[str, Any]]:
    return [
        {
            "path": str(k),
            "coordinateTransformations": physical.level_transforms(pixel, pyramid.factor(k)),
        }
        for k in range(len(pyramid))
    ]


def _axes(ndim: int, pixel: PixelSize | None) -> list[dict[str, str]]:
    """Spatial axes, with the unit only where the input states its pixel size."""
    unit = {"unit": pixel.unit} if pixel is not None else {}
    return [{"name": a, "type": "space", **unit} for a in axes_names(ndim)]


def write_image_metadata(
    group_path: str | Path, *, pyramid: Pyramid, name: str, pixel: PixelSize | None = None
) -> None:
    """NGFF multiscales metadata for the image group of ``pyramid``'s levels; scales
    in ``pixel``'s unit."""
    ndim = len(pyramid.shapes[0])
    ome = attrs.multiscales(name, _axes(ndim, pixel), _datasets(pyramid, pixel))
    attrs.update(group_path, {"ome": ome})


def write_label_group_metadata(
    label_path: str | Path,
    *,
    pyramid: Pyramid,
    name: str,
    properties: list[dict[str, Any]] | None = None,
    colors: list[dict[str, Any]] | None = None,
    pixel: PixelSize | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """NGFF multiscales + image-label metadata of one label image, and the top-level
    attributes ``extra`` in the same write."""
    ndim = len(pyramid.shapes[0])
    ome = attrs.multiscales(name, _axes(ndim, pixel), _datasets(pyramid, pixel))
    ome["image-label"] = attrs.image_label(properties, colors)
    attrs.update(label_path, {"ome": ome, **(extra or {})})


LABEL_VALUES = 10_000
"""Label images with at most this many values list each one's colour and properties in
their metadata; larger ones say where the values are described instead (a viewer
reads the metadata whole: millions of entries would make it unopenable)."""


def rgba(values: Sequence[int]) -> list[dict[str, Any]]:
    """NGFF ``colors`` for label ``values``: each in its preview colour
    (`segpipe.preview.colours`), 0 (background) transparent."""
    from segpipe.preview import colours

    ids = np.asarray(values, np.uint64)
    table = np.concatenate([colours(ids), np.where(ids == 0, 0, 255)[:, None]], axis=1)
    return [
        {"label-value": v, "rgba": rgba}
        for v, rgba in zip(ids.tolist(), table.astype(int).tolist(), strict=True)
    ]


def describe_label_values(
    label_path: str | Path, properties: list[dict[str, Any]] | None, where: str
) -> None:
    """Add ``properties`` (one per label value) and their `rgba` colours to a label
    image's ``image-label``, or, past `LABEL_VALUES` values (``properties`` None),
    say ``where`` they are described. Without properties, the colour list (which
    NGFF's strict schema asks for, and ome-zarr-models wants to name the same values
    as the properties) holds the background alone, transparent."""
    if properties is None:
        segpipe = {"label-values": f"more than {LABEL_VALUES}: see {where}"}
    else:
        segpipe = {"label-values": f"every one listed; also in {where}"}
    colors = rgba([p["label-value"] for p in properties or []] or [0])

    def described(current: dict[str, Any]) -> dict[str, Any]:
        ome = dict(current["ome"])
        label = dict(ome["image-label"])
        label.pop("properties", None)
        label["colors"] = colors
        if properties:
            label["properties"] = properties
        ome["image-label"] = label
        return {"ome": ome, "segpipe": {**current.get("segpipe", {}), **segpipe}}

    attrs.change(label_path, described)


def write_collection(root: str | Path, names: Sequence[str]) -> None:
    """Say at the store's root which image groups it holds, as NGFF's
    ``bioformats2raw.layout`` does: the root marks the layout and its ``OME`` group
    lists the images' paths (``series``), so OME-Zarr tools open the root while each
    image keeps its own name."""
    from segpipe.io.store import COLLECTION

    attrs.update(root, {"ome": {"version": attrs.NGFF, "bioformats2raw.layout": 3}})
    attrs.update(
        storage.join(str(root), COLLECTION), {"ome": {"version": attrs.NGFF, "series": list(names)}}
    )


def write_labels_index(labels_path: str | Path, names: list[str]) -> None:
    """The ``labels`` group that lists the label images (written last)."""
    try:
        value = attrs.read(labels_path).get("ome")
    except FileNotFoundError:  # a new group
        value = None
    ome: dict[str, Any] = dict(value) if isinstance(value, dict) else {}
    ome.update({"version": attrs.NGFF, "labels": list(dict.fromkeys(names))})
    attrs.update(labels_path, {"ome": ome})


def downsample_block(src: str, dst: str, region: tuple[slice, ...]) -> None:
    """Write ``region`` of level k+1 as every second pixel of level k (nearest) along
    each axis level k+1 halves (the axes whose length it has shorter), the others kept.

    Level k is read one chunk at a time (each strided into the output, then dropped):
    the 2x2 chunks under one output chunk, read at once, held 4x its size in the
    source dtype (128 MiB for uint64 labels at tile 2048) per worker thread."""
    arr = open_array(src, mode="r")
    chunks_k, shape_k = arr.shards or arr.chunks, arr.shape  # whole shards: the fast path
    steps = [
        2 if m < n else 1 for m, n in zip(open_array(dst, mode="r").shape, shape_k, strict=True)
    ]
    read = [
        slice(f * s.start, min(f * s.stop, n))
        for s, n, f in zip(region, shape_k, steps, strict=True)
    ]
    out = np.empty(tuple(s.stop - s.start for s in region), dtype=arr.dtype)
    spans = [range(r.start // c, -(-r.stop // c)) for r, c in zip(read, chunks_k, strict=True)]
    for index in itertools.product(*spans):
        chunk = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, chunks_k, shape_k, strict=True)
        )
        src_at, dst_at = [], []
        for c, r, f in zip(chunk, read, steps, strict=True):
            lo, hi = max(c.start, r.start), min(c.stop, r.stop)
            lo += -(lo - r.start) % f  # every f-th coordinate of level k from the start
            src_at.append(slice(lo - c.start, hi - c.start, f))
            dst_at.append(slice((lo - r.start) // f, (lo - r.start) // f + len(range(lo, hi, f))))
        out[tuple(dst_at)] = read_block(src, chunk)[tuple(src_at)]
    write_block(dst, region, out)

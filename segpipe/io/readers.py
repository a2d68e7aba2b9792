"""Lazy readers for TIFF/OME-TIFF, PNG/JPEG and Zarr/OME-Zarr images.

`open_source` inspects a file on the client (cheap: headers only) and returns
a picklable `SourceSpec`; workers call `read_region` with it and open the
file themselves, because tifffile's Zarr store cannot travel to a worker.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal, cast

import numpy as np
from numpy.typing import NDArray
from upath import UPath

from segpipe.errors import (
    ConfigError,
    InputNotFoundError,
    InputReadError,
    SegpipeError,
    UnsupportedImageError,
)
from segpipe.io import physical, plate, storage, tiff_tiles
from segpipe.io.physical import PixelSize

Channel = int | Literal["mean", "max", "sum"] | None
REDUCTIONS = ("mean", "max", "sum")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
PIL_SUFFIXES = PNG_SUFFIXES + JPEG_SUFFIXES
ZARR_SUFFIXES = (".zarr", ".ome.zarr")
ZARR_METADATA = "zarr.json"
SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES + ZARR_SUFFIXES

# Limits against decompression bombs: a few hundred bytes can declare a
# terapixel image, and a worker would allocate whatever one chunk declares.
MAX_PIXELS = 2**40  # whole image, any format
MAX_CHUNK_BYTES = 2**31  # one decode unit (TIFF tile/strip, Zarr chunk)
MAX_WHOLE_PIXELS = 2**30  # PNG/JPEG, which are decoded whole
# No real codec stores a TIFF at more than 65536:1 (deflate tops out at 1032:1,
# zstd on a blank image near 32000:1); images under 256 MiB are let through.
MAX_TIFF_RATIO = 2**16
BOMB_FLOOR_BYTES = 2**28
DEFLATE_MAX_RATIO = 1032  # RFC 1951: the most a deflate stream can expand

_MAGIC = {
    "tiff": (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"),
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
}


@dataclass(frozen=True)
class SourceSpec:
    """Where an image is and how to turn its stored array into (Z, )Y, X.

    ``axes`` names the stored array's axes: ``Z`` (planes), ``C`` (channels),
    ``Y``, ``X``, and ``1`` for singleton axes that are dropped. ``shape`` is
    the spatial shape segpipe works on; ``chunks`` the spatial shape of the
    file's decode unit (tile, strip, Zarr chunk; the whole image for PNG/JPEG,
    ones where any region reads without waste), so aligned regions decode
    nothing twice. ``data_offset`` is set for uncompressed contiguous TIFF
    data, which is read through a memory map in the file's ``byteorder``.
    ``array_path`` is the absolute directory of the Zarr array read (the
    level-0 dataset of an OME-Zarr image), empty for files; ``series`` the
    TIFF image series read, ``level`` its resolution level (a pyramidal TIFF's);
    ``pixel`` the physical pixel size the input states (`segpipe.io.physical`),
    None where it states none.
    """

    path: str
    name: str
    format: Literal["tiff", "pil", "zarr"]
    axes: str
    stored_shape: tuple[int, ...]
    dtype: str
    channel: Channel
    array_path: str = ""
    series: int = 0
    chunks: tuple[int, ...] = ()
    data_offset: int | None = None
    byteorder: Literal["<", ">"] = "<"
    pixel: PixelSize | None = None
    level: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(n for a, n in zip(self.axes, self.stored_shape, strict=True) if a not in "C1")

    @property
    def n_channels(self) -> int:
        return next((n for a, n in zip(self.axes, self.stored_shape, strict=True) if a == "C"), 1)

    @property
    def out_dtype(self) -> np.dtype[Any]:
        """The dtype `read_region` returns and the stored image has: the file's, except
        float32 for channel means and sums, and for float16, which the compiled
        per-object kernels cannot take (every float16 is exact in float32)."""
        if "C" in self.axes and self.channel in ("mean", "sum"):
            return np.dtype(np.float32)
        if np.dtype(self.dtype) == np.float16:
            return np.dtype(np.float32)
        return np.dtype(self.dtype)

    @property
    def whole_file(self) -> bool:
        """True for formats that must be decoded whole (PNG/JPEG)."""
        return self.format == "pil"


def image_name(path: str | Path) -> str:
    """The output name of an input: its file name without image suffixes, or a plate
    field's path in its plate (``A/1/0``, `segpipe.io.plate`).

    A name that would be ``zarr.json`` keeps its suffix: the image's folder
    would land on the metadata file of the output store's root.

    >>> image_name("/data/cells.ome.tif"), image_name("zarr.json.tif")
    ('cells', 'zarr.json.tif')
    """
    if (field := plate.field_name(path)) is not None:
        return field
    name = Path(str(path).rstrip("/")).name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            return name if stem.lower() == ZARR_METADATA else stem
    return Path(name).stem or name


def parse_channel(channel: object) -> Channel:
    """Validate a channel choice: ``None``, an index >= 0, or a reduction name."""
    if channel is None or (isinstance(channel, str) and channel in REDUCTIONS):
        return cast(Channel, channel)
    if isinstance(channel, int | np.integer) and not isinstance(channel, bool) and channel >= 0:
        return int(channel)
    raise ConfigError(
        f"channel: Expected a channel index >= 0 or one of {'|'.join(REDUCTIONS)}, "
        f"got {channel!r} instead."
    )


# -- axes and checks shared by all formats -----------------------------------


def _normalise_axes(axes: str, shape: Sequence[int], path: str) -> str:
    """Map tifffile/NGFF axis letters to Z, C, Y, X, or 1 for a dropped singleton."""
    if len(axes) != len(shape):
        raise UnsupportedImageError(
            f"{path}: axes {axes!r} name {len(axes)} axes, the array has {len(shape)} "
            f"(shape {tuple(shape)})."
        )
    out = []
    for a, n in zip(axes.upper(), shape, strict=True):
        if a in "YX":
            out.append(a)
        elif n == 1:
            out.append("1")
        elif a in "CS":
            out.append("C")
        elif a in "ZQI":  # tifffile: Q unknown, I image sequence; both are planes
            out.append("Z")
        else:
            raise UnsupportedImageError(
                f"{path}: axis {a!r} of length {n} is not supported; expected (Z,) (C,) Y, X "
                f"(axes {axes!r}, shape {tuple(shape)})."
            )
    norm = "".join(out)
    spatial = _spatial_axes(norm)
    if norm.count("Z") > 1 or norm.count("C") > 1 or spatial not in ("YX", "ZYX"):
        raise UnsupportedImageError(
            f"{path}: cannot interpret axes {axes!r} of shape {tuple(shape)}; "
            "expected (Z,) (C,) Y, X in that order, or Y, X, C."
        )
    return norm


def _check_array(spec: SourceSpec, chunk_bytes: int | None = None) -> SourceSpec:
    dtype = np.dtype(spec.dtype)
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise UnsupportedImageError(
            f"{spec.path}: unsupported dtype {dtype}; expected unsigned/signed integers or "
            "floats (convert booleans to uint8)."
        )
    if any(n == 0 for n in spec.stored_shape):
        raise UnsupportedImageError(
            f"{spec.path}: image has a zero-length axis, shape {spec.stored_shape}."
        )
    if np.prod(spec.stored_shape, dtype=np.float64) > MAX_PIXELS:
        raise UnsupportedImageError(
            f"{spec.path}: declares a {spec.stored_shape} image, beyond the {MAX_PIXELS:.2e} "
            "pixel limit: corrupt or a decompression bomb."
        )
    if chunk_bytes is not None and chunk_bytes > MAX_CHUNK_BYTES:
        raise UnsupportedImageError(
            f"{spec.path}: one stored chunk decodes to {chunk_bytes / 2**30:.1f} GiB, beyond "
            f"the {MAX_CHUNK_BYTES / 2**30:.0f} GiB limit; rewrite it tiled (e.g. 1024x1024)."
        )
    n = spec.n_channels
    if n > 1 and spec.channel is None:
        raise UnsupportedImageError(
            f"{spec.path}: image has {n} channels (axes {spec.axes!r}); choose one with "
            f"`channel: N` (0 to {n - 1}) or a reduction (`channel: mean|max|sum`)."
        )
    if isinstance(spec.channel, int) and not 0 <= spec.channel < n:
        raise UnsupportedImageError(
            f"{spec.path}: channel {spec.channel} requested, the image has {n} "
            f"(choose 0 to {n - 1})."
        )
    return spec


def _native(dtype: Any) -> str:
    """The dtype's name in native byte order (``>u2`` -> ``uint16``)."""
    return str(np.dtype(dtype).newbyteorder("=").name)


def _no_level(path: str, level: int, levels: int) -> ConfigError:
    return ConfigError(f"{path}: level {level} asked; the image has {levels} (0-{levels - 1}).")


def _spatial_axes(axes: str) -> str:
    return "".join(a for a in axes if a in "ZYX")


def _spatial(axes: str, values: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for a, v in zip(axes, values, strict=True) if a in "ZYX")


def _is_file(path: str) -> bool:
    return os.path.isfile(path) if not storage.is_url(path) else storage.location(path).is_file()


def _is_dir(path: str) -> bool:
    return os.path.isdir(path) if not storage.is_url(path) else storage.location(path).is_dir()


def _size(path: str) -> int:
    """Bytes of the file at ``path`` (0 for a folder or prefix)."""
    if not storage.is_url(path):
        return os.stat(path).st_size
    where = storage.location(path)
    if where.is_dir():
        return 0
    return storage.stamp(where)[0]


def _open_file(path: str) -> IO[bytes]:
    """The file (or object) at ``path``, opened for reading; an object is read by byte
    ranges of 64 KiB and up, never fetched whole."""
    try:
        if storage.is_url(path):
            where = storage.location(path)
            assert isinstance(where, UPath)
            return cast(IO[bytes], where.fs.open(where.path, "rb", block_size=1 << 16))
        return open(path, "rb")
    except PermissionError as err:
        raise InputReadError(f"{path}: permission denied; make it readable.") from err
    except OSError as err:
        raise InputReadError(f"{path}: cannot open ({err.strerror or err}).") from err


def _read_head(path: str, n: int = 16) -> bytes:
    with _open_file(path) as fh:
        try:
            return fh.read(n)
        except OSError as err:
            raise InputReadError(f"{path}: cannot read ({err.strerror or err}).") from err


def _sniff(head: bytes) -> str | None:
    return next((fmt for fmt, ms in _MAGIC.items() if head.startswith(ms)), None)


# -- TIFF ----------------------------------------------------------------------


def _check_tiff_segments(path: str, series: Any) -> bool:
    """Refuse pages whose strips/tiles are missing or run past the end of the file;
    return whether all pages are in this file (not in companion OME-TIFF files).

    tifffile opens such files and reads the missing part as zeros (slowly, for a
    corrupt size field) or fails only when a worker decodes the block.
    """
    contiguous = series.dataoffset is not None  # read through a memory map, checked whole
    one_file = True
    for page in series.pages:
        if page is None:
            continue
        offsets, counts = page.dataoffsets, page.databytecounts
        needed = int(np.prod(page.chunked, dtype=np.int64))
        if len(offsets) != len(counts) or (len(offsets) < needed and not contiguous):
            raise InputReadError(
                f"{path}: TIFF is corrupt: {len(offsets)} strip/tile offsets and "
                f"{len(counts)} byte counts for an image of {needed} strips/tiles."
            )
        one_file &= page.parent is series.parent
        size = page.parent.filehandle.size
        if offsets and max(o + c for o, c in zip(offsets, counts, strict=True)) > size:
            raise InputReadError(
                f"{path}: TIFF is truncated: image data extends past the end of the file "
                f"({size} bytes)."
            )
    return one_file


def _pick_series(path: str, found: Sequence[Any], series: int | None) -> int:
    """The index of the series to read: the only one, or ``series``, which must exist."""
    if not found:
        raise InputReadError(f"{path}: TIFF holds no image series.")
    listing = ", ".join(
        f"{i}: {tuple(int(n) for n in s.shape)} {s.dtype}" for i, s in enumerate(found[:8])
    ) + (", ..." if len(found) > 8 else "")
    if series is None and len(found) > 1:
        raise UnsupportedImageError(
            f"{path}: TIFF holds {len(found)} image series ({listing}); choose one with "
            f"--series N (`series: N` in run.yaml)."
        )
    index = series or 0
    if not 0 <= index < len(found):
        raise UnsupportedImageError(
            f"{path}: series {index} requested, the TIFF holds {len(found)} ({listing}); "
            f"choose 0 to {len(found) - 1}."
        )
    return index


def tiff_chunks(series: Any, level: int = 0) -> tuple[int, ...]:
    """The chunks zarr sees in level ``level`` of a TIFF series through tifffile's store
    (``series.aszarr``): the level's tiles or strips, with a leading 1 per axis they
    lack.

    Worked out from tifffile's page here rather than asked of zarr, whose event loop
    takes a round trip per input before a run's first block; zarr is asked where
    tifffile has a rule of its own (an axis of one sample, empty images)."""
    import zarr

    chosen = series.levels[level]
    shape = tuple(int(n) for n in chosen.shape)
    tiles = tuple(int(n) for n in chosen.keyframe.chunks)
    if 0 not in shape and (
        len(tiles) == len(shape) or (len(tiles) < len(shape) and shape[-1] != 1)
    ):
        return (1,) * (len(shape) - len(tiles)) + tiles
    return tuple(zarr.open_array(series.aszarr(level=level), mode="r").chunks)


def _tiff_spec(
    path: str, name: str, channel: Channel, axes: str | None, series: int | None, level: int = 0
) -> SourceSpec:
    import tifffile

    try:
        with _open_file(path) as fh, tifffile.TiffFile(fh, name=path) as tif:
            index = _pick_series(path, tif.series, series)
            full = tif.series[index]
            if level >= len(full.levels):
                raise _no_level(path, level, len(full.levels))
            chosen = full.levels[level]
            one_file = _check_tiff_segments(path, chosen)
            if chosen.dtype is None:
                raise UnsupportedImageError(
                    f"{path}: TIFF sample format/bit depth has no NumPy dtype."
                )
            shape = tuple(int(n) for n in chosen.shape)
            norm = _normalise_axes(axes or chosen.axes, shape, path)
            dtype = np.dtype(chosen.dtype)
            declared = float(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            fsize = storage.stamp(storage.location(path))[0]
            if declared > max(BOMB_FLOOR_BYTES, MAX_TIFF_RATIO * fsize):
                raise UnsupportedImageError(
                    f"{path}: declares a {shape} image ({declared:.2e} bytes) in a "
                    f"{fsize}-byte file: corrupt or a decompression bomb."
                )
            offset = chosen.dataoffset if level == 0 and not storage.is_url(path) else None
            if offset is not None and one_file and dtype.kind in "uif":
                if offset + declared > fsize:
                    raise InputReadError(
                        f"{path}: TIFF is truncated: {declared:.0f} bytes of pixels at offset "
                        f"{offset} do not fit in the file ({fsize} bytes)."
                    )
                chunks, chunk_bytes = (1,) * len(_spatial_axes(norm)), None
            else:
                offset = None
                chunk_shape = tiff_chunks(full, level)
                chunks = _spatial(norm, chunk_shape)
                chunk_bytes = int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize
            byteorder: Literal["<", ">"] = ">" if tif.byteorder == ">" else "<"
            pixel = physical.from_tiff(tif, index, _spatial_axes(norm))
            if pixel is not None and level:  # level 0's size, scaled by the level's shrink
                ratio = [
                    a / b
                    for a, b in zip(_spatial(norm, full.shape), _spatial(norm, shape), strict=True)
                ]
                pixel = replace(
                    pixel, sizes=tuple(x * r for x, r in zip(pixel.sizes, ratio, strict=True))
                )
    except SegpipeError:
        raise
    except MemoryError:
        raise
    except Exception as err:  # tifffile raises many types for malformed files
        raise InputReadError(f"{path}: not a readable TIFF ({type(err).__name__}: {err}).") from err
    spec = SourceSpec(
        path,
        name,
        "tiff",
        norm,
        shape,
        _native(dtype),
        channel,
        series=index,
        chunks=chunks,
        data_offset=offset,
        byteorder=byteorder,
        pixel=pixel,
        level=level,
    )
    return _check_array(spec, chunk_bytes)


# -- PNG and JPEG (decoded whole) ------------------------------------------------

_PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> samples after expansion
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_header(path: str) -> tuple[int, int, int, int, bool]:
    """Walk every chunk, checking lengths and CRCs; return (h, w, samples, depth, tRNS)."""
    ihdr: bytes | None = None
    trns, idat, ended = False, 0, False
    with _open_file(path) as fh:
        fh.read(8)
        while not ended:
            head = fh.read(8)
            if not head and ihdr is not None:
                break
            if len(head) < 8:
                raise InputReadError(f"{path}: PNG is truncated (cut inside a chunk header).")
            length, ctype = struct.unpack(">I4s", head)
            if length > 2**31 - 1:
                raise InputReadError(f"{path}: PNG is corrupt (chunk length {length}).")
            crc, left, first = zlib.crc32(ctype), length, b""
            while left:
                block = fh.read(min(left, 1 << 20))
                if not block:
                    raise InputReadError(
                        f"{path}: PNG is truncated (cut inside a {ctype!r} chunk)."
                    )
                first = first or block[:13]
                crc, left = zlib.crc32(block, crc), left - len(block)
            tail = fh.read(4)
            if len(tail) < 4:
                raise InputReadError(f"{path}: PNG is truncated (cut inside a chunk CRC).")
            if struct.unpack(">I", tail)[0] != crc:
                raise InputReadError(f"{path}: PNG is corrupt (CRC mismatch in a {ctype!r} chunk).")
            if ihdr is None:
                if ctype != b"IHDR" or length != 13:
                    raise InputReadError(f"{path}: PNG is corrupt (no IHDR chunk first).")
                ihdr = first
            trns |= ctype == b"tRNS"
            idat += length if ctype == b"IDAT" else 0
            ended = ctype == b"IEND"
    if not ended:
        raise InputReadError(f"{path}: PNG is truncated (no IEND chunk).")
    assert ihdr is not None
    w, h, depth, ctype_, _comp, _filt, _interlace = struct.unpack(">IIBBBBB", ihdr)
    if depth not in _PNG_DEPTHS.get(ctype_, ()):
        raise InputReadError(f"{path}: PNG is corrupt (bit depth {depth}, colour type {ctype_}).")
    samples = _PNG_SAMPLES[ctype_] + (trns and ctype_ in (0, 2, 3))
    raw_bytes = h * ((w * _PNG_SAMPLES[ctype_] * depth + 7) // 8 + 1)
    if raw_bytes > DEFLATE_MAX_RATIO * idat + 4096:
        raise UnsupportedImageError(
            f"{path}: PNG declares {h}x{w} pixels but holds {idat} bytes of image data, more "
            "than deflate can expand: corrupt or a decompression bomb."
        )
    return h, w, samples, depth, trns


def _jpeg_scan_start(data: bytes, path: str) -> tuple[int, tuple[int, int, int, int, int]]:
    """Walk the marker segments up to the first scan; return its offset and the SOF fields
    (marker, precision, height, width, components)."""
    pos, sof = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise InputReadError(f"{path}: JPEG is corrupt (no marker at byte {pos}).")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            if sof is None:
                raise InputReadError(f"{path}: JPEG is corrupt (scan before frame header).")
            return pos, sof
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if pos + 10 > len(data):
                break
            precision, h, w, comps = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
            sof = (marker, precision, h, w, comps)
        pos += 2 + length
    raise InputReadError(f"{path}: JPEG is truncated (ends before its image data).")


def _jpeg_check(data: bytes, path: str) -> tuple[int, int, int]:
    """Check structure and completeness; return (height, width, components)."""
    if not data.startswith(_MAGIC["jpeg"]):
        raise InputReadError(f"{path}: not a JPEG file.")
    sos, (marker, precision, h, w, comps) = _jpeg_scan_start(data, path)
    if data.find(b"\xff\xd9", sos) < 0:
        # Entropy-coded data escapes 0xFF, so an end marker after the scan is the real one.
        raise InputReadError(f"{path}: JPEG is truncated (no end-of-image marker).")
    if marker not in (0xC0, 0xC1, 0xC2) or precision != 8:
        raise UnsupportedImageError(
            f"{path}: only 8-bit baseline/progressive JPEG is supported (SOF{marker - 0xC0}, "
            f"{precision}-bit); convert it to TIFF or PNG."
        )
    if comps not in (1, 3):
        raise UnsupportedImageError(
            f"{path}: JPEG with {comps} components (CMYK?) is not supported; convert it to RGB."
        )
    return h, w, comps


def _pil_spec(path: str, name: str, channel: Channel, fmt: str) -> SourceSpec:
    if fmt == "png":
        h, w, samples, depth, _ = _png_header(path)
        dtype = "uint16" if depth == 16 else "uint8"
    else:
        with _open_file(path) as fh:
            h, w, samples = _jpeg_check(fh.read(), path)
        dtype = "uint8"
    if h * w > MAX_WHOLE_PIXELS:
        raise UnsupportedImageError(
            f"{path}: {h}x{w} pixels is too large to decode whole (limit {MAX_WHOLE_PIXELS:.2e}); "
            "convert it to a tiled TIFF or Zarr."
        )
    if samples == 1:
        spec = SourceSpec(path, name, "pil", "YX", (h, w), dtype, channel, chunks=(h, w))
    else:
        spec = SourceSpec(path, name, "pil", "YXC", (h, w, samples), dtype, channel, chunks=(h, w))
    return _check_array(spec)


def _decode_whole(spec: SourceSpec) -> NDArray[Any]:
    import imagecodecs

    with _open_file(spec.path) as fh:
        data = fh.read()
    if spec.path.lower().endswith(PNG_SUFFIXES):
        # imagecodecs keeps 16-bit RGB (Pillow and imageio drop it to 8 bits) and
        # expands palettes, low bit depths and tRNS as _png_header predicts.
        return np.asarray(imagecodecs.png_decode(data))
    _jpeg_check(data, spec.path)  # libjpeg pads a truncated file silently
    return np.asarray(imagecodecs.jpeg8_decode(data))


# -- Zarr and OME-Zarr -------------------------------------------------------------


def _load_json(path: str) -> dict[str, Any]:
    try:
        meta = json.loads(storage.read_bytes(storage.location(path)))
    except (OSError, ValueError) as err:
        raise InputReadError(f"{path}: unreadable Zarr metadata ({err}).") from err
    if not isinstance(meta, dict):
        raise InputReadError(f"{path}: Zarr metadata is not a JSON object.")
    return meta


def _zarr_node_meta(path: str) -> tuple[str, dict[str, Any]]:
    """("array" | "group", metadata) read straight from the JSON, before zarr sees it."""
    if _is_file(storage.join(path, "zarr.json")):
        meta = _load_json(storage.join(path, "zarr.json"))
        return str(meta.get("node_type", "")), meta
    if _is_file(storage.join(path, ".zarray")):
        meta = _load_json(storage.join(path, ".zarray"))
        attrs = storage.join(path, ".zattrs")
        return "array", {**meta, "attributes": _load_json(attrs) if _is_file(attrs) else {}}
    if _is_file(storage.join(path, ".zgroup")):
        attrs = storage.join(path, ".zattrs")
        return "group", {"attributes": _load_json(attrs) if _is_file(attrs) else {}}
    raise InputReadError(f"{path}: not a Zarr store (no zarr.json, .zarray or .zgroup).")


_ZARR3_NUMERIC = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
}  # fmt: skip


def _refuse_unsafe(path: str, meta: dict[str, Any]) -> None:
    """Refuse arrays whose decoding would unpickle data, or whose dtype is not numeric,
    before zarr parses the metadata or reads any chunk."""
    codecs = json.dumps(
        [meta.get(k) for k in ("codecs", "filters", "compressor")], default=str
    ).lower()
    if "pickle" in codecs:
        raise UnsupportedImageError(
            f"{path}: uses a pickle codec, which can run arbitrary code; refused."
        )
    dtype = meta.get("dtype", meta.get("data_type"))
    if isinstance(dtype, str) and dtype.lstrip("|<>=") == "O":
        raise UnsupportedImageError(f"{path}: object dtype is not an image; refused.")
    if "data_type" in meta:
        numeric = isinstance(dtype, str) and dtype in _ZARR3_NUMERIC
    else:
        try:
            numeric = np.dtype(dtype).kind in "buifc"
        except (TypeError, ValueError):
            numeric = False
    if not numeric:  # before zarr parses it: some non-numeric types warn or fail there
        raise UnsupportedImageError(
            f"{path}: unsupported dtype {dtype!r}; expected unsigned/signed integers or floats."
        )


def _ngff_axis(axis: object) -> str:
    if not isinstance(axis, dict):
        return str(axis)[:1].upper()
    kind, name = axis.get("type"), str(axis.get("name", ""))
    if kind == "channel":
        return "C"
    if kind == "time":
        return "T"
    return name[:1].upper() or "?"


def _ngff_image(path: str, attrs: dict[str, Any], level: int = 0) -> tuple[str, str] | None:
    """(array path of ``level``, axes) of an NGFF 0.4/0.5 image group, or None."""
    ome = attrs.get("ome", attrs)
    if not isinstance(ome, dict):
        return None
    multiscales = ome.get("multiscales")
    if not multiscales:
        return None
    try:
        ms = multiscales[0]
        datasets = ms["datasets"]  # from finest to coarsest
        if 0 < len(datasets) <= level:
            raise _no_level(path, level, len(datasets))
        array_path = str(datasets[level]["path"])
        axes = "".join(_ngff_axis(a) for a in ms.get("axes", []))
    except (KeyError, IndexError, TypeError) as err:
        raise InputReadError(f"{path}: malformed OME-Zarr multiscales metadata ({err}).") from err
    return array_path.strip("/"), axes


def _guess_axes(path: str, shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and not shape[-1] <= 4 < min(shape[:2]):
        return "ZYX"
    raise UnsupportedImageError(
        f"{path}: cannot tell the axes of shape {shape}; set `axes` (e.g. ZYX, CYX, YXC)."
    )


def _zarr_spec(
    path: str, name: str, channel: Channel, axes: str | None, level: int = 0
) -> SourceSpec:
    import zarr

    if not _is_dir(path):
        raise InputReadError(f"{path}: a Zarr store must be a directory.")
    kind, meta = _zarr_node_meta(path)
    array_path, meta_axes = "", None
    multiscales: dict[str, Any] = {}
    if kind == "group":
        attrs = meta.get("attributes") or {}
        image = _ngff_image(path, attrs, level)
        ome = attrs.get("ome")
        layout = (ome if isinstance(ome, dict) else attrs).get("bioformats2raw.layout")
        if image is None and layout is not None and _is_dir(storage.join(path, "0")):
            # bioformats2raw: the first image is the group "0"
            attrs = _zarr_node_meta(storage.join(path, "0"))[1].get("attributes") or {}
            image = _ngff_image(path, attrs, level)
            image = image and ("0/" + image[0], image[1])
        if image is not None:
            multiscales = attrs.get("ome", attrs)["multiscales"][0]
        if image is None:
            raise InputReadError(
                f"{path}: Zarr group without OME-Zarr multiscales metadata; give the path of "
                "the array inside it."
            )
        array_path, meta_axes = image
        if os.path.isabs(array_path) or ".." in Path(array_path).parts:
            raise InputReadError(f"{path}: OME-Zarr dataset path {array_path!r} leaves the store.")
        kind, meta = _zarr_node_meta(storage.join(path, array_path))
    if kind != "array":
        raise InputReadError(f"{path}: expected a Zarr array at {array_path or 'the root'!r}.")
    _refuse_unsafe(path, meta)
    try:
        node = zarr.open_array(path, path=array_path, mode="r")
        shape = tuple(int(n) for n in node.shape)
        dtype = np.dtype(node.dtype)
        chunk_shape = tuple(int(n) for n in node.chunks)
        names = getattr(node.metadata, "dimension_names", None)
    except SegpipeError:
        raise
    except Exception as err:
        raise InputReadError(
            f"{path}: not a readable Zarr array ({type(err).__name__}: {err})."
        ) from err
    if not axes and not meta_axes and names and all(names):
        meta_axes = "".join(_ngff_axis({"name": n}) for n in names)
    if dtype.kind not in "uif":  # before the axes: a string array's shape means nothing
        return _check_array(SourceSpec(path, name, "zarr", "", shape, str(dtype), channel))
    norm = _normalise_axes(axes or meta_axes or _guess_axes(path, shape), shape, path)
    chunk_bytes = int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize
    spec = SourceSpec(
        path,
        name,
        "zarr",
        norm,
        shape,
        _native(dtype),
        channel,
        storage.join(path, array_path)
        if storage.is_url(path)
        else os.path.normpath(os.path.join(path, array_path)),
        chunks=_spatial(norm, chunk_shape),
        pixel=physical.from_ngff(multiscales, _spatial_axes(norm), level) if multiscales else None,
    )
    return _check_array(spec, chunk_bytes)


# -- public --------------------------------------------------------------------------


def parse_series(series: object) -> int | None:
    """Validate a series choice: ``None`` (the file's only series) or an index >= 0."""
    if series is None:
        return None
    if isinstance(series, int | np.integer) and not isinstance(series, bool) and series >= 0:
        return int(series)
    raise ConfigError(f"series: Expected a series index >= 0, got {series!r} instead.")


def open_source(
    path: str | Path,
    *,
    name: str | None = None,
    channel: Channel = None,
    axes: str | None = None,
    series: int | None = None,
    level: int = 0,
) -> SourceSpec:
    """Inspect an input image without reading its pixels.

    Parameters
    ----------
    path : str or Path
        A TIFF/OME-TIFF, PNG/JPEG, or Zarr/OME-Zarr path.
    name : str, optional
        Output name; defaults to the file name without its suffix.
    channel : int or {"mean", "max", "sum"}, optional
        Channel to segment, or how to reduce the channels; required when there are several.
    axes : str, optional
        Axes of the stored array (e.g. ``"CYX"``, ``"ZYX"``) for a TIFF or Zarr array
        whose metadata does not say; overrides the metadata when given.
    series : int, optional
        Image series of a TIFF that holds several (required there); other inputs hold
        one image, series 0.
    level : int
        Resolution level of an OME-Zarr image (its multiscales ``datasets``), 0 the
        finest; other inputs have level 0 only.

    Returns
    -------
    SourceSpec
        Picklable; pass it to `read_region` on a worker.

    Raises
    ------
    InputNotFoundError, InputReadError, UnsupportedImageError, ConfigError
        With the file named and the problem said.

    Examples
    --------
    >>> spec = open_source("cells.ome.tif", channel=1)  # doctest: +SKIP
    >>> read_region(spec, (slice(0, 512), slice(0, 512))).shape  # doctest: +SKIP
    (512, 512)
    """
    channel = parse_channel(channel)
    series = parse_series(series)
    p = storage.local_text(os.fspath(path))
    p = p.rstrip("/") if storage.is_url(p) else p
    try:
        size = _size(p)
    except FileNotFoundError as err:
        raise InputNotFoundError(f"{p}: no such file or directory.") from err
    except PermissionError as err:
        raise InputReadError(f"{p}: permission denied on a parent directory.") from err
    except OSError as err:
        raise InputReadError(f"{p}: cannot access ({err.strerror or err}).") from err
    name = name or image_name(p)
    lower = p.lower().rstrip("/")
    if lower.endswith(ZARR_SUFFIXES) or _is_dir(p):
        return _only_series(_zarr_spec(p, name, channel, axes, level), series)
    if level and not lower.endswith(TIFF_SUFFIXES):
        raise ConfigError(
            f"{p}: level {level} asked; a PNG or JPEG has level 0 only (levels are read "
            "from OME-Zarr images and pyramidal TIFFs)."
        )
    if not lower.endswith(TIFF_SUFFIXES + PIL_SUFFIXES):
        raise UnsupportedImageError(
            f"{p}: unknown image type; expected one of {', '.join(SUFFIXES)}."
        )
    head = _read_head(p)
    if size == 0 or not head:
        raise InputReadError(f"{p}: file is empty (0 bytes).")
    expected = (
        "tiff" if lower.endswith(TIFF_SUFFIXES) else "png" if lower.endswith(".png") else "jpeg"
    )
    found = _sniff(head)
    if found != expected:
        what = f"a {found.upper()} file" if found else f"not an image (starts {head[:8]!r})"
        raise InputReadError(f"{p}: named like a {expected.upper()} but the file is {what}.")
    if expected == "tiff":
        return _tiff_spec(p, name, channel, axes, series, level)
    spec = _only_series(_pil_spec(p, name, channel, expected), series)
    if axes is not None and _normalise_axes(axes, spec.stored_shape, p) != spec.axes:
        raise UnsupportedImageError(
            f"{p}: axes {axes!r} do not fit a {expected.upper()}, whose layout is fixed "
            f"({spec.axes}, shape {spec.stored_shape})."
        )
    return spec


def _only_series(spec: SourceSpec, series: int | None) -> SourceSpec:
    if series:
        kind = "Zarr array" if spec.format == "zarr" else "PNG/JPEG"
        raise UnsupportedImageError(
            f"{spec.path}: series {series} requested, a {kind} holds one image (series 0); "
            "drop --series, or give it only for multi-series TIFFs."
        )
    return spec


@functools.lru_cache(maxsize=8)
def _open_tiff(spec: SourceSpec, stamp: tuple[int, int, int]) -> Any:
    """The stored array, opened once per worker process and file version (``stamp``)."""
    if spec.data_offset is not None:
        dtype = np.dtype(spec.dtype).newbyteorder(spec.byteorder)
        return np.memmap(
            spec.path, dtype=dtype, mode="r", offset=spec.data_offset, shape=spec.stored_shape
        )
    import tifffile
    import zarr

    source: Any = _open_file(spec.path) if storage.is_url(spec.path) else spec.path
    store = tifffile.imread(source, aszarr=True, series=spec.series, level=spec.level)
    try:
        array = zarr.open_array(store, mode="r")
    except BaseException:
        store.close()
        raise
    # Close the file once the cache has dropped the array and no reader holds it.
    weakref.finalize(array, store.close)
    if not isinstance(source, str):
        weakref.finalize(array, source.close)
    return array


@functools.lru_cache(maxsize=8)
def _tiff_plane(spec: SourceSpec, stamp: tuple[int, int, int]) -> tiff_tiles.Plane | None:
    """A plain tiled or stripped plane, opened once per worker process and file version."""
    return tiff_tiles.open_plane(spec.path, spec.series, np.dtype(spec.dtype))


def _stored(spec: SourceSpec, index: tuple[Any, ...]) -> NDArray[Any]:
    if spec.format == "tiff":
        stamp = storage.identity(storage.location(spec.path))
        if spec.axes == "YX" and spec.data_offset is None and spec.level == 0:
            plane = _tiff_plane(spec, stamp)
            if plane is not None:
                return tiff_tiles.read(plane, index[0], index[1])
        # np.array copies: a view would pin the memory map and see later writes
        return np.array(_open_tiff(spec, stamp)[index])
    if spec.format == "zarr":
        import zarr

        return np.asarray(zarr.open_array(spec.array_path or spec.path, mode="r")[index])
    data = _decode_whole(spec)
    if data.shape != spec.stored_shape:
        raise InputReadError(
            f"{spec.path}: decoded shape {data.shape} differs from the header's "
            f"{spec.stored_shape}."
        )
    return cast(NDArray[Any], data[index])


def _parse_region(spec: SourceSpec, region: Sequence[slice]) -> list[slice]:
    shape = spec.shape
    if len(region) != len(shape):
        raise ValueError(
            f"region: Expected {len(shape)} slices for image shape {shape}, "
            f"got {tuple(region)!r} instead."
        )
    out = []
    for s, n in zip(region, shape, strict=True):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError(f"region: Expected slices with step 1, got {s!r} instead.")
        start, stop = s.start or 0, n if s.stop is None else s.stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"region: Expected a slice within 0:{n}, got {s!r} instead.")
        out.append(slice(start, stop))
    return out


def read_region(spec: SourceSpec, region: Sequence[slice]) -> NDArray[Any]:
    """Read the spatial ``region`` of an image, channel selected or reduced.

    Parameters
    ----------
    spec : SourceSpec
        From `open_source`.
    region : sequence of slice
        One slice (step 1, within bounds) per spatial axis of ``spec.shape``.

    Returns
    -------
    (M, N) or (P, M, N) ndarray
        Of ``spec.out_dtype``, native byte order.

    Raises
    ------
    InputReadError
        If the file cannot be read or decoded (names the file).
    """
    slices = _parse_region(spec, region)
    index: list[Any] = []
    for a in spec.axes:
        if a == "C":
            index.append(spec.channel if isinstance(spec.channel, int) else slice(None))
        elif a == "1":
            index.append(0)
        else:
            index.append(slices.pop(0))
    try:
        data = _stored(spec, tuple(index))
    except SegpipeError:
        raise
    except MemoryError:
        raise
    except Exception as err:
        _open_tiff.cache_clear()
        _tiff_plane.cache_clear()
        raise InputReadError(
            f"{spec.path}: failed to read pixels ({type(err).__name__}: {err})."
        ) from err
    if "C" in spec.axes and not isinstance(spec.channel, int):
        caxis = [a for a in spec.axes if a != "1"].index("C")
        if spec.channel == "max":
            data = data.max(axis=caxis)
        elif spec.channel == "mean":
            data = data.mean(axis=caxis, dtype=np.float64).astype(np.float32)
        else:
            data = data.sum(axis=caxis, dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(data, dtype=spec.out_dtype)

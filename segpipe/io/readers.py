"""Lazy readers for TIFF/OME-TIFF, PNG/JPEG and Zarr/OME-Zarr images.

`open_source` inspects a file on the client (cheap: headers only) and returns
a picklable `SourceSpec`; workers call `read_region` with it and open the
file themselves, because tifffile's Zarr store cannot travel to a worker.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from segpipe.errors import InputNotFoundError, InputReadError, UnsupportedImageError

Channel = int | Literal["mean", "max", "sum"] | None
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
ZARR_SUFFIXES = (".zarr", ".ome.zarr")
SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES + ZARR_SUFFIXES

# A decompression bomb declares far more pixels than any real image here.
MAX_PIXELS = 2**40


@dataclass(frozen=True)
class SourceSpec:
    """Where an image is and how to turn its stored array into (Z, )Y, X.

    ``axes`` names the stored array's axes: ``Z`` (planes), ``C`` (channels),
    ``Y``, ``X``. ``shape`` is the spatial shape segpipe works on.
    """

    path: str
    name: str
    format: Literal["tiff", "pil", "zarr"]
    axes: str
    stored_shape: tuple[int, ...]
    dtype: str
    channel: Channel
    array_path: str = ""  # inside a Zarr/OME-Zarr group
    series: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(n for a, n in zip(self.axes, self.stored_shape, strict=True) if a not in "C1")

    @property
    def out_dtype(self) -> np.dtype[Any]:
        if "C" in self.axes and self.channel in ("mean", "sum"):
            return np.dtype(np.float32)
        return np.dtype(self.dtype)

    @property
    def whole_file(self) -> bool:
        """True for formats that must be decoded whole (PNG/JPEG)."""
        return self.format == "pil"


def image_name(path: str | Path) -> str:
    """The output name of an input: its file name without image suffixes."""
    name = Path(str(path).rstrip("/")).name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _normalise_axes(axes: str, shape: Sequence[int], path: str) -> tuple[str, tuple[int, ...]]:
    """Map tifffile/NGFF axes to Z, C, Y, X; singleton T and other axes are allowed."""
    out = []
    for a, n in zip(axes.upper(), shape, strict=True):
        if a in "YX":
            out.append(a)
        elif a in "CS":
            out.append("C")
        elif a in "ZQI":
            out.append("Z")
        elif n == 1:
            out.append("1")
        else:
            raise UnsupportedImageError(
                f"{path}: axis {a!r} of length {n} is not supported; expected (Z,) (C,) Y, X."
            )
    norm = "".join(out)
    if norm.count("Z") > 1 or norm.count("C") > 1 or not norm.endswith(("YX", "YXC")):
        raise UnsupportedImageError(f"{path}: cannot interpret axes {axes!r} of shape {tuple(shape)}.")
    return norm, tuple(shape)


def _check_array(spec: SourceSpec) -> SourceSpec:
    dtype = np.dtype(spec.dtype)
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise UnsupportedImageError(
            f"{spec.path}: unsupported dtype {dtype}; expected unsigned/signed integers or floats."
        )
    if any(n == 0 for n in spec.stored_shape):
        raise UnsupportedImageError(f"{spec.path}: image has a zero-length axis, shape {spec.stored_shape}.")
    if int(np.prod(spec.stored_shape, dtype=np.float64)) > MAX_PIXELS:
        raise UnsupportedImageError(
            f"{spec.path}: declares {spec.stored_shape} pixels, beyond the {MAX_PIXELS:.2e} limit."
        )
    channels = [n for a, n in zip(spec.axes, spec.stored_shape, strict=True) if a == "C"]
    if channels and channels[0] > 1 and spec.channel is None:
        raise UnsupportedImageError(
            f"{spec.path}: image has {channels[0]} channels; choose one with `channel: N` "
            "or a reduction (`channel: mean|max|sum`)."
        )
    if channels and isinstance(spec.channel, int) and not 0 <= spec.channel < channels[0]:
        raise UnsupportedImageError(
            f"{spec.path}: channel {spec.channel} requested, the image has {channels[0]}."
        )
    if len(spec.shape) not in (2, 3):
        raise UnsupportedImageError(f"{spec.path}: expected a 2D or 3D image, got axes {spec.axes!r}.")
    return spec


def _tiff_spec(path: str, name: str, channel: Channel) -> SourceSpec:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputReadError(f"{path}: TIFF holds no image series.")
            series = tif.series[0]
            size = os.path.getsize(path)
            # Truncated files open fine and fail on read: check every segment's extent now.
            for page in series.pages:
                if page is None:
                    continue
                offsets, counts = page.dataoffsets, page.databytecounts  # type: ignore[union-attr]
                if offsets and max(o + c for o, c in zip(offsets, counts, strict=True)) > size:
                    raise InputReadError(
                        f"{path}: TIFF is truncated: image data extends past the end of the file "
                        f"({size} bytes)."
                    )
            axes, shape = _normalise_axes(series.axes, series.shape, path)
            dtype = str(series.dtype)
    except InputReadError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as err:
        raise InputReadError(f"{path}: not a readable TIFF ({err}).") from err
    return SourceSpec(path, name, "tiff", axes, shape, dtype, channel)


def _pil_spec(path: str, name: str, channel: Channel) -> SourceSpec:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # checks structure and CRCs without decoding
        with Image.open(path) as im:
            w, h, mode = im.width, im.height, im.mode
    except Exception as err:  # PIL raises many types for broken files
        raise InputReadError(f"{path}: not a readable PNG/JPEG ({type(err).__name__}: {err}).") from err
    bands = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "I;16": 1, "I": 1, "F": 1}
    if mode not in bands:
        raise UnsupportedImageError(f"{path}: unsupported PNG/JPEG mode {mode!r}.")
    dtype = {"I;16": "uint16", "I": "int32", "F": "float32"}.get(mode, "uint8")
    if bands[mode] == 1:
        return SourceSpec(path, name, "pil", "YX", (h, w), dtype, channel)
    return SourceSpec(path, name, "pil", "YXC", (h, w, bands[mode]), dtype, channel)


def _zarr_spec(path: str, name: str, channel: Channel, axes: str | None) -> SourceSpec:
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as err:
        raise InputReadError(f"{path}: not a readable Zarr store ({err}).") from err
    array_path, meta_axes = "", None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        ome = attrs.get("ome", attrs)
        multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
        if not multiscales:
            raise InputReadError(f"{path}: Zarr group without OME multiscales metadata.")
        ms = multiscales[0]
        array_path = ms["datasets"][0]["path"]
        meta_axes = "".join(
            (a["name"] if isinstance(a, dict) else str(a))[0].upper() for a in ms.get("axes", [])
        )
        node = node[array_path]
    assert isinstance(node, zarr.Array)
    if node.dtype == object or str(node.dtype).startswith(("|O", "object")):
        raise UnsupportedImageError(f"{path}: object dtype arrays are refused (they need pickle).")
    codecs = json.dumps(node.metadata.to_dict(), default=str).lower()
    if "pickle" in codecs:
        raise UnsupportedImageError(f"{path}: uses a pickle codec, refused for safety.")
    shape = tuple(int(n) for n in node.shape)
    guess = axes or meta_axes or ("YX" if len(shape) == 2 else "ZYX" if len(shape) == 3 else "")
    if len(guess) != len(shape):
        raise UnsupportedImageError(
            f"{path}: cannot tell the axes of shape {shape}; set `axes` (e.g. ZYX, CYX, YXC)."
        )
    norm, shape = _normalise_axes(guess, shape, path)
    return SourceSpec(path, name, "zarr", norm, shape, str(node.dtype), channel, array_path)


def open_source(
    path: str | Path, *, name: str | None = None, channel: Channel = None, axes: str | None = None
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
        Axes of a plain Zarr array (e.g. ``"CYX"``); read from metadata otherwise.

    Raises
    ------
    InputNotFoundError, InputReadError, UnsupportedImageError
        With the file named and the problem said.
    """
    p = os.path.abspath(os.fspath(path))
    if not os.path.exists(p):
        raise InputNotFoundError(f"{p}: no such file or directory.")
    name = name or image_name(p)
    lower = p.lower().rstrip("/")
    if os.path.isdir(p) or lower.endswith(ZARR_SUFFIXES):
        spec = _zarr_spec(p, name, channel, axes)
    else:
        if not os.access(p, os.R_OK):
            raise InputReadError(f"{p}: permission denied.")
        if os.path.getsize(p) == 0:
            raise InputReadError(f"{p}: file is empty (0 bytes).")
        if lower.endswith(TIFF_SUFFIXES):
            spec = _tiff_spec(p, name, channel)
        elif lower.endswith(PIL_SUFFIXES):
            spec = _pil_spec(p, name, channel)
        else:
            raise UnsupportedImageError(
                f"{p}: unknown image type; expected one of {', '.join(SUFFIXES)}."
            )
    return _check_array(spec)


@functools.lru_cache(maxsize=8)
def _open_array(spec: SourceSpec) -> Any:
    """The stored array, opened once per worker process (tifffile stores are not picklable)."""
    import zarr

    if spec.format == "tiff":
        import tifffile

        store = tifffile.imread(spec.path, aszarr=True, series=spec.series, level=0)
        return zarr.open(store, mode="r")
    if spec.format == "zarr":
        node = zarr.open(spec.path, mode="r")
        return node[spec.array_path] if spec.array_path else node
    import imageio.v3 as iio

    return np.asarray(iio.imread(spec.path))


def read_region(spec: SourceSpec, region: Sequence[slice]) -> NDArray[Any]:
    """Read the spatial ``region`` of an image, channel selected or reduced.

    Raises
    ------
    InputReadError
        If the file cannot be decoded (names the file).
    """
    region = list(region)
    index: list[Any] = []
    for a in spec.axes:
        if a == "C":
            index.append(spec.channel if isinstance(spec.channel, int) else slice(None))
        elif a == "1":
            index.append(0)
        else:
            index.append(region.pop(0))
    try:
        data = np.asarray(_open_array(spec)[tuple(index)])
    except Exception as err:
        _open_array.cache_clear()
        raise InputReadError(f"{spec.path}: failed to read pixels ({type(err).__name__}: {err}).") from err
    if "C" in spec.axes and not isinstance(spec.channel, int):
        caxis = [a for a in spec.axes if a != "1"].index("C")
        if spec.channel == "mean":
            data = data.mean(axis=caxis, dtype=np.float64).astype(np.float32)
        elif spec.channel == "max":
            data = data.max(axis=caxis)
        else:
            data = data.sum(axis=caxis, dtype=np.float64).astype(np.float32)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("="))
    return data

"""Physical pixel sizes of an input: from its OME-XML, ImageJ or TIFF resolution tags,
or NGFF scales, or given in the run's settings; and the scale of each output level.

A size the input does not state is not invented: the output then keeps scale 1
without a unit, and the tables have no physical columns.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from segpipe.errors import ConfigError

__all__ = ["PixelSize", "from_ngff", "from_tiff", "given", "level_transforms", "ngff_unit"]

_UNITS = {
    "µm": "micrometer",
    "μm": "micrometer",  # Greek mu, as some writers spell it
    "um": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometer": "micrometer",
    "nm": "nanometer",
    "nanometer": "nanometer",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "cm": "centimeter",
    "centimeter": "centimeter",
    "m": "meter",
    "meter": "meter",
    "pm": "picometer",
    "picometer": "picometer",
    "å": "angstrom",
    "angstrom": "angstrom",
    "in": "inch",
    "inch": "inch",
}


def ngff_unit(unit: str) -> str | None:
    """The NGFF (UDUNITS-2) name of a length unit as files spell it, or None."""
    text = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    return _UNITS.get(text) or _UNITS.get(text.lower())


@dataclass(frozen=True)
class PixelSize:
    """A pixel's size along each spatial axis ((Z,) Y, X) in ``unit``, where it was
    read (``origin``: OME-XML, ImageJ, TIFF tags, NGFF, settings), and the image's
    ``offset``."""

    sizes: tuple[float, ...]
    unit: str
    origin: str
    offset: tuple[float, ...] | None = None
    """Where pixel 0's centre lies (an NGFF ``translation``), None where not stated."""

    def area(self) -> float:
        """The physical area (2D) or volume (3D) of one pixel."""
        return math.prod(self.sizes)


_METERS = {
    "picometer": 1e-12,
    "angstrom": 1e-10,
    "nanometer": 1e-9,
    "micrometer": 1e-6,
    "millimeter": 1e-3,
    "centimeter": 1e-2,
    "inch": 0.0254,
    "meter": 1.0,
}


def _one_unit(
    sizes: Sequence[float | None], units: Sequence[str | None]
) -> tuple[list[float | None], str | None]:
    """Sizes in one unit: their own when they share it, else micrometres; no unit when
    one of them has none that is known."""
    if None in units:
        return list(sizes), None
    if len(set(units)) == 1:
        return list(sizes), units[0]
    to_um = [_METERS[str(u)] / 1e-6 for u in units]
    return [None if s is None else s * f for s, f in zip(sizes, to_um, strict=True)], "micrometer"


def _valid(sizes: Sequence[float | None], unit: str | None, origin: str) -> PixelSize | None:
    if unit is None or any(s is None or not math.isfinite(s) or s <= 0 for s in sizes):
        return None
    return PixelSize(tuple(float(s) for s in sizes if s is not None), unit, origin)


def _ome(xml: str, series: int, axes: str) -> PixelSize | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if series >= len(pixels):
        return None
    attrs = pixels[series].attrib
    sizes: list[float | None] = []
    units: list[str | None] = []
    for axis in axes:
        value = attrs.get(f"PhysicalSize{axis}")
        sizes.append(float(value) if value is not None else None)
        units.append(ngff_unit(attrs.get(f"PhysicalSize{axis}Unit", "µm")))
    return _valid(*_one_unit(sizes, units), "OME-XML")


def from_tiff(tif: Any, series: int, axes: str) -> PixelSize | None:
    """The pixel size a TIFF states for ``axes`` (its spatial axes, e.g. ``ZYX``)."""
    if tif.is_ome and tif.ome_metadata:
        found = _ome(tif.ome_metadata, series, axes)
        if found is not None:
            return found
    page = tif.series[series].pages[0] if tif.series[series].pages else tif.pages[0]
    try:
        xres, yres = (float(r) for r in page.resolution)
    except (TypeError, ValueError, AttributeError):
        return None
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        unit = ngff_unit(str(meta.get("unit", "")))
        z = float(meta.get("spacing", 1.0))
        plane = [1 / yres if yres else None, 1 / xres if xres else None]
        return _valid(([z] if axes.startswith("Z") else []) + plane, unit, "ImageJ")
    per_micrometer = {2: 1 / 25400, 3: 1 / 10000}.get(int(page.resolutionunit))
    if per_micrometer is None or not xres or not yres:
        return None  # no unit (the TIFF default): the size is not stated
    plane = [1 / (yres * per_micrometer), 1 / (xres * per_micrometer)]
    return _valid(([None] if axes.startswith("Z") else []) + plane, "micrometer", "TIFF tags")


def from_ngff(multiscales: dict[str, Any], axes: str, level: int = 0) -> PixelSize | None:
    """The pixel size at ``level`` of NGFF ``multiscales[0]`` for its spatial ``axes``."""
    try:
        meta_axes = multiscales.get("axes", [])
        scale, shift = [1.0] * len(meta_axes), [0.0] * len(meta_axes)
        shifted = False
        # the dataset's transformations, then the multiscales' own (applied after)
        transforms = list(multiscales["datasets"][level].get("coordinateTransformations", []))
        transforms += list(multiscales.get("coordinateTransformations", []))
        for t in transforms:
            if t.get("type") == "scale":
                factors = [float(b) for b in t["scale"]]
                scale = [a * f for a, f in zip(scale, factors, strict=True)]
                shift = [a * f for a, f in zip(shift, factors, strict=True)]
            elif t.get("type") == "translation":
                shift = [a + float(b) for a, b in zip(shift, t["translation"], strict=True)]
                shifted = True
        spatial = {
            str(a.get("name", "")).upper()[:1]: (s, o, a.get("unit"))
            for a, s, o in zip(meta_axes, scale, shift, strict=True)
            if isinstance(a, dict) and a.get("type") == "space"
        }
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    if any(a not in spatial for a in axes):
        return None
    units = [ngff_unit(str(spatial[a][2] or "")) for a in axes]
    found = _valid(*_one_unit([spatial[a][0] for a in axes], units), "NGFF")
    if found is not None and shifted:
        found = replace(found, offset=tuple(spatial[a][1] for a in axes))
    return found


def given(value: float | Sequence[float], unit: str, ndim: int, where: str) -> PixelSize:
    """The pixel size set in a run's settings: one value for every axis, or one per
    spatial axis."""
    sizes = [float(value)] * ndim if isinstance(value, int | float) else [float(v) for v in value]
    name = ngff_unit(unit)
    if name is None:
        raise ConfigError(f"{where}: pixel_unit {unit!r} is not a length unit (e.g. micrometer).")
    if len(sizes) != ndim or any(not math.isfinite(s) or s <= 0 for s in sizes):
        raise ConfigError(
            f"{where}: pixel_size {value!r} needs one positive size, or one per axis ({ndim})."
        )
    return PixelSize(tuple(sizes), name, "settings")


def level_transforms(pixel: PixelSize | None, factor: Sequence[int]) -> list[dict[str, Any]]:
    """The NGFF ``coordinateTransformations`` of an output level with ``factor`` level 0
    pixels per pixel along each axis, and the input's translation at every level (the
    level's pixel j is level 0's pixel j·factor, strided, so their centres coincide)."""
    base = list(pixel.sizes) if pixel is not None else [1.0] * len(factor)
    scale = [s * f for s, f in zip(base, factor, strict=True)]
    out: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if pixel is not None and pixel.offset is not None:
        out.append({"type": "translation", "translation": list(pixel.offset)})
    return out

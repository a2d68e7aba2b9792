"""NGFF high-content screening plates: read one as a collection, write one back.

A plate group lists its wells (``plate.wells[].path``, e.g. ``A/1``); each well group
lists its fields (``well.images[].path``, e.g. ``0``), and each field is an image
group. segpipe names a field by its path in the plate (``A/1/0``), so the output
store holds the fields at the same paths, under the same plate and well metadata.
NGFF 0.4 (Zarr v2, ``.zattrs``) and 0.5 (Zarr v3, ``zarr.json`` ``ome``) plates read
alike; segpipe writes 0.5.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segpipe.errors import InputNotFoundError, InputReadError
from segpipe.io import attrs, storage
from segpipe.io.storage import Location

__all__ = ["DEPTH", "field_name", "fields", "is_plate", "plate_of", "plate_root", "write_plate"]

DEPTH = 3
"""Path parts of a field's name in its plate: row, column, field."""


def _attributes(path: str | Location) -> dict[str, Any] | None:
    """The group attributes at ``path`` (v3 ``zarr.json`` or v2 ``.zattrs``), or None
    where there is no group metadata."""
    path = storage.location(path)
    try:
        if (path / "zarr.json").is_file():
            meta = json.loads(storage.read_bytes(path / "zarr.json"))
            value = meta.get("attributes") if isinstance(meta, dict) else None
        elif (path / ".zgroup").is_file():
            attrs = path / ".zattrs"
            value = json.loads(storage.read_bytes(attrs)) if attrs.is_file() else {}
        else:
            return None
    except (OSError, ValueError) as err:
        raise InputReadError(f"{path}: unreadable Zarr metadata ({err}).") from err
    return value if isinstance(value, dict) else {}


def _ome(attrs: dict[str, Any], key: str) -> Any:
    """``key`` of NGFF metadata: under ``ome`` (0.5) or at the top (0.4)."""
    ome = attrs.get("ome")
    return ome.get(key) if isinstance(ome, dict) and key in ome else attrs.get(key)


def plate_of(path: str | Location) -> dict[str, Any] | None:
    """The ``plate`` metadata of the group at ``path``, or None if it is not a plate."""
    attrs = _attributes(path)
    value = None if attrs is None else _ome(attrs, "plate")
    return value if isinstance(value, dict) else None


def is_plate(path: str | Location) -> bool:
    """Whether ``path`` is an NGFF plate group."""
    try:
        return plate_of(path) is not None
    except InputReadError:
        return False


def _entries(where: Location, value: Any, key: str) -> list[str]:
    """The ``path`` of each entry of a plate's ``wells`` or a well's ``images``."""
    if not isinstance(value, list) or not value:
        raise InputReadError(f"{where}: NGFF {key} metadata lists no entries.")
    paths = []
    for entry in value:
        part = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(part, str) or not part.strip("/"):
            raise InputReadError(f"{where}: NGFF {key} entry without a path: {entry!r}.")
        part = part.strip("/")
        if os.path.isabs(part) or ".." in Path(part).parts or part.startswith((".", "_")):
            raise InputReadError(f"{where}: NGFF {key} path {part!r} leaves the plate.")
        paths.append(part)
    return paths


def fields(path: str | Location) -> list[str]:
    """The image groups of the plate at ``path``: every field of every well, in the
    plate's order of wells and the wells' order of fields.

    Raises
    ------
    InputNotFoundError
        If a listed well or field is not there.
    InputReadError
        If the plate or a well has malformed metadata.
    """
    root = storage.location(path)
    plate = plate_of(root) or {}
    out = []
    for well_path in _entries(root, plate.get("wells"), "plate wells"):
        well = root / well_path
        if len(Path(well_path).parts) != DEPTH - 1:
            raise InputReadError(f"{root}: plate well path {well_path!r} is not ROW/COLUMN.")
        attrs = _attributes(well)
        if attrs is None:
            raise InputNotFoundError(f"{well}: well listed by plate {root} is not there.")
        for field in _entries(well, (_ome(attrs, "well") or {}).get("images"), "well images"):
            if not (well / field).is_dir():
                raise InputNotFoundError(
                    f"{well / field}: field listed by well {well} is not there."
                )
            out.append(str(well / field))
    return out


@functools.lru_cache(maxsize=256)
def _plate_above(field: str) -> str | None:
    head, sep, rest = field.rpartition("://")
    parts = rest.split("/")
    if len(parts) <= DEPTH or not parts[-DEPTH - 1]:
        return None
    root = head + sep + "/".join(parts[:-DEPTH])
    return root if is_plate(root) else None


def _absolute(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return (text if storage.is_url(text) else os.path.abspath(text)).rstrip("/")


def plate_root(path: str | os.PathLike[str]) -> str | None:
    """The plate whose field ``path`` is, or None."""
    return _plate_above(_absolute(path))


def field_name(path: str | os.PathLike[str]) -> str | None:
    """``ROW/COLUMN/FIELD`` for a field of a plate (its path in the plate), else None."""
    root = plate_root(path)
    return None if root is None else _absolute(path)[len(root) + 1 :]


def _layout(
    names: Sequence[str], source: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The plate metadata for fields ``names`` and each well's fields: rows, columns
    and acquisitions as in the input's plate ``source`` where there is one."""
    wells: dict[str, list[str]] = {}
    for name in names:
        row, column, field = name.split("/")
        wells.setdefault(f"{row}/{column}", []).append(field)
    src = source or {}
    rows = [r["name"] for r in src.get("rows", []) if isinstance(r, dict) and "name" in r]
    columns = [c["name"] for c in src.get("columns", []) if isinstance(c, dict) and "name" in c]
    for well in wells:
        row, column = well.split("/")
        rows += [row] if row not in rows else []
        columns += [column] if column not in columns else []
    plate: dict[str, Any] = {
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in columns],
        "wells": [
            {
                "path": w,
                "rowIndex": rows.index(w.split("/")[0]),
                "columnIndex": columns.index(w.split("/")[1]),
            }
            for w in wells
        ],
        "field_count": max(len(f) for f in wells.values()),
        "version": attrs.NGFF,  # as ome-zarr-py writes it; ome-zarr-models warns without
    }
    for key in ("name", "acquisitions"):
        if key in src:
            plate[key] = src[key]
    return plate, wells


def write_plate(root: str | Path, names: Sequence[str], source: str | Path | None) -> None:
    """Write plate metadata at the store ``root`` and well metadata in each well, for
    the fields ``names`` (``ROW/COLUMN/FIELD``) already written there (in row and
    well groups made with them).

    Parameters
    ----------
    root : str or path
        The output store.
    names : sequence of str
        The complete fields of the store.
    source : str or path, optional
        The input plate: its rows, columns, name and acquisitions are kept.
    """
    plate, wells = _layout(names, None if source is None else plate_of(source))
    attrs.update(root, {"ome": {"version": attrs.NGFF, "plate": plate}})
    source_wells: dict[str, dict[str, Any]] = {}
    if source is not None:
        for well in wells:
            found = _attributes(storage.join(str(source), well))
            images = (_ome(found, "well") or {}).get("images") if found else None
            if isinstance(images, list):
                source_wells[well] = {
                    str(i.get("path", "")).strip("/"): i for i in images if isinstance(i, dict)
                }
    for well, field_paths in wells.items():
        images = []
        for field in field_paths:
            entry = {"path": field}
            acquisition = source_wells.get(well, {}).get(field, {}).get("acquisition")
            if acquisition is not None and "acquisitions" in plate:
                entry["acquisition"] = acquisition
            images.append(entry)
        attrs.update(
            storage.join(str(root), well),
            {"ome": {"version": attrs.NGFF, "well": {"images": images}}},
        )

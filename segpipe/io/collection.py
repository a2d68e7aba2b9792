"""Resolve a collection (file, directory, glob or manifest) into image paths."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

from segpipe.errors import ConfigError, InputNotFoundError, InputReadError
from segpipe.io import plate, storage
from segpipe.io.readers import SUFFIXES, ZARR_SUFFIXES, image_name
from segpipe.io.storage import Location

MANIFEST_SUFFIXES = (".txt", ".csv")
# A CSV manifest may start with a header naming its path column.
PATH_COLUMNS = ("path", "file", "filename", "image", "input", "source")
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


def _is_image(path: str) -> bool:
    return path.lower().rstrip("/").endswith(SUFFIXES)


def _is_zarr_dir(path: Location) -> bool:
    return any((path / m).exists() for m in _ZARR_MARKERS)


def _rows(path: Location) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the manifest's non-blank, non-comment rows."""
    try:
        lines = (
            storage.read_bytes(path).decode("utf-8-sig").splitlines()
        )  # -sig: Excel writes a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise InputReadError(f"{path}: cannot read the manifest ({err}).") from err
    csv_file = path.suffix.lower() == ".csv"
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = next(csv.reader([line])) if csv_file else [line]
        rows.append((number, [c.strip() for c in cells]))
    return rows


def _from_manifest(path: Location, *, missing_ok: bool = False) -> list[str]:
    rows = _rows(path)
    column = 0
    if rows and path.suffix.lower() == ".csv":
        header = [c.lower() for c in rows[0][1]]
        named = [i for i, c in enumerate(header) if c in PATH_COLUMNS]
        if named:
            column, rows = named[0], rows[1:]
    entries: list[str] = []
    missing: list[str] = []
    for number, cells in rows:
        entry = cells[column] if column < len(cells) else ""
        if not entry:
            raise ConfigError(f"{path}, line {number}: no path in column {column + 1}.")
        full = _entry(entry, path)
        if not storage.location(full).exists():
            missing.append(f"{full} (line {number})")
        entries.append(full)
    if missing and not missing_ok:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputNotFoundError(
            f"{missing[0]}{more}: listed in manifest {path} but does not exist "
            "(relative paths are relative to the manifest's folder)."
        )
    if not entries:
        raise ConfigError(f"{path}: manifest lists no images.")
    return entries


def _entry(entry: str, manifest: Location) -> str:
    """A manifest's entry as an absolute path or URL (relative: to the manifest's folder)."""
    if storage.is_url(entry) or entry.startswith("file://"):
        return str(storage.location(entry))
    if isinstance(manifest, Path):
        p = Path(entry).expanduser()
        return os.path.abspath(p if p.is_absolute() else manifest.parent / p)
    return str(manifest.parent / entry)


def _inside(path: str | Location, folder: str | Location) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved)."""
    if storage.is_url(str(path)) or storage.is_url(str(folder)):
        return f"{str(path).rstrip('/')}/".startswith(f"{str(folder).rstrip('/')}/")
    return Path(str(path)).resolve().is_relative_to(Path(str(folder)).resolve())


def _matches(pattern: str) -> tuple[list[str], str, str]:
    """What a glob ``pattern`` matches (``**`` recursing), what those are called, and
    what is said when there are none."""
    where = storage.location(pattern)
    if isinstance(where, Path):
        local = glob.glob(os.path.expanduser(pattern), recursive=True)
        return local, "paths", "matches no files"
    scheme = pattern.split("://", 1)[0]
    found = [f"{scheme}://{m}" for m in where.fs.glob(where.path)]
    return found, "objects", "matches no object"


def _from_glob(pattern: str, skip: str | None) -> list[str]:
    matches, kind, none = _matches(pattern)
    images = sorted(m for m in matches if _is_image(m) and not (skip and _inside(m, skip)))
    if not images:
        found = f"matches {len(matches)} {kind} but no image" if matches else none
        raise InputNotFoundError(
            f"{pattern}: the pattern {found} (expected one of {', '.join(SUFFIXES)})."
        )
    return images


def _from_directory(path: Location, skip: str | None) -> list[str]:
    # Hidden entries include macOS '._x.tif' resource forks, which are not images.
    images = sorted(
        str(p)
        for p in path.iterdir()
        if _is_image(p.name) and not p.name.startswith(".") and not (skip and _inside(p, skip))
    )
    if not images:
        raise InputNotFoundError(f"{path}: directory holds no images ({', '.join(SUFFIXES)}).")
    return images


def resolve_inputs(
    spec: str | os.PathLike[str], *, missing_ok: bool = False, output: str | None = None
) -> list[str]:
    """Absolute paths of the images a collection names, output names unique.

    Directory and glob results are sorted; a manifest keeps its own order.

    Parameters
    ----------
    spec : str or PathLike
        An image file, a Zarr store, an NGFF plate (its fields, `segpipe.io.plate`),
        a directory of images (hidden files and
        non-images ignored), a glob pattern (``**`` recurses), or a manifest
        (``.txt``: one path per line; ``.csv``: the first column, or the column
        a header names ``path``/``file``/``image``), with ``#`` comment lines
        and paths relative to the manifest.
    missing_ok : bool
        Return manifest entries that do not exist (for the caller to report
        one by one) instead of raising.
    output : str, optional
        The run's output store: a directory or glob listing leaves it (and
        anything in it) out, so a store kept beside its images is not an input.

    Raises
    ------
    InputNotFoundError
        If the path, a manifest entry, or any match of the glob does not exist.
    ConfigError
        If two images would get the same output name, or a manifest is empty.

    Examples
    --------
    >>> resolve_inputs("plates/*.tif")  # doctest: +SKIP
    ['/data/plates/A01.tif', '/data/plates/A02.tif']
    """
    text = os.fspath(spec)
    remote = storage.is_url(text)
    path = storage.location(text if remote else os.path.expanduser(text))
    if not path.exists() and glob.has_magic(text):  # a name like 'img[1].tif' is literal
        paths = _from_glob(text, output)
    elif not path.exists():
        where = str(path) if remote else os.path.abspath(str(path))
        raise InputNotFoundError(f"{where}: no such file or directory.")
    elif (
        path.is_dir() and not text.lower().rstrip("/").endswith(ZARR_SUFFIXES)
    ) and not _is_zarr_dir(path):
        paths = _from_directory(path, output)
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        paths = _from_manifest(path, missing_ok=missing_ok)
    else:
        paths = [str(path)]
    paths = [f for p in paths for f in (plate.fields(p) if plate.is_plate(p) else [p])]
    paths = [p if storage.is_url(p) else os.path.abspath(p) for p in paths]
    seen: dict[str, str] = {}
    for p in paths:
        # casefold: 'A.tif' and 'a.tif' collide on macOS and Windows file systems
        key = image_name(p).casefold()
        if key in seen:
            advice = (
                "segment each plate into its own output"
                if plate.field_name(p) is not None
                else "rename one"
            )
            raise ConfigError(
                f"{p}: its output name {image_name(p)!r} is also that of {seen[key]} "
                f"(names ignore case and image suffixes); {advice}."
            )
        seen[key] = p
    return paths

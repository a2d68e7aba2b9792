"""Resolve a collection (file, directory, glob or manifest) into image paths."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

from segpipe.errors import ConfigError, InputNotFoundError
from segpipe.io.readers import SUFFIXES, ZARR_SUFFIXES, image_name

MANIFEST_SUFFIXES = (".txt", ".csv")


def _is_image(path: str) -> bool:
    return path.lower().rstrip("/").endswith(SUFFIXES)


def _from_manifest(path: Path) -> list[str]:
    base = path.parent
    entries: list[str] = []
    with path.open(newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh) if path.suffix.lower() == ".csv" else ([ln] for ln in fh)
        for row in rows:
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            entry = row[0].strip()
            if path.suffix.lower() == ".csv" and entry.lower() in ("path", "file", "image"):
                continue  # header
            p = Path(entry).expanduser()
            entries.append(str(p if p.is_absolute() else base / p))
    if not entries:
        raise ConfigError(f"{path}: manifest lists no images.")
    missing = [e for e in entries if not os.path.exists(e)]
    if missing:
        raise InputNotFoundError(f"{missing[0]}: listed in manifest {path} but does not exist.")
    return entries


def resolve_inputs(spec: str | os.PathLike[str]) -> list[str]:
    """Absolute paths of the images a collection names, sorted, names unique.

    Parameters
    ----------
    spec : str
        An image file, a Zarr store, a directory of images, a glob pattern, or
        a manifest (``.txt``/``.csv``, one path per line, relative to the manifest).

    Raises
    ------
    InputNotFoundError
        If the path does not exist or the glob matches nothing.
    ConfigError
        If two images would get the same output name.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if glob.has_magic(text):
        paths = sorted(p for p in glob.glob(os.path.expanduser(text)) if _is_image(p) or os.path.isfile(p))
        if not paths:
            raise InputNotFoundError(f"{text}: the pattern matches no files.")
    elif not path.exists():
        raise InputNotFoundError(f"{path}: no such file or directory.")
    elif path.is_dir() and not text.lower().rstrip("/").endswith(ZARR_SUFFIXES) and not (
        path / "zarr.json"
    ).exists():
        paths = sorted(str(p) for p in path.iterdir() if _is_image(p.name))
        if not paths:
            raise InputNotFoundError(f"{path}: directory holds no images ({', '.join(SUFFIXES)}).")
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        paths = _from_manifest(path)
    else:
        paths = [str(path)]
    paths = [os.path.abspath(p) for p in paths]
    seen: dict[str, str] = {}
    for p in paths:
        name = image_name(p)
        if name in seen:
            raise ConfigError(f"{p}: output name {name!r} is also that of {seen[name]}; rename one.")
        seen[name] = p
    return paths

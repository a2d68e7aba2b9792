"""What an output store holds: images, arrays, classes, object counts, tables, previews.

Reads metadata and file footers only, never pixels: `segpipe inspect OUT.zarr`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import zarr

from segpipe.errors import InputNotFoundError, InputReadError
from segpipe.io import storage
from segpipe.io.storage import Location
from segpipe.io.store import KEY, attrs_section, image_groups, lexists
from segpipe.panoptic import read_attrs

TABLES = "tables"
PREVIEWS = "previews"


@dataclass(frozen=True)
class ArrayInfo:
    """One image or label pyramid: level 0's shape, dtype and chunks (the inner chunks
    of a sharded array, with its shards), and its level count."""

    path: str
    levels: int
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ImageInfo:
    """One image of the store."""

    name: str
    complete: bool
    shape: tuple[int, ...] | None
    objects: int | None
    arrays: list[ArrayInfo]
    classes: list[dict[str, Any]]
    objects_per_class: dict[str, int]
    tables: dict[str, dict[str, Any]]
    previews: list[str]
    segmenter: dict[str, Any] = field(default_factory=dict)
    divisor: int | None = None
    error: str | None = None
    source: str | None = None  # the input it was made from
    orphaned: bool = False  # that input is gone (deleted or renamed since)


@dataclass(frozen=True)
class StoreInfo:
    """The store: where it is, the run that owns it, its images."""

    path: str
    run: dict[str, Any]
    images: list[ImageInfo]
    locked_by: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _attrs(node: zarr.Group | zarr.Array[Any]) -> dict[str, Any]:
    return dict(node.attrs.asdict())


def _levels(group: zarr.Group) -> list[str]:
    ome: Any = _attrs(group).get("ome", {})
    try:
        return [str(d["path"]) for d in ome["multiscales"][0]["datasets"]]
    except (KeyError, IndexError, TypeError):
        return []


def _pyramid(root: Location, path: Location) -> ArrayInfo | None:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # not a group (half-written or foreign): nothing to list
        return None
    levels = _levels(group)
    if not levels:
        return None
    try:
        arr = zarr.open_array(str(path / levels[0]), mode="r")
    except Exception:
        return None
    return ArrayInfo(
        _relative(path, root),
        len(levels),
        tuple(int(n) for n in arr.shape),
        str(arr.dtype),
        tuple(int(n) for n in arr.chunks),
        None if arr.shards is None else tuple(int(n) for n in arr.shards),
    )


def _relative(path: Location, root: Location) -> str:
    return str(path)[len(str(root).rstrip("/")) + 1 :]


def _parquet_rows(path: Location) -> int | None:
    try:
        import pyarrow.parquet as pq

        with path.open("rb") as fh:
            return int(pq.ParquetFile(fh).metadata.num_rows)
    except Exception:  # unreadable or partial: reported without a row count
        return None


def _classes(group: Location) -> tuple[list[dict[str, Any]], int | None]:
    """The catalogue (panoptic attributes), else the semantic label's class names."""
    panoptic = group / "labels" / "panoptic"
    if panoptic.is_dir():
        try:
            divisor, catalogue = read_attrs(str(panoptic))
            return catalogue.to_list(), divisor
        except Exception:  # no or broken panoptic metadata: fall back to semantic
            pass
    semantic = group / "labels" / "semantic"
    if semantic.is_dir():
        try:
            props = _attrs(zarr.open_group(str(semantic), mode="r"))["ome"]["image-label"][
                "properties"
            ]
            return [{"id": int(p["label-value"]), "name": str(p["class"])} for p in props], None
        except (KeyError, TypeError, ValueError):
            pass
    return [], None


def inspect_image(root: Location, group_path: Location) -> ImageInfo:
    """What one image group holds (metadata only)."""
    group = zarr.open_group(str(group_path), mode="r")
    state = attrs_section(group, KEY)
    arrays: list[ArrayInfo] = []
    image = _pyramid(root, group_path)
    if image is not None:
        arrays.append(image)
    labels_dir = group_path / "labels"
    if labels_dir.is_dir():
        listed: Any = _attrs(zarr.open_group(str(labels_dir), mode="r")).get("ome", {})
        names = [str(n) for n in listed.get("labels", [])] if isinstance(listed, dict) else []
        names += sorted(d.name for d in labels_dir.iterdir() if d.is_dir() and d.name not in names)
        for name in names:
            info = _pyramid(root, labels_dir / name)
            if info is not None:
                arrays.append(info)
    classes, divisor = _classes(group_path)
    tables: dict[str, dict[str, Any]] = {}
    tables_dir = group_path / TABLES
    if tables_dir.is_dir():
        found: list[Location] = list(tables_dir.glob("*.parquet"))
        for p in sorted(found, key=str):
            tables[p.stem] = {"path": str(p), "rows": _parquet_rows(p)}
    per_class = state.get("tables", {}).get("objects_per_class", {})
    previews = sorted(str(p) for p in (group_path / PREVIEWS).glob("*.png"))
    shape = state.get("shape") or (list(image.shape) if image is not None else None)
    recorded = state.get("source")
    source = str(recorded["path"]) if isinstance(recorded, dict) and "path" in recorded else None
    return ImageInfo(
        name=_relative(group_path, root),
        complete=bool(state.get("complete", False)),
        shape=tuple(shape) if shape is not None else None,
        objects=state.get("objects"),
        arrays=arrays,
        classes=classes,
        objects_per_class={str(k): int(v) for k, v in per_class.items()},
        tables=tables,
        previews=previews,
        segmenter=dict(state.get("segmenter", {})),
        divisor=divisor,
        error=state.get("error"),
        source=source,
        orphaned=source is not None and not lexists(storage.location(source)),
    )


def inspect_store(path: str | os.PathLike[str]) -> StoreInfo:
    """Describe an output store.

    Parameters
    ----------
    path : str or path
        ``OUT.zarr``.

    Raises
    ------
    InputNotFoundError
        If ``path`` does not exist.
    InputReadError
        If it is not a Zarr group.
    """
    text = os.fspath(path)
    root = storage.location(storage.local_text(text))
    if not root.exists():
        raise InputNotFoundError(f"{root}: no such output store.")
    try:
        group = zarr.open_group(str(root), mode="r")
    except Exception as err:
        raise InputReadError(f"{root}: not a Zarr group ({type(err).__name__}: {err}).") from err
    run = attrs_section(group, KEY)
    images = []
    for child in image_groups(root):
        if not (child / "zarr.json").is_file():
            continue
        try:
            node = zarr.open_group(str(child), mode="r")
        except Exception:  # an array or foreign node: not an image
            continue
        if KEY in _attrs(node) or "ome" in _attrs(node):
            images.append(inspect_image(root, child))
    from segpipe.io.store import OutputLock

    return StoreInfo(str(root), run, images, OutputLock(root).holder())

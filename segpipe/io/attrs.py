"""Attributes of the store's Zarr v3 nodes, read and written as the ``zarr.json`` files they are.

An image's results carry a dozen small metadata updates (its state, NGFF
multiscales and image-label metadata, the panoptic catalogue, tables and
previews). Through zarr-python each is an open and an attribute update that
go through its event loop, ~2-5 ms apiece, ~0.1 s an image: as much as
segmenting a 1024² field. Here a local node's ``zarr.json`` is read, its
``attributes`` updated and written back atomically (temporary file, rename).
A node that is not a local v3 one (a URL, a Zarr v2 layout) goes through zarr
instead. The NGFF dictionaries are those ome-zarr's writers produce for
NGFF 0.5 (a test holds them equal); this module can go once zarr's metadata
updates cost well under a millisecond.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zarr

__all__ = ["image_label", "multiscales", "read", "update"]

_LOCK = threading.Lock()  # read-modify-write of one file by two threads of a process
NGFF = "0.5"


def _local(path: str | Path) -> Path | None:
    text = os.fspath(path)
    return None if "://" in text else Path(text) / "zarr.json"


def read(path: str | Path) -> dict[str, Any]:
    """The attributes of the Zarr node at ``path`` (``{}`` when it has none).

    Raises
    ------
    FileNotFoundError
        If there is no Zarr node at ``path``.
    ValueError
        If its metadata is not valid JSON.
    """
    meta = _local(path)
    if meta is None or (not meta.is_file() and (Path(path) / ".zattrs").exists()):
        node = zarr.open(str(path), mode="r")
        return dict(node.attrs.asdict())
    value = json.loads(meta.read_text(encoding="utf-8"))
    attrs = value.get("attributes") if isinstance(value, dict) else None
    return dict(attrs) if isinstance(attrs, dict) else {}


def update(path: str | Path, values: Mapping[str, Any]) -> None:
    """Set the top-level attributes ``values`` of the node at ``path`` (others kept),
    creating a group there if there is no node yet."""
    meta = _local(path)
    if meta is None or (not meta.exists() and (Path(path) / ".zgroup").exists()):
        zarr.open_group(str(path), mode="a").attrs.update(dict(values))
        return
    with _LOCK:
        try:
            node = json.loads(meta.read_text(encoding="utf-8"))
        except FileNotFoundError:
            node = {"zarr_format": 3, "node_type": "group", "attributes": {}}
        attrs = node.get("attributes")
        node["attributes"] = {**(attrs if isinstance(attrs, dict) else {}), **values}
        meta.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_name(f".zarr.json.{os.getpid()}.{threading.get_ident()}.partial")
        tmp.write_text(json.dumps(node), encoding="utf-8")
        os.replace(tmp, meta)


DOWNSAMPLING = {
    "type": "nearest",
    "metadata": {
        "description": "each level is every second pixel along Y and X of the level before "
        "(Z kept); no smoothing, so label values stay labels",
        "method": "segpipe.io.omezarr.downsample_block",
    },
}
"""How segpipe's pyramid levels are made: the multiscales ``type`` and ``metadata``."""


def multiscales(
    name: str, axes: Sequence[Mapping[str, str]], datasets: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The ``ome`` attribute of an NGFF 0.5 multiscale image of ``datasets``."""
    return {
        "version": NGFF,
        "multiscales": [
            {"datasets": list(datasets), "name": name, "axes": list(axes), **DOWNSAMPLING}
        ],
    }


def image_label(
    properties: Sequence[Mapping[str, Any]] | None = None,
    colors: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``image-label`` entry of an NGFF 0.5 label image's ``ome`` attribute; its
    ``source`` is the image group two levels up (``IMAGE/labels/NAME``)."""
    label: dict[str, Any] = {"source": {"image": "../../"}}  # the image the labels are of
    if colors is not None:
        label["colors"] = list(colors)
    if properties is not None:
        label["properties"] = list(properties)
    label["version"] = NGFF
    return label

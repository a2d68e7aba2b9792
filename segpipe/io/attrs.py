"""Attributes of the store's Zarr v3 nodes, read and written as the ``zarr.json`` files they are.

An image's results carry a dozen small metadata updates (its state, NGFF
multiscales and image-label metadata, the panoptic catalogue, tables and
previews). Through zarr-python each is an open and an attribute update that
go through its event loop, ~2-5 ms apiece, ~0.1 s an image: as much as
segmenting a 1024² field. Here a v3 node's ``zarr.json`` is read, its
``attributes`` updated and written back whole (`segpipe.io.storage.put`: a
temporary file and a rename, or one object ``PUT``). A Zarr v2 node goes
through zarr instead. The NGFF dictionaries are those ome-zarr's writers produce for
NGFF 0.5 (a test holds them equal); this module can go once zarr's metadata
updates cost well under a millisecond.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zarr

from segpipe.io import storage
from segpipe.io.storage import Where

__all__ = ["change", "image_label", "multiscales", "read", "update"]

_LOCK = threading.Lock()  # read-modify-write of one file by two threads of a process
NGFF = "0.5"


def read(path: Where) -> dict[str, Any]:
    """The attributes of the Zarr node at ``path`` (``{}`` when it has none).

    Raises
    ------
    FileNotFoundError
        If there is no Zarr node at ``path``.
    ValueError
        If its metadata is not valid JSON.
    """
    node = storage.location(path)
    try:
        value = json.loads(storage.read_bytes(node / "zarr.json"))
    except FileNotFoundError:
        if not (node / ".zattrs").exists():  # a Zarr v2 node keeps them there
            raise
        return dict(zarr.open(str(node), mode="r").attrs.asdict())
    attrs = value.get("attributes") if isinstance(value, dict) else None
    return dict(attrs) if isinstance(attrs, dict) else {}


def update(path: Where, values: Mapping[str, Any]) -> None:
    """Set the top-level attributes ``values`` of the node at ``path`` (others kept),
    creating a group there if there is no node yet."""
    change(path, lambda current: values)


def change(path: Where, new: Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
    """Set the top-level attributes ``new(current)`` of the node at ``path``, given its
    current attributes (others kept), in one read and one write (none when they are
    already so); a group is created there if there is no node yet."""
    node = storage.location(path)
    with _LOCK:
        try:
            value = json.loads(storage.read_bytes(node / "zarr.json"))
        except FileNotFoundError:
            if (node / ".zgroup").exists():  # Zarr v2
                group = zarr.open_group(str(node), mode="a")
                group.attrs.update(dict(new(dict(group.attrs.asdict()))))
                return
            value = {"zarr_format": 3, "node_type": "group"}  # written below, whatever new gives
        attrs = value.get("attributes")
        attrs = attrs if isinstance(attrs, dict) else {}
        changed = {**attrs, **new(attrs)}
        if changed == attrs and "attributes" in value:
            return
        value["attributes"] = changed
        storage.put(node / "zarr.json", json.dumps(value).encode())


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

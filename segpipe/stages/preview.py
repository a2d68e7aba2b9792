"""Stage preview: one task renders ``previews/<name>.png`` (label outlines over the image)
from the pyramid level nearest the preview size, never level 0 of a large image."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe.engine import Runner, map_blocks
from segpipe.errors import InputReadError
from segpipe.image import ImagePlan, ProgressFn, noop
from segpipe.io import attrs, omezarr, png, storage
from segpipe.io.storage import Location
from segpipe.io.store import mark_image
from segpipe.preview import MAX_SIZE, MIN_SIZE, PALETTE, PREVIEWS, choose_level, indexed

__all__ = ["preview_path", "preview_task", "recorded", "write_preview"]


def _group_levels(group: str) -> list[str]:
    ome: Any = attrs.read(group).get("ome", {})
    try:
        return [str(d["path"]) for d in ome["multiscales"][0]["datasets"]]
    except (KeyError, IndexError, TypeError) as err:
        raise InputReadError(f"{group}: no OME-Zarr multiscales metadata.") from err


def preview_task(
    image_group: str, labels_group: str, dst: str, *, max_size: int = MAX_SIZE
) -> tuple[int, ...]:
    """Render and write one preview PNG; return its (rows, columns).

    Reads one plane (the middle one of a volume) of the chosen pyramid level
    of the image and of the labels, never level 0 unless it is small.
    """
    paths = _group_levels(image_group)
    label_paths = _group_levels(labels_group)
    levels = min(len(paths), len(label_paths))
    shapes = [omezarr.array_shape(storage.join(image_group, p)) for p in paths[:levels]]
    k = choose_level(shapes, max_size=max_size)
    shape = shapes[k]
    plane: tuple[Any, ...] = tuple(n // 2 for n in shape[:-2])
    step = max(1, math.ceil(max(shape[-2:]) / max_size))
    index = (*plane, slice(None, None, step), slice(None, None, step))
    image = _read(storage.join(image_group, paths[k]), index, shape)
    labels = _read(storage.join(labels_group, label_paths[k]), index, shape)
    longest = max(max(image.shape), 1)
    grow = -(-MIN_SIZE // longest) if longest < MIN_SIZE else 1
    if grow > 1:
        image = image.repeat(grow, axis=0).repeat(grow, axis=1)
        labels = labels.repeat(grow, axis=0).repeat(grow, axis=1)
    picture = indexed(image, labels)
    storage.put(storage.location(dst), png.encode(picture, PALETTE))
    return tuple(picture.shape)


def _read(path: str, index: tuple[Any, ...], shape: tuple[int, ...]) -> NDArray[Any]:
    """``index`` of the array at ``path``: a whole plane of a plane image is read as the
    chunk it usually is (`omezarr.read_block`), anything else through zarr."""
    if len(shape) == 2 and index[-1].step == 1:
        return omezarr.read_block(path, (slice(0, shape[0]), slice(0, shape[1])))
    return np.asarray(omezarr.open_array(path)[index])


def preview_path(plan: ImagePlan) -> Location:
    """``OUT/<name>/previews/<name>.png`` (a plate field ``A/1/0``: ``A_1_0.png``)."""
    return storage.location(plan.group) / PREVIEWS / f"{plan.name.replace('/', '_')}.png"


def write_preview(
    client: Runner,
    plan: ImagePlan,
    progress: ProgressFn | None = None,
    *,
    labels: str = "instances",
    max_size: int = MAX_SIZE,
    record: bool = True,
) -> str:
    """Write the image's preview PNG in one task; return its path.

    Parameters
    ----------
    client : distributed.Client
        The cluster.
    plan : ImagePlan
        An image whose ``write`` stage has run (pyramids and metadata exist).
    progress : callable, optional
        ``progress(stage, done, total)``.
    labels : str
        Which label image to outline.
    max_size : int
        Longest side of the preview.
    record : bool
        Record it in the image group's ``segpipe.previews`` here; otherwise the caller
        does (`segpipe.lifecycle.finish`, with the image's completion: one write).

    Returns
    -------
    str
        ``OUT/<name>/previews/<name>.png``; also recorded in the ``previews`` group's
        attributes.
    """

    dst = preview_path(plan)
    labels_group = storage.join(plan.group, "labels", labels)
    map_blocks(
        client,
        _preview_job,
        [(plan.group, labels_group, str(dst), max_size)],
        stage="preview",
        progress=progress or noop,
    )
    relative = recorded(plan)
    attrs.update(dst.parent, {"segpipe": {PREVIEWS: relative}})
    if record:
        mark_image(plan.group, previews=relative)
    return str(dst)


def recorded(plan: ImagePlan) -> list[str]:
    """What the image group's ``segpipe.previews`` records of `write_preview`'s file."""
    return [f"{PREVIEWS}/{preview_path(plan).name}"]


def _preview_job(image_group: str, labels_group: str, dst: str, max_size: int) -> tuple[int, ...]:
    return preview_task(image_group, labels_group, dst, max_size=max_size)

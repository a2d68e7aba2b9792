"""Per-object and per-segment tables, measured block by block and merged exactly.

Each block task reduces its pixels to statistics per (instance, class) group:
pixel count, coordinate sums, bounding box, intensity sum/min/max. Objects
that span blocks are merged on the client by adding counts and sums and taking
minima and maxima, so every property equals the whole-image value
(`skimage.measure.regionprops`) without any task seeing more than one block.
The tables go to ``OUT/<name>/tables/{objects,segments}.parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute
from numpy.typing import NDArray

from segpipe import kernels
from segpipe.errors import UnsupportedImageError
from segpipe.io.markers import Markers
from segpipe.io.physical import PixelSize
from segpipe.panoptic import Catalogue

if TYPE_CHECKING:
    pass

CLASS_SLOTS = 256  # semantic labels are uint8: (instance, class) packs into one uint64 key


@dataclass(frozen=True)
class Groups:
    """Statistics of pixel groups sharing one (instance, class); coordinates are global.

    Attributes
    ----------
    instance, cls : (K,) ndarray of uint64
        The group keys, sorted by (instance, class).
    count : (K,) ndarray of int64
        Pixels per group.
    coord_sum, lo, hi : (K, D) ndarray of int64
        Sum, minimum and maximum (inclusive) of each axis' pixel coordinate.
    isum, imin, imax : (K,) ndarray of float64
        Sum, minimum and maximum of the intensity image over the group.
    """

    instance: NDArray[np.uint64]
    cls: NDArray[np.uint64]
    count: NDArray[np.int64]
    coord_sum: NDArray[np.int64]
    lo: NDArray[np.int64]
    hi: NDArray[np.int64]
    isum: NDArray[np.float64]
    imin: NDArray[np.float64]
    imax: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.instance)

    @classmethod
    def empty(cls, ndim: int) -> Groups:
        z = np.zeros(0, np.int64)
        zz = np.zeros((0, ndim), np.int64)
        f = np.zeros(0, np.float64)
        u = np.zeros(0, np.uint64)
        return cls(u, u, z, zz, zz, zz, f, f, f)

    def take(self, index: NDArray[Any]) -> Groups:
        """The rows selected by ``index`` (a mask or positions)."""
        return Groups(*(getattr(self, f)[index] for f in Groups.__dataclass_fields__))

    @classmethod
    def concat(cls, parts: Sequence[Groups]) -> Groups:
        if not parts:
            raise ValueError("Expected at least one Groups to concatenate, got none.")
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__)
        )


def group_starts(sorted_keys: NDArray[Any]) -> NDArray[np.intp]:
    """Index where each run of equal keys begins."""
    if len(sorted_keys) == 0:
        return np.zeros(0, np.intp)
    change = np.empty(len(sorted_keys), dtype=bool)
    change[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=change[1:])
    return np.flatnonzero(change)


def pack(instance: NDArray[np.uint64], cls: NDArray[np.uint64]) -> NDArray[np.uint64]:
    if instance.size and int(instance.max()) >= 2**56:
        raise UnsupportedImageError(
            f"instance id {int(instance.max())} is too large to measure (limit 2**56)."
        )
    return instance * np.uint64(CLASS_SLOTS) + cls


def block_groups(
    instances: NDArray[np.integer],
    semantic: NDArray[np.integer],
    image: NDArray[Any],
    *,
    offset: Sequence[int] | None = None,
) -> Groups:
    """Statistics per (instance, class) of one block.

    Parameters
    ----------
    instances : (M, N[, P]) ndarray of int
        Global instance ids (0 = no instance).
    semantic : (M, N[, P]) ndarray of int
        Class per pixel (0-255).
    image : (M, N[, P]) ndarray
        Intensities.
    offset : sequence of int, optional
        Global coordinate of the block's first pixel (zeros by default).

    Returns
    -------
    Groups
        One row per (instance, class) present, background (instance 0) included.

    Examples
    --------
    >>> g = block_groups(np.array([[0, 3], [3, 3]]), np.array([[0, 1], [1, 1]]),
    ...                  np.array([[5, 1], [2, 3]]))
    >>> g.instance.tolist(), g.count.tolist(), g.isum.tolist()
    ([0, 3], [1, 3], [5.0, 6.0])
    """
    if not instances.shape == semantic.shape == image.shape:
        raise ValueError(
            f"Expected instances, semantic and image of one shape, got {instances.shape}, "
            f"{semantic.shape} and {image.shape} instead."
        )
    shape = instances.shape
    ndim = len(shape)
    base = np.zeros(ndim, np.int64) if offset is None else np.asarray(offset, np.int64)
    if instances.size == 0:
        return Groups.empty(ndim)
    key = pack(instances.ravel().astype(np.uint64), semantic.ravel().astype(np.uint64))
    # Background (key 0) is most of a block and sorts slowly (many ties): take it
    # first, in pixel order, and sort the rest: the same order a stable sort gives.
    rest = np.flatnonzero(key)
    order = np.concatenate([np.flatnonzero(key == 0), rest[np.argsort(key[rest], kind="stable")]])
    sorted_key = key[order]
    starts = group_starts(sorted_key)
    count = np.diff(np.append(starts, len(key))).astype(np.int64)
    coords = np.unravel_index(order, shape)
    coord_sum = np.empty((len(starts), ndim), np.int64)
    lo = np.empty_like(coord_sum)
    hi = np.empty_like(coord_sum)
    for k, c in enumerate(coords):
        c64 = c.astype(np.int64, copy=False)
        coord_sum[:, k] = np.add.reduceat(c64, starts) + count * base[k]
        lo[:, k] = np.minimum.reduceat(c64, starts) + base[k]
        hi[:, k] = np.maximum.reduceat(c64, starts) + base[k]
    values = image.ravel()[order].astype(np.float64)
    keys = sorted_key[starts]
    return Groups(
        keys // np.uint64(CLASS_SLOTS),
        keys % np.uint64(CLASS_SLOTS),
        count,
        coord_sum,
        lo,
        hi,
        np.add.reduceat(values, starts),
        np.minimum.reduceat(values, starts),
        np.maximum.reduceat(values, starts),
    )


def local_groups(
    local: NDArray[np.unsignedinteger],
    lut: NDArray[np.integer],
    semantic: NDArray[np.integer],
    image: NDArray[Any],
    *,
    offset: Sequence[int],
) -> Groups:
    """`block_groups` of ``lut[local]`` from block-local ids ``1..len(lut) - 1``, in one
    sweep (`segpipe.kernels.object_stats`) instead of a sort of every pixel.

    Falls back to `block_groups` where an object has pixels of several classes.
    """
    n = len(lut) - 1
    acc = kernels.object_stats(local, np.asarray(semantic, np.uint8), image, n)
    if acc is None:
        return block_groups(lut[local], semantic, image, offset=offset)
    rows = np.flatnonzero(acc["count"])
    ids = np.concatenate([np.asarray(lut, np.uint64), np.zeros(256, np.uint64)])[rows]
    base = np.asarray(offset, np.int64)
    count = acc["count"][rows]
    groups = Groups(
        ids,
        acc["cls"][rows].astype(np.uint64),
        count,
        acc["csum"][rows] + count[:, None] * base,
        acc["lo"][rows] + base,
        acc["hi"][rows] + base,
        acc["isum"][rows],
        acc["imin"][rows],
        acc["imax"][rows],
    )
    # Sorted by (instance, class); two local ids of one object (joined through another
    # block) become one row.
    return reduce_groups(groups, pack(groups.instance, groups.cls))[1]


def reduce_groups(groups: Groups, key: NDArray[Any]) -> tuple[NDArray[Any], Groups]:
    """Merge rows with equal ``key``: counts and sums add, minima and maxima combine.

    Returns the distinct keys (sorted) and one merged row each; ``instance`` and
    ``cls`` of a merged row are those of its first row.
    """
    order = np.argsort(key, kind="stable")  # stable: float sums in block order
    k = key[order]
    starts = group_starts(k)
    if len(starts) == 0:
        return k, groups

    def add(a: NDArray[Any]) -> NDArray[Any]:
        return np.add.reduceat(a[order], starts, axis=0)

    merged = Groups(
        groups.instance[order][starts],
        groups.cls[order][starts],
        add(groups.count),
        add(groups.coord_sum),
        np.minimum.reduceat(groups.lo[order], starts, axis=0),
        np.maximum.reduceat(groups.hi[order], starts, axis=0),
        add(groups.isum),
        np.minimum.reduceat(groups.imin[order], starts, axis=0),
        np.maximum.reduceat(groups.imax[order], starts, axis=0),
    )
    return k[starts], merged


def merge_groups(parts: Sequence[Groups]) -> Groups:
    """Join the groups of several blocks: one row per (instance, class) of the image."""
    if not parts:
        raise ValueError("Expected the groups of at least one block, got none.")
    groups = Groups.concat(parts)
    return reduce_groups(groups, pack(groups.instance, groups.cls))[1]


def majority_class(groups: Groups) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """``(instance ids, class of most pixels)``; ties go to the smallest class id.

    ``groups`` must hold one row per (instance, class), as `merge_groups` returns.
    """
    order = np.lexsort((groups.cls, -groups.count, groups.instance))
    inst = groups.instance[order]
    first = group_starts(inst)
    return inst[first], groups.cls[order][first]


def _geometry(groups: Groups, ndim: int) -> dict[str, NDArray[Any]]:
    cols: dict[str, NDArray[Any]] = {"area": groups.count}
    for k in range(ndim):
        cols[f"bbox-{k}"] = groups.lo[:, k]
    for k in range(ndim):
        cols[f"bbox-{ndim + k}"] = groups.hi[:, k] + 1  # exclusive, as scikit-image
    for k in range(ndim):
        cols[f"centroid-{k}"] = groups.coord_sum[:, k] / groups.count
    return cols


def _class_names(ids: NDArray[np.integer], catalogue: Catalogue) -> pa.DictionaryArray:
    """Class names as a dictionary column (one string per class, not per row)."""
    present = sorted(set(catalogue.ids) | {int(c) for c in np.unique(ids)})
    index = np.zeros(CLASS_SLOTS, np.int32)
    index[present] = np.arange(len(present), dtype=np.int32)
    return pa.DictionaryArray.from_arrays(
        pa.array(index[ids.astype(np.intp)], pa.int32()),
        pa.array([catalogue.name(c) for c in present], pa.string()),
    )


def objects_table(groups: Groups, catalogue: Catalogue, pixel: PixelSize | None = None) -> pa.Table:
    """One row per instance: label, class, area, bbox, centroid, intensity mean/min/max.

    Columns follow ``skimage.measure.regionprops_table``: ``bbox-0 … bbox-{2D-1}``
    (min per axis, then max + 1), ``centroid-0 … centroid-{D-1}``. With ``pixel``,
    ``area_physical`` (an area, or a volume in 3D), ``bbox_physical-*`` and
    ``centroid_physical-*`` follow, in ``pixel.unit`` (pixel k's centre at k × size +
    the image's offset).
    """
    ndim = groups.lo.shape[1]
    fg = groups.instance > 0
    sub = Groups(*(getattr(groups, f)[fg] for f in Groups.__dataclass_fields__))
    labels, cls = majority_class(sub)
    _, merged = reduce_groups(sub, sub.instance)
    thing = catalogue.thing_lut()
    cols: dict[str, Any] = {
        "label": pa.array(labels, pa.uint64()),
        "class": pa.array(cls.astype(np.uint8), pa.uint8()),
        "class_name": _class_names(cls, catalogue),
        "is_thing": pa.array(thing[cls.astype(np.intp)], pa.bool_()),
    }
    geometry = _geometry(merged, ndim)
    cols.update(geometry)
    if pixel is not None:
        offset = pixel.offset or (0.0,) * ndim
        cols["area_physical"] = geometry["area"] * pixel.area()
        for k in range(2 * ndim):
            size, shift = pixel.sizes[k % ndim], offset[k % ndim]
            cols[f"bbox_physical-{k}"] = geometry[f"bbox-{k}"] * size + shift
        for k in range(ndim):
            cols[f"centroid_physical-{k}"] = geometry[f"centroid-{k}"] * pixel.sizes[k] + offset[k]
    cols["intensity_mean"] = merged.isum / np.maximum(merged.count, 1)
    cols["intensity_min"] = merged.imin
    cols["intensity_max"] = merged.imax
    return pa.table(cols)


def segments_table(groups: Groups, catalogue: Catalogue, divisor: int) -> pa.Table:
    """One row per panoptic segment, like COCO panoptic's ``segments_info``.

    ``id`` is the panoptic value ``category * divisor + instance``; a stuff class
    is one segment (instance 0) wherever its pixels are.
    """
    ndim = groups.lo.shape[1]
    thing = catalogue.thing_lut()[groups.cls.astype(np.intp)]
    instance = np.where(thing, groups.instance, np.uint64(0))
    ids = groups.cls * np.uint64(divisor) + instance
    keys, merged = reduce_groups(groups, ids)
    category = (keys // np.uint64(divisor)).astype(np.uint8)
    cols: dict[str, Any] = {
        "id": pa.array(keys, pa.uint64()),
        "category": pa.array(category, pa.uint8()),
        "category_name": _class_names(category, catalogue),
        "is_thing": pa.array(catalogue.thing_lut()[category], pa.bool_()),
        "instance": pa.array(keys % np.uint64(divisor), pa.uint64()),
    }
    cols.update(_geometry(merged, ndim))
    return pa.table(cols)


# -- block function and stage --------------------------------------------------------


def open_instances(
    instances: NDArray[np.integer], region: tuple[slice, ...], shape: Sequence[int]
) -> NDArray[Any]:
    """Instances on the block's faces toward other blocks (they may go on there), and 0."""
    faces = [np.zeros(1, instances.dtype)]
    for axis, (r, n) in enumerate(zip(region, shape, strict=True)):
        if r.start > 0:
            faces.append(np.take(instances, 0, axis=axis).ravel())
        if r.stop < n:
            faces.append(np.take(instances, -1, axis=axis).ravel())
    return np.unique(np.concatenate(faces))


def keep_closed(
    groups: Groups,
    instances: NDArray[np.integer],
    region: tuple[slice, ...],
    shape: Sequence[int],
    stuff: Sequence[int],
    parts_dir: str,
    block_id: int,
) -> Groups:
    """Save the groups of objects wholly inside the block to ``parts_dir``; return the
    open ones: those on a face toward another block, and every instance with stuff
    pixels (stuff segments and the instances in them are summed over the whole image)."""
    with_stuff = groups.instance[np.isin(groups.cls, np.asarray(stuff, np.uint64))]
    open_ids = np.union1d(open_instances(instances, region, shape).astype(np.uint64), with_stuff)
    is_open = np.isin(groups.instance, open_ids)
    Markers(parts_dir).save(block_id, groups_out(groups.take(~is_open)))
    return groups.take(is_open)


def groups_out(groups: Groups) -> dict[str, NDArray[Any]]:
    return {f: getattr(groups, f) for f in Groups.__dataclass_fields__}


def groups_in(arrays: dict[str, NDArray[Any]]) -> Groups:
    return Groups(**{f: arrays[f] for f in Groups.__dataclass_fields__})

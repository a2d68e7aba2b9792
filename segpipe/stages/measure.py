"""Stage measure: the blocks' per-object sums merged exactly into the tables.

The relabel pass left, per block, the sums of objects wholly inside it (in
scratch) and those that may continue elsewhere (in its marker). Here the open
ones are merged (counts and sums add, minima and maxima combine), joined with
the closed ones and written in batches as ``tables/objects.parquet``
(regionprops-style) and ``tables/segments.parquet`` (COCO ``segments_info``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from segpipe.image import ImagePlan
from segpipe.io import attrs, omezarr, storage
from segpipe.io.markers import Markers
from segpipe.io.physical import PixelSize
from segpipe.io.storage import Location
from segpipe.io.store import mark_image
from segpipe.measure import (
    CLASS_SLOTS,
    Groups,
    group_starts,
    groups_in,
    objects_table,
    pack,
    reduce_groups,
    segments_table,
)
from segpipe.panoptic import Catalogue
from segpipe.stages.write import Relabelled, parts_dir, relabelled

__all__ = ["TABLES", "Measured", "measure", "tables_dir", "write_tables"]

TABLES = "tables"
ROW_GROUP = 1 << 20
BATCH_ROWS = 1 << 16  # objects gathered before a table write: ~8 MB on the client


@dataclass(frozen=True)
class Measured:
    """What `measure` wrote: table paths, row counts, objects per class name."""

    objects_path: str
    segments_path: str
    objects: int
    segments: int
    per_class: dict[str, int]
    info: dict[str, Any]  # what the image group's ``segpipe.tables`` records


def _open_by_owner(parts: Sequence[Groups], stuff: tuple[int, ...]) -> dict[int, Groups]:
    """Merge the open groups of all blocks; give each instance to its first block, and
    every instance with stuff pixels to one chunk (-1), so stuff segments sum once."""
    if not any(len(p) for p in parts):
        return {}
    groups = Groups.concat(parts)
    merged = reduce_groups(groups, pack(groups.instance, groups.cls))[1]
    # the first block holding each instance, whatever its classes
    block = np.concatenate([np.full(len(p), b, np.int64) for b, p in enumerate(parts)])
    order = np.argsort(groups.instance, kind="stable")
    first_rows = group_starts(groups.instance[order])
    first_block = np.minimum.reduceat(block[order], first_rows)
    ids = groups.instance[order][first_rows]
    row_owner = first_block[np.searchsorted(ids, merged.instance)]
    with_stuff = np.isin(
        merged.instance, merged.instance[np.isin(merged.cls, np.asarray(stuff, np.uint64))]
    )
    row_owner[with_stuff] = -1
    by = np.argsort(row_owner, kind="stable")
    blocks, first = np.unique(row_owner[by], return_index=True)
    bounds = np.append(first, len(by))
    return {int(b): merged.take(by[bounds[i] : bounds[i + 1]]) for i, b in enumerate(blocks)}


class _TableWriters:
    """Both tables, written a block's rows at a time, renamed into place at the end
    (in object storage streamed as one upload, which appears whole when it ends)."""

    def __init__(self, out: Location, meta: dict[str, Any]) -> None:
        self.out = out
        self.meta = {b"segpipe": json.dumps(meta, sort_keys=True).encode()}
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.files: dict[str, Any] = {}
        self.rows = {"objects": 0, "segments": 0}

    def _tmp(self, name: str) -> Any:
        if isinstance(self.out, Path):
            return self.out / f"{name}.parquet.partial"
        self.files[name] = (self.out / f"{name}.parquet").open("wb")
        return self.files[name]

    def write(self, objects: pa.Table, segments: pa.Table) -> None:
        for name, table in (("objects", objects), ("segments", segments)):
            table = table.replace_schema_metadata(self.meta)
            if name not in self.writers:
                self.writers[name] = pq.ParquetWriter(
                    self._tmp(name), table.schema, compression="zstd"
                )
            self.writers[name].write_table(table, row_group_size=ROW_GROUP)
            self.rows[name] += table.num_rows

    def close(
        self, catalogue: Catalogue, divisor: int, ndim: int, pixel: PixelSize | None
    ) -> tuple[int, int]:
        if not self.writers:  # no rows at all: still write empty tables
            empty = Groups.empty(ndim)
            objects = objects_table(empty, catalogue, pixel)
            self.write(objects, segments_table(empty, catalogue, divisor))
        for name, writer in self.writers.items():
            writer.close()
            if name in self.files:
                self.files[name].close()
            elif isinstance(self.out, Path):
                os.replace(self.out / f"{name}.parquet.partial", self.out / f"{name}.parquet")
        return self.rows["objects"], self.rows["segments"]


def tables_dir(plan: ImagePlan) -> Location:
    return storage.location(storage.join(plan.group, TABLES))


def write_tables(
    plan: ImagePlan,
    catalogue: Catalogue,
    divisor: int,
    open_parts: Sequence[Groups],
    parts_dir: Location,
    *,
    record: bool = True,
) -> Measured:
    """Merge the blocks' open groups, join them with the closed ones saved in
    ``parts_dir`` and write ``objects.parquet`` and ``segments.parquet``.

    Parameters
    ----------
    plan : ImagePlan
        The image.
    catalogue : Catalogue
        The run's classes.
    divisor : int
        The panoptic divisor.
    open_parts : sequence of Groups
        Per block (in block order), the groups that may continue in another block.
    parts_dir : Path or UPath
        Where the block tasks saved the groups of objects wholly inside them.
    record : bool
        Record the tables in the image group's ``segpipe.tables`` here; otherwise the
        caller does (`segpipe.lifecycle.finish`, with the image's completion: one write).

    Returns
    -------
    Measured
    """

    blocks = list(plan.grid())
    stuff = tuple(c.id for c in catalogue.classes if not c.thing)
    out = tables_dir(plan)
    # Objects that cross blocks are merged here; each goes with the first block it is
    # in, which is the block whose id range holds its global id.
    owned = _open_by_owner(open_parts, stuff)
    meta = {
        "image": plan.name,
        "shape": list(plan.spec.shape),
        "divisor": divisor,
        "classes": catalogue.to_list(),
    }
    pixel = plan.spec.pixel
    if pixel is not None:  # what the *_physical columns are in
        meta.update(pixel_size=list(pixel.sizes), unit=pixel.unit, pixel_size_from=pixel.origin)
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(CLASS_SLOTS, np.int64)
    writers = _TableWriters(out, meta)
    parts = Markers(parts_dir)
    batch: list[Groups] = []
    listed: list[pa.Table] = []  # the objects as written, while few enough to list
    rows = 0

    def flush() -> None:
        nonlocal counts, rows
        groups = Groups.concat(batch)
        batch.clear()
        rows = 0
        objects = objects_table(groups, catalogue, pixel)
        objects = objects.take(pa.compute.sort_indices(objects, [("label", "ascending")]))
        segments = segments_table(groups, catalogue, divisor)
        segments = segments.take(pa.compute.sort_indices(segments, [("id", "ascending")]))
        counts += np.bincount(
            np.asarray(objects.column("class").to_numpy(), np.intp), minlength=CLASS_SLOTS
        )
        writers.write(objects, segments)
        listed.append(objects)
        if sum(t.num_rows for t in listed) > omezarr.LABEL_VALUES:
            listed.clear()  # too many to list: memory stays bounded
            listed.append(objects.slice(0, 0))

    for b in [None, *blocks]:  # None: instances with stuff pixels, gathered first
        bid = -1 if b is None else b.id
        if parts.done(bid):
            batch.append(groups_in(parts.load(bid)))
            rows += len(batch[-1])
        if bid in owned:
            batch.append(owned[bid])
            rows += len(batch[-1])
        # blocks own consecutive id ranges: a batch of them sorts like one block
        if rows >= BATCH_ROWS:
            flush()
    if rows:
        flush()
    n_objects, n_segments = writers.close(catalogue, divisor, plan.ndim, pixel)
    per_class = {c.name: int(counts[c.id]) for c in catalogue.classes}
    info: dict[str, Any] = {
        "objects": {"path": f"{TABLES}/objects.parquet", "rows": n_objects},
        "segments": {"path": f"{TABLES}/segments.parquet", "rows": n_segments},
        "objects_per_class": per_class,
    }
    attrs.update(out, {"segpipe": {TABLES: info}})
    _describe_instances(plan, pa.concat_tables(listed) if listed else None, n_objects)
    if record:
        mark_image(plan.group, tables=info)
    return Measured(
        str(out / "objects.parquet"),
        str(out / "segments.parquet"),
        n_objects,
        n_segments,
        per_class,
        info,
    )


def _describe_instances(plan: ImagePlan, objects: pa.Table | None, rows: int) -> None:
    """Each instance's class and area in the metadata of ``labels/instances`` (NGFF
    ``properties``, and colours as in the preview), for up to `omezarr.LABEL_VALUES`;
    ``objects`` is the objects table as written, when it has no more rows than that."""
    where = f"{TABLES}/objects.parquet"
    path = storage.join(plan.group, "labels", "instances")
    if rows > omezarr.LABEL_VALUES or objects is None:
        omezarr.describe_label_values(path, None, where)
        return
    columns = {"label": "label-value", "class_name": "class", "area": "area"}
    if plan.spec.pixel is not None:  # then the table has area_physical
        columns["area_physical"] = "area_physical"
    # column by column through NumPy to Python values (no column holds nulls), then
    # one dict per row: 2.5x faster than pyarrow's to_pylist
    values = [objects.column(c).to_numpy(zero_copy_only=False).tolist() for c in columns]
    keys = list(columns.values())
    described = [dict(zip(keys, row, strict=True)) for row in zip(*values, strict=True)]
    omezarr.describe_label_values(path, described, where)


def measure(
    plan: ImagePlan,
    count: int,
    catalogue: Catalogue,
    done: Relabelled | None = None,
    *,
    record: bool = True,
) -> Measured:
    """The measure stage after the relabel pass: its sums merged into the tables.
    ``done``: the pass's result when it ran in this process (default: read back from
    its markers); ``record``: as `write_tables`."""
    done = done or relabelled(plan, count)
    return write_tables(
        plan, catalogue, done.divisor, done.open_groups(), parts_dir(plan), record=record
    )

"""An image's life in the output store: begun, resumed, repaired, finished, failed.

`begin` decides from what the store holds whether an image is done, resumes, or
starts over; `finish` records what it holds (the manifest of its files, the
provenance table) and marks it complete, last.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from segpipe.deep import provenance
from segpipe.errors import OutputConflictError
from segpipe.image import ImagePlan, ImageResult, bookkeeping, owned, span
from segpipe.io import omezarr, plate, storage, store, written
from segpipe.io.markers import RUN_KEY, UNREADABLE, Markers, load_npz, read_marker, save_npz
from segpipe.io.readers import SourceSpec
from segpipe.io.storage import Location
from segpipe.io.store import image_state, mark_image
from segpipe.stats import ImageStats

__all__ = [
    "begin",
    "completed_result",
    "damaged_result",
    "drop_bookkeeping",
    "finish",
    "images",
    "orphans",
    "prune",
    "record_failure",
    "source_identity",
    "write_layout",
    "write_manifest",
    "write_provenance",
]


SAMPLE_HEAD = 16 << 10  # bytes of a file's start in its fingerprint (a TIFF's header)
SAMPLE_PIECES = 16  # pieces spread over the rest
SAMPLE_PIECE = 4 << 10  # bytes each
SAMPLE_FILES = 64  # files of a Zarr array sampled


def _sample(path: Location, size: int, digest: Any) -> None:
    """Feed ``digest`` the start of the file and `SAMPLE_PIECES` pieces spread over it."""
    ranges = [(0, SAMPLE_HEAD)]
    if size > SAMPLE_HEAD:
        for k in range(SAMPLE_PIECES):
            start = SAMPLE_HEAD + (size - SAMPLE_HEAD) * k // SAMPLE_PIECES
            ranges.append((start, start + SAMPLE_PIECE))
    for piece in storage.read_ranges(path, ranges, size):
        digest.update(piece)


def source_identity(spec: SourceSpec) -> dict[str, Any]:
    """What says an input is unchanged since a run: its path; the size and mtime of the
    file or, for Zarr, of every file of the array read (its chunks, not only its
    metadata, which an in-place rewrite leaves alone); and ``sample``, a hash of
    sampled content (a file's header and pieces spread over it; a Zarr array's
    metadata and `SAMPLE_FILES` of its chunks), which a replacement with the same
    size and mtime does not pass. About 80 KiB read per file."""
    read = storage.location(getattr(spec, "array_path", None) or spec.path)
    sample = hashlib.sha256()
    if not read.is_dir():
        size, version = storage.stamp(read)
        _sample(read, size, sample)
        return {
            "path": spec.path,
            "size": size,
            "mtime_ns": version,
            "sample": sample.hexdigest()[:32],
        }
    digest = hashlib.sha256()
    size = count = 0
    files: list[tuple[Location, int]] = []
    top = str(read).rstrip("/")
    for path, (file_size, version) in storage.stamps(read):
        rel = str(path)[len(top) + 1 :]
        digest.update(f"{rel}\0{file_size}\0{version}\n".encode())
        size += file_size
        count += 1
        files.append((path, file_size))
    step = max(1, len(files) // SAMPLE_FILES)
    for path, file_size in files[::step]:
        _sample(path, min(file_size, SAMPLE_HEAD), sample)  # chunks: their first bytes
    return {
        "path": spec.path,
        "size": size,
        "files": count,
        "digest": digest.hexdigest()[:32],
        "sample": sample.hexdigest()[:32],
    }


def _same_source(recorded: Any, identity: dict[str, Any]) -> bool:
    """``identity`` is what ``recorded`` says; a record from before ``sample`` existed
    passes on the rest (the caller then records the sample)."""
    if not isinstance(recorded, dict):
        return False
    if "sample" not in recorded:
        return recorded == {k: v for k, v in identity.items() if k != "sample"}
    return bool(recorded == identity)


def begin(plan: ImagePlan) -> str:
    """Prepare the image's place in the store; return ``done``, ``resume``, ``repair`` or
    ``fresh``.

    ``done``: complete from the same input, and every file it was completed with is
    intact (nothing to do); ``resume``: an interrupted run of the same input in the
    same blocks (finished blocks are kept, each checked before it is trusted);
    ``repair``: complete from the same input but with files missing or damaged;
    ``fresh``: anything else. ``repair`` and ``fresh`` remove earlier results of this
    name first. The blocks are compared because ``tile: auto`` is resolved per image
    and per version: markers name blocks by number.

    Raises
    ------
    OutputConflictError
        If ``OUT/<name>`` exists but segpipe did not write it (it is never deleted).
    """
    state = image_state(plan.group)
    identity = source_identity(plan.spec)
    start = "fresh"
    if _same_source(state.get("source"), identity):
        if state.get("complete"):
            if not damaged_result(plan):
                if state["source"] != identity:  # recorded before content samples
                    mark_image(plan.group, source=identity)
                return "done"
            start = "repair"
        elif state.get("tile") == list(plan.tile):
            if plan.work:  # markers left in the store are not read; they go
                drop_bookkeeping(plan)
            mark_image(plan.group, complete=False)
            return "resume"
    group = storage.location(plan.group)
    ours = state or plan.manifest.exists() or plan.blocks.exists()
    if store.lexists(group) and not ours:
        raise OutputConflictError(
            f"{group}: exists but was not written by segpipe; it is left alone. Move it, "
            "or rename the input."
        )
    drop_bookkeeping(plan)
    for path in (group, plan.provenance, plan.manifest):
        store.remove(path, plan.root)
    if isinstance(group, Path):
        group.mkdir(parents=True, exist_ok=True)
    mark_image(plan.group, complete=False, source=identity, tile=list(plan.tile))
    return start


def drop_bookkeeping(plan: ImagePlan) -> None:
    """Remove the image's markers and scratch: where this run keeps them (`ImagePlan.work`)
    and, when that is not the store, any an earlier run left in the store."""
    for path in bookkeeping(plan.work_root, plan.name):
        store.remove(path, plan.work_root)
    if plan.work:
        for path in bookkeeping(plan.root, plan.name):
            store.remove(path, plan.root)


def _result_files(plan: ImagePlan) -> list[tuple[Location, tuple[int, int]]]:
    """Every file of the image's result but its group metadata (rewritten when marked),
    with its `segpipe.io.storage.stamp` (in object storage: from one listing)."""
    group = storage.location(plan.group)
    meta = str(group / "zarr.json")
    return sorted(
        ((f, s) for f, s in storage.stamps(group) if str(f) != meta), key=lambda x: str(x[0])
    )


def write_manifest(plan: ImagePlan) -> None:
    """Record every file of the finished image (size, mtime, checksum) in its manifest.

    Checksums come from the block markers where a file is as its block wrote it, and
    are computed here for the rest (metadata, tables, previews)."""
    known: dict[str, written.Written] = {}
    if plan.blocks.exists():
        for stage in plan.blocks.iterdir():
            for marker in stage.glob("*.npz"):
                try:
                    with load_npz(marker) as data:
                        if "__files" in data.files:
                            arrays = {k: data[k] for k in ("__files", "__files_v")}
                            for w in written.from_arrays(arrays, stage):
                                known[w.path] = w
                except UNREADABLE:
                    continue
    files = []
    for path, (size, version) in _result_files(plan):
        seen = known.get(str(path))
        if seen is None or (seen.size, seen.mtime_ns) != (size, version):
            seen = written.Written(str(path), size, version, written.checksum(path))
        files.append(seen)
    save_npz(plan.manifest, written.to_arrays(files, plan.root))


def damaged_result(plan: ImagePlan) -> list[str]:
    """Files of a completed image that are missing or no longer as it was completed
    with (an unreadable or missing manifest counts as its own path)."""
    arrays = read_marker(plan.manifest)
    if arrays is None:
        return [str(plan.manifest)]
    return written.damaged(written.from_arrays(arrays, plan.root))


def write_provenance(plan: ImagePlan) -> Location | None:
    """The segment markers' provenance records as ``OUT/_segpipe/provenance/<image>.parquet``;
    None when no block recorded any (markers from an older version)."""
    markers = plan.markers("segment")
    rows = []
    for b in plan.grid(plan.segment_halo):
        if not markers.done(b.id):
            continue
        with load_npz(markers.path(b.id)) as data:
            # only the small entries: the neighbour views stay unread
            keep = [k for k in data.files if k.startswith(provenance.PREFIX) or k == RUN_KEY]
            arrays = {k: data[k] for k in keep}
        record = provenance.decode(arrays)
        if record is not None:
            run = str(arrays.get(RUN_KEY, ""))
            rows.append((b.id, span(b.core), record, run))
    if not rows:
        return None
    return provenance.write_table(plan.provenance, rows)


def finish(
    plan: ImagePlan,
    result: ImageResult,
    stats: ImageStats,
    params: dict[str, Any],
    *,
    marks: Mapping[str, Any] | None = None,
) -> None:
    """Write the provenance table and the manifest of the result, drop scratch data and
    markers, then mark the image complete (written last), recording ``marks`` (what the
    stages left to record: its previews and tables) in the same write."""
    write_provenance(plan)
    tally = {}
    if plan.blocks.exists():
        for d in sorted(cast(Iterator[Location], plan.blocks.iterdir()), key=lambda d: d.name):
            computed, total = Markers(d).tally(plan.token)
            tally[d.name] = {"computed": computed, "blocks": total}
    write_manifest(plan)
    drop_bookkeeping(plan)
    mark_image(
        plan.group,
        objects=result.objects,
        shape=list(result.shape),
        segmenter=plan.segmenter.describe(),
        params=params,
        statistics=stats.to_dict(),
        seconds=result.seconds,
        blocks=tally,
        **(marks or {}),
        complete=True,
    )


def record_failure(plan: ImagePlan, problem: str) -> None:
    """Note on the (incomplete) image why it failed; it is never marked complete."""
    if storage.location(plan.group).exists():
        mark_image(plan.group, complete=False, error=problem)


def completed_result(plan: ImagePlan) -> ImageResult:
    """The result recorded by an earlier run that completed this image."""
    state = image_state(plan.group)
    return ImageResult(
        plan.name, plan.spec.shape, int(state["objects"]), 0.0, {"skipped": 1.0}, "unchanged"
    )


def images(root: str) -> list[str]:
    """The complete images of the store at ``root`` that segpipe wrote, by name."""
    return [n for n, g in store.image_names(root).items() if image_state(g).get("complete") is True]


def orphans(root: str, names: set[str]) -> list[tuple[str, str]]:
    """Images of the store at ``root`` that segpipe wrote from an input not among
    ``names`` (deleted or renamed since): ``(name, the input it recorded)`` each."""
    out: list[tuple[str, str]] = []
    for name, group in store.image_names(root).items():
        if name in names:
            continue
        source = image_state(group).get("source")
        if isinstance(source, dict) and "path" in source:
            out.append((name, str(source["path"])))
    return out


def write_layout(root: str, inputs: Sequence[str]) -> None:
    """Say at the store's root what it holds, for viewers and OME-Zarr tools: a plate
    (`segpipe.io.plate`) when every complete image is a plate field, with the rows,
    columns and acquisitions of the plate the ``inputs`` came from; otherwise the
    collection's list of images (`segpipe.io.omezarr.write_collection`)."""
    names = images(root)
    if names and all(len(n.split("/")) == plate.DEPTH for n in names):
        source = next((r for p in inputs if (r := plate.plate_root(p)) is not None), None)
        plate.write_plate(root, names, source)
    else:
        omezarr.write_collection(root, names)


def prune(root: str, name: str) -> None:
    """Remove image ``name`` and everything segpipe keeps of it (`segpipe.image.owned`),
    only if segpipe wrote it."""
    group = storage.join(root, name)
    if "source" not in image_state(group):
        raise OutputConflictError(f"{group}: not an image segpipe wrote; left alone.")
    for path in owned(root, name):
        store.remove(path, root)

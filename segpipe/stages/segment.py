"""Stage segment: every block (with its halo) through the segmenter.

``segmenter.prepare(stats)`` turns the whole image's statistics into
parameters once; each task segments block + halo, keeps the core, renumbers
its objects 1..k, writes semantic labels and local ids, and leaves in its
marker the object count and its views toward each neighbour for the stitch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe import stitch
from segpipe.blocks import Block
from segpipe.deep import provenance
from segpipe.engine import Runner, gpu_resources, map_blocks, prepare_array
from segpipe.image import ImagePlan, ProgressFn, noop, where
from segpipe.io import omezarr, written
from segpipe.io.markers import Arrays, Markers
from segpipe.stages.statistics import filtered
from segpipe.stats import ImageStats

__all__ = ["Segmented", "dkey", "segment", "segment_block"]


def dkey(d: Sequence[int]) -> str:
    """The marker key of a block's view toward direction ``d``."""
    return "d" + "_".join(str(x).replace("-", "m") for x in d)


def segment_block(
    plan: ImagePlan,
    block: Block,
    params: dict[str, Any],
    directions: list[tuple[int, ...]],
    marker_dir: str,
) -> int:
    """Segment one block; write semantic and local labels, then a marker holding the
    object count, the block's view toward each neighbour (read by the pair tasks) and
    its provenance (worker, device, seconds, batch, network tiles)."""
    with written.recording() as files:
        count, arrays = _segment_block(plan, block, params, directions)
    Markers(marker_dir).save(block.id, arrays, run=plan.token, files=files)
    return count


def _segment_block(
    plan: ImagePlan, block: Block, params: dict[str, Any], directions: list[tuple[int, ...]]
) -> tuple[int, Arrays]:
    t0 = time.perf_counter()
    data = filtered(plan, block, plan.segment_halo)
    if getattr(plan.segmenter, "wants_origin", False):
        params = {**params, "origin": tuple(s.start for s in block.read)}
    if getattr(plan.segmenter, "wants_core", False):  # the block within what was read
        params = {**params, "core": block.core_in_read}
    result = plan.segmenter.segment(data, params)
    core = block.core_in_read
    if result.instances is None:
        raise ValueError(f"segmenter {plan.segmenter.name!r} returned no instances")
    semantic = (
        result.semantic[core] if result.semantic is not None else (result.instances[core] > 0)
    ).astype(np.uint8)
    local, full, count = stitch.sequential_core(
        result.instances, core, sequential=result.sequential
    )
    omezarr.write_block(plan.label("semantic"), block.core, semantic)
    omezarr.write_block(plan.local_labels, block.core, local)
    grid = plan.grid(plan.segment_halo)
    arrays: Arrays = {"count": np.array(count, np.int64)}
    for d in directions:
        other = grid.block(tuple(i + k for i, k in zip(block.index, d, strict=True)))
        if plan.segmenter.stitch == "faces":
            labels, classes = stitch.face_view(local, semantic, d)
            arrays[dkey(d) + "_l"], arrays[dkey(d) + "_s"] = labels, classes
        else:
            arrays[dkey(d) + "_v"] = stitch.overlap_view(full, block, other, plan.segment_halo)
    record = provenance.Record(
        worker=provenance.worker_address(),
        device=str(getattr(result, "device", "cpu")),
        seconds=time.perf_counter() - t0,
        batch=int(getattr(result, "batch", 1)),
        tiles=int(getattr(result, "tiles", 1)),
    )
    arrays.update(provenance.encode(record))
    return count, arrays


@dataclass(frozen=True)
class Segmented:
    counts: list[int]
    params: dict[str, Any]


def _count_in(a: Arrays) -> int:
    return int(a["count"])


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def segment(
    client: Runner, plan: ImagePlan, stats: ImageStats, progress: ProgressFn = noop
) -> Segmented:
    """Segment every block (with its halo): semantic + local labels, and in each block's
    marker its object count and its views toward its neighbours (for `stitch_ids`)."""
    params = dict(plan.segmenter.prepare(stats))
    tile = plan.grid().tile
    markers = plan.markers("segment")
    prepare_array(
        plan.label("semantic"),
        markers,
        shape=plan.spec.shape,
        chunks=tile,
        dtype=np.uint8,
        inner=plan.inner,
    )
    prepare_array(  # scratch; lz4 (1.4 + 0.9 ns/px) costs less than writing raw ids
        plan.local_labels,  # to new files (~3 ms/MiB on this VM's ext4)
        markers,
        shape=plan.spec.shape,
        chunks=tile,
        dtype=np.uint32,
    )
    grid = plan.grid(plan.segment_halo)
    blocks = list(grid)
    pairs = list(grid.neighbour_pairs())
    directions: dict[int, list[tuple[int, ...]]] = {b.id: [] for b in blocks}
    for a, b, d in pairs:
        directions[a.id].append(d)
        directions[b.id].append(tuple(-x for x in d))
    # segment_block writes its own marker (it holds the neighbour views), so it is
    # run without map_blocks' wrapper and its result read back as the count.
    todo = [b for b in blocks if not markers.done(b.id)]
    counts_todo = map_blocks(
        client,
        segment_block,
        [(plan, b, params, directions[b.id], str(markers.directory)) for b in todo],
        stage="segment",
        progress=lambda stage, done, total: progress(
            stage, done + len(blocks) - len(todo), len(blocks)
        ),
        names=[where(plan, b.core) for b in todo],
        resources=gpu_resources(client, plan.segmenter),
    )
    counts = [0] * len(blocks)
    computed = dict(zip((b.id for b in todo), counts_todo, strict=True))
    for b in blocks:
        counts[b.id] = computed[b.id] if b.id in computed else _count_in(markers.load(b.id))
    return Segmented(counts, {k: _plain(v) for k, v in params.items()})

"""Halo exchange for the filter pass.

The filter needs each block with a halo of a few pixels (the Gaussian's radius).
Read straight from the chunked image, that halo decodes the 3^n chunks around the
block: 9 for a 2D block, 15 ns/px for 1024² uint16 lz4 chunks against 1.8 for the
block's own chunk. Instead the ingest task, which holds each block in memory
anyway, saves its outer layers (`save_slabs`: the first and last ``halo`` layers
along each axis, a few KiB); the filter task reads its own chunk and takes its
halo from its neighbours' slabs (`assemble`). Missing slabs (a run resumed after
scratch was removed) fall back to the plain read.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe.blocks import Block, BlockGrid
from segpipe.io import omezarr, storage, written
from segpipe.io.markers import UNREADABLE, load_npz, save_npz
from segpipe.io.storage import Location, Where


def slab_path(directory: Where, block_id: int) -> Location:
    return storage.location(directory) / f"{block_id}.npz"


def _layers(n: int, width: int, last: bool) -> slice:
    return slice(n - width, n) if last else slice(0, width)


def save_slabs(directory: Where, block_id: int, core: NDArray[Any], halo: Sequence[int]) -> None:
    """Save the first and last ``halo[k]`` layers of a block's ``core`` along each axis
    ``k`` (``lo<k>``/``hi<k>``; fewer when the block is thinner), replacing any earlier
    file of the block atomically."""
    arrays: dict[str, NDArray[Any]] = {}
    for k, h in enumerate(halo):
        if h <= 0:
            continue
        w = min(h, core.shape[k])
        for name, last in (("lo", False), ("hi", True)):
            index = [slice(None)] * core.ndim
            index[k] = _layers(core.shape[k], w, last)
            arrays[f"{name}{k}"] = core[tuple(index)]
    path = slab_path(directory, block_id)
    written.note(path, stamp=save_npz(path, arrays))


def save_region_slabs(
    directory: Where,
    grid: BlockGrid,
    region: tuple[slice, ...],
    data: NDArray[Any],
    halo: Sequence[int],
) -> None:
    """`save_slabs` of every block of ``grid`` whose core lies in ``region`` (the tiles
    one ingest task read, held in ``data``), creating ``directory`` if needed."""
    ranges = [range(r.start // t, -(-r.stop // t)) for r, t in zip(region, grid.tile, strict=True)]
    for index in itertools.product(*ranges):
        block = grid.block(index)
        local = tuple(
            slice(c.start - r.start, c.stop - r.start)
            for c, r in zip(block.core, region, strict=True)
        )
        save_slabs(directory, block.id, data[local], halo)


def _direction_region(
    shape: Sequence[int], core: tuple[slice, ...], d: Sequence[int]
) -> tuple[slice, ...]:
    """Where the halo toward direction ``d`` lies in read-region coordinates."""
    return tuple(
        slice(0, c.start) if k < 0 else slice(c.stop, n) if k > 0 else c
        for n, c, k in zip(shape, core, d, strict=True)
    )


def assemble(src: str, grid: BlockGrid, block: Block, directory: Where) -> NDArray[Any] | None:
    """``block.read`` of the array at ``src``: its core read from ``src``, its halo taken
    from the neighbours' slabs. None where a slab is missing or too thin (tiles smaller
    than the halo): read the region instead."""
    shape = tuple(s.stop - s.start for s in block.read)
    core = block.core_in_read
    data = omezarr.read_block(src, block.core)
    out = np.empty(shape, data.dtype)
    out[core] = data
    for d in itertools.product((-1, 0, 1), repeat=len(shape)):
        target = _direction_region(shape, core, d)
        if not any(d) or any(s.stop <= s.start for s in target):
            continue  # the core itself, or no halo that way (image border, zero halo)
        neighbour = grid.block_id(tuple(i + k for i, k in zip(block.index, d, strict=True)))
        a = next(k for k, x in enumerate(d) if x)  # the slab along the first axis moved on
        key = f"hi{a}" if d[a] < 0 else f"lo{a}"
        try:
            with load_npz(slab_path(directory, neighbour)) as z:
                piece = z[key] if key in z.files else None
        except UNREADABLE:  # missing or damaged: read the region instead
            return None
        if piece is None:
            return None
        index = []
        for k, x in enumerate(d):
            w = target[k].stop - target[k].start
            if x == 0:
                index.append(slice(None))  # the neighbour's core spans ours along k
            elif w > piece.shape[k]:
                return None
            else:
                index.append(_layers(piece.shape[k], w, x < 0))
        piece = piece[tuple(index)]
        if piece.shape != tuple(s.stop - s.start for s in target):
            return None
        out[target] = piece
    return out

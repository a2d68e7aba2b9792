"""Block grid over an image: write regions aligned to chunks, read regions with a halo."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Region = tuple[slice, ...]
MIN_LEVEL_CHUNK = 256  # smallest Y/X chunk side of a pyramid level written from blocks


@dataclass(frozen=True)
class Block:
    """One unit of work: a deterministic id, a write region and a read region.

    ``core`` is the region whose result this block owns (and writes);
    ``read`` is ``core`` grown by the halo and clipped to the image.
    """

    index: tuple[int, ...]
    id: int
    core: Region
    read: Region

    @property
    def core_in_read(self) -> Region:
        """``core`` expressed in the coordinates of the read region."""
        return tuple(
            slice(c.start - r.start, c.stop - r.start)
            for c, r in zip(self.core, self.read, strict=True)
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.core)


def parse_per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Coerce an int or a per-axis sequence into one non-negative int per axis.

    Raises
    ------
    ValueError
        If the length does not match ``ndim`` or a value is negative.
    """
    if isinstance(value, bool | str):
        raise ValueError(f"Expected {name} as one int or {ndim} ints, got {value!r} instead.")
    if isinstance(value, int | np.integer):
        values = (int(value),) * ndim
    else:
        values = tuple(int(v) for v in value)
        if len(values) == 1:
            values = values * ndim
    if len(values) != ndim:
        raise ValueError(f"Expected {name} as one int or {ndim} ints, got {value!r} instead.")
    if any(v < 0 for v in values):
        raise ValueError(f"Expected non-negative {name}, got {value!r} instead.")
    return values


@dataclass(frozen=True)
class BlockGrid:
    """A regular grid of blocks of edge ``tile`` over ``shape``, with ``halo`` of context."""

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    halo: tuple[int, ...]

    @classmethod
    def build(
        cls, shape: Sequence[int], *, tile: int | Sequence[int], halo: int | Sequence[int] = 0
    ) -> BlockGrid:
        ndim = len(shape)
        tiles = parse_per_axis(tile, ndim, "tile")
        if any(t < 1 for t in tiles):
            raise ValueError(f"Expected tile >= 1, got {tile!r} instead.")
        # A tile larger than the image is one block along that axis.
        tiles = tuple(min(t, max(s, 1)) for t, s in zip(tiles, shape, strict=True))
        return cls(tuple(int(s) for s in shape), tiles, parse_per_axis(halo, ndim, "halo"))

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(-(-s // t) for s, t in zip(self.shape, self.tile, strict=True))

    def __len__(self) -> int:
        n = 1
        for g in self.grid_shape:
            n *= g
        return n

    def block_id(self, index: Sequence[int]) -> int:
        """Row-major id of the block at grid ``index``."""
        bid = 0
        for i, g in zip(index, self.grid_shape, strict=True):
            bid = bid * g + i
        return bid

    def block(self, index: Sequence[int]) -> Block:
        core = tuple(
            slice(i * t, min((i + 1) * t, s))
            for i, t, s in zip(index, self.tile, self.shape, strict=True)
        )
        read = tuple(
            slice(max(c.start - h, 0), min(c.stop + h, s))
            for c, h, s in zip(core, self.halo, self.shape, strict=True)
        )
        return Block(tuple(index), self.block_id(index), core, read)

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(g) for g in self.grid_shape)):
            yield self.block(index)

    def forward_neighbours(self, a: Block) -> list[tuple[Block, tuple[int, ...]]]:
        """The blocks touching ``a`` (faces, edges, corners) at a lexicographically
        positive offset, with that offset: each touching pair is one block's forward
        neighbour exactly once."""
        ndim = len(self.shape)
        grid = self.grid_shape
        out = []
        for d in itertools.product((-1, 0, 1), repeat=ndim):
            if not any(d) or next(x for x in d if x) < 0:
                continue
            j = tuple(i + o for i, o in zip(a.index, d, strict=True))
            if all(0 <= x < g for x, g in zip(j, grid, strict=True)):
                out.append((self.block(j), d))
        return out

    def neighbour_pairs(self) -> Iterator[tuple[Block, Block, tuple[int, ...]]]:
        """Each pair of blocks that touch (faces, edges, corners) once, with their offset,
        grouped by the first block in block order."""
        for a in self:
            for b, d in self.forward_neighbours(a):
                yield a, b, d


VIEW_SIZE = 256
"""A viewer's tile: a volume's pyramid goes on until every axis fits in it."""


@dataclass(frozen=True)
class Pyramid:
    """The levels of an image's pyramids: each level's step per axis from the level
    below (1 kept, 2 halved, every second pixel), level 0 first (all 1).

    Y and X are halved together while the larger exceeds the size the pyramid stops
    at; a volume's Z is halved while it exceeds that size, so thin stacks keep their
    planes and deep ones shrink in Z too (anisotropic). Planes stop at the tile (one
    tile is one chunk, read whole), volumes at `VIEW_SIZE` (a volume's chunk is read
    for every plane a viewer shows).
    """

    steps: tuple[tuple[int, ...], ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, shape: Sequence[int], tile: Sequence[int]) -> Pyramid:
        """The pyramid of an image of ``shape`` in blocks of ``tile``.

        Examples
        --------
        >>> Pyramid.build((1000, 1000), (256, 256)).shapes
        ((1000, 1000), (500, 500), (250, 250))
        >>> Pyramid.build((24, 512, 512), (24, 512, 512)).steps
        ((1, 1, 1), (1, 2, 2))
        >>> Pyramid.build((1000, 900, 800), (256, 256, 256)).shapes[-1]
        (250, 225, 200)
        """
        ndim = len(shape)
        stop = max(VIEW_SIZE, min(tile[-2:])) if ndim == 2 else VIEW_SIZE
        steps = [(1,) * ndim]
        shapes = [tuple(int(n) for n in shape)]
        while True:
            cur = shapes[-1]
            plane = 2 if max(cur[-2:]) > stop else 1
            deep = 2 if ndim == 3 and cur[0] > stop else 1
            step = (deep, plane, plane)[3 - ndim :]
            if max(step) == 1:
                break
            steps.append(step)
            shapes.append(tuple(-(-n // s) for n, s in zip(cur, step, strict=True)))
        return cls(tuple(steps), tuple(shapes))

    def __len__(self) -> int:
        return len(self.steps)

    def factor(self, level: int) -> tuple[int, ...]:
        """Level 0 pixels per level ``level`` pixel, per axis."""
        out = [1] * len(self.steps[0])
        for step in self.steps[1 : level + 1]:
            out = [f * s for f, s in zip(out, step, strict=True)]
        return tuple(out)

    def region(self, region: Region, level: int) -> Region:
        """``region`` of level 0 at level ``level`` (its start a multiple of the factor)."""
        return tuple(
            slice(s.start // f, -(-s.stop // f))
            for s, f in zip(region, self.factor(level), strict=True)
        )

    def pass_levels(self, tile: Sequence[int]) -> int:
        """How many levels above 0 the relabel pass writes from its blocks
        (`segpipe.stages.write`).

        Level k is written there when a block's every factor-th pixel is exactly one
        chunk of it (the tile divisible by the factor) and that chunk is at least
        `MIN_LEVEL_CHUNK` a side in Y and X (any size for level 1); the pyramid tasks
        build the levels above.

        Examples
        --------
        >>> Pyramid.build((8192, 8192), (2048, 2048)).pass_levels((2048, 2048))
        2
        >>> Pyramid.build((8192, 8192), (100, 100)).pass_levels((100, 100))
        1
        """
        k = 0
        while k + 1 < len(self):
            factor = self.factor(k + 1)
            if any(t % f for t, f in zip(tile, factor, strict=True)):
                break
            side = min(t // f for t, f in zip(tile[-2:], factor[-2:], strict=True))
            if k > 0 and side < MIN_LEVEL_CHUNK:
                break
            k += 1
        return k

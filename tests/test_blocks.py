"""BlockGrid: cores tile the image once, reads are core + halo, ids and neighbours are exact."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.blocks import BlockGrid, parse_per_axis

# No example database: it would leave an untracked .hypothesis/ in the checkout.
SETTINGS = settings(max_examples=150, deadline=None, database=None, derandomize=True)


@st.composite
def grids(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(shape, tile, halo) with 1..3 axes; tiles may exceed the image."""
    ndim = draw(st.integers(1, 3))
    size = st.integers(1, 13 if ndim < 3 else 7)
    shape = tuple(draw(size) for _ in range(ndim))
    tile = tuple(draw(st.integers(1, 16)) for _ in range(ndim))
    halo = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
    return shape, tile, halo


def touching_pairs_brute_force(grid: BlockGrid) -> set[frozenset[int]]:
    """Pairs of distinct blocks whose closed core boxes intersect (face, edge or corner)."""
    blocks = list(grid)
    pairs = set()
    for a, b in itertools.combinations(blocks, 2):
        if all(
            ca.start <= cb.stop and cb.start <= ca.stop
            for ca, cb in zip(a.core, b.core, strict=True)
        ):
            pairs.add(frozenset((a.id, b.id)))
    return pairs


# -- coverage and regions --------------------------------------------------


@SETTINGS
@given(grids())
def test_cores_cover_the_image_exactly_once(case: tuple) -> None:
    shape, tile, halo = case
    grid = BlockGrid.build(shape, tile=tile, halo=halo)
    cover = np.zeros(shape, np.int64)
    for block in grid:
        assert all(0 < n <= t for n, t in zip(block.shape, tile, strict=True))
        cover[block.core] += 1
    assert (cover == 1).all()


@SETTINGS
@given(grids())
def test_read_is_core_grown_by_halo_and_clipped(case: tuple) -> None:
    shape, tile, halo = case
    grid = BlockGrid.build(shape, tile=tile, halo=halo)
    image = np.arange(np.prod(shape)).reshape(shape)
    for block in grid:
        for c, r, h, n in zip(block.core, block.read, halo, shape, strict=True):
            # Every in-bounds position within h of the core, and nothing else.
            expected = [p for p in range(n) if c.start - h <= p < c.stop + h]
            assert list(range(r.start, r.stop)) == expected
        # core_in_read addresses the core's pixels inside the read array.
        assert np.array_equal(image[block.read][block.core_in_read], image[block.core])


def test_hand_computed_2d_grid() -> None:
    grid = BlockGrid.build((5, 7), tile=(2, 3), halo=1)
    assert grid.tile == (2, 3)
    assert grid.grid_shape == (3, 3)
    assert len(grid) == 9
    last = grid.block((2, 2))
    assert last.core == (slice(4, 5), slice(6, 7))
    assert last.read == (slice(3, 5), slice(5, 7))
    middle = grid.block((1, 1))
    assert middle.core == (slice(2, 4), slice(3, 6))
    assert middle.read == (slice(1, 5), slice(2, 7))
    assert middle.core_in_read == (slice(1, 3), slice(1, 4))


def test_tile_larger_than_image_is_one_block_along_that_axis() -> None:
    grid = BlockGrid.build((4, 9), tile=(100, 4), halo=(3, 0))
    assert grid.tile == (4, 4)
    assert grid.grid_shape == (1, 3)
    assert [b.core[0] for b in grid] == [slice(0, 4)] * 3
    assert [b.read[0] for b in grid] == [slice(0, 4)] * 3


# -- ids -----------------------------------------------------------------------


@SETTINGS
@given(grids())
def test_block_ids_are_row_major_and_deterministic(case: tuple) -> None:
    shape, tile, halo = case
    grid = BlockGrid.build(shape, tile=tile, halo=halo)
    blocks = list(grid)
    expected_grid = tuple(-(-s // min(t, s)) for s, t in zip(shape, tile, strict=True))
    assert grid.grid_shape == expected_grid
    assert len(blocks) == len(grid) == int(np.prod(expected_grid))
    assert [b.id for b in blocks] == list(range(len(blocks)))
    # Iteration is row-major: indices in lexicographic order, ids as NumPy ravels them.
    assert [b.index for b in blocks] == sorted(b.index for b in blocks)
    for b in blocks:
        assert b.id == np.ravel_multi_index(b.index, expected_grid)
        assert grid.block(b.index) == b
        assert grid.block_id(b.index) == b.id
    # The same parameters give the same blocks, whoever builds them.
    assert list(BlockGrid.build(shape, tile=tile, halo=halo)) == blocks


def test_hand_computed_ids_3d() -> None:
    grid = BlockGrid.build((4, 6, 6), tile=(2, 3, 2))
    assert grid.grid_shape == (2, 2, 3)
    assert grid.block_id((0, 0, 2)) == 2
    assert grid.block_id((0, 1, 0)) == 3
    assert grid.block_id((1, 0, 0)) == 6
    assert grid.block_id((1, 1, 2)) == 11


# -- neighbours ------------------------------------------------------------


@SETTINGS
@given(grids())
def test_neighbour_pairs_match_brute_force(case: tuple) -> None:
    shape, tile, halo = case
    grid = BlockGrid.build(shape, tile=tile, halo=halo)
    found = list(grid.neighbour_pairs())
    keys = [frozenset((a.id, b.id)) for a, b, _ in found]
    assert len(keys) == len(set(keys)), "a pair was yielded twice"
    assert set(keys) == touching_pairs_brute_force(grid)
    for a, b, d in found:
        assert a.id != b.id
        assert d == tuple(j - i for i, j in zip(a.index, b.index, strict=True))
        assert set(d) <= {-1, 0, 1} and any(d)
        assert b == grid.block(b.index)


@pytest.mark.parametrize(
    ("grid_shape", "expected"),
    [
        ((1,), 0),
        ((5,), 4),
        ((3, 3), 20),  # 12 faces + 8 diagonals
        ((2, 2, 2), 28),  # every pair of the 8 blocks touches
        ((3, 3, 3), 158),  # 54 faces + 72 edges + 32 corners
    ],
)
def test_neighbour_pair_counts(grid_shape: tuple[int, ...], expected: int) -> None:
    grid = BlockGrid.build(grid_shape, tile=1)
    assert len(list(grid.neighbour_pairs())) == expected


def test_neighbour_pairs_include_anti_diagonal() -> None:
    grid = BlockGrid.build((4, 4), tile=2)
    pairs = {(a.index, b.index, d) for a, b, d in grid.neighbour_pairs()}
    assert ((0, 1), (1, 0), (1, -1)) in pairs
    assert ((0, 0), (1, 1), (1, 1)) in pairs
    assert len(pairs) == 6


# -- option parsing --------------------------------------------------------


def test_parse_per_axis_broadcasts() -> None:
    assert parse_per_axis(3, 3, "tile") == (3, 3, 3)
    assert parse_per_axis([4], 2, "tile") == (4, 4)
    assert parse_per_axis((1, 2, 0), 3, "halo") == (1, 2, 0)


@pytest.mark.parametrize(
    ("value", "ndim", "message"),
    [
        ((1, 2), 3, r"Expected tile as one int or 3 ints, got \(1, 2\) instead\."),
        ((1, 2, 3, 4), 3, r"Expected tile as one int or 3 ints, got \(1, 2, 3, 4\) instead\."),
        ([], 2, r"Expected tile as one int or 2 ints, got \[\] instead\."),
        (-1, 2, r"Expected non-negative tile, got -1 instead\."),
        ((2, -3), 2, r"Expected non-negative tile, got \(2, -3\) instead\."),
    ],
)
def test_parse_per_axis_errors(value: object, ndim: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_per_axis(value, ndim, "tile")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 0}, r"Expected tile >= 1, got 0 instead\."),
        ({"tile": (4, 0)}, r"Expected tile >= 1, got \(4, 0\) instead\."),
        ({"tile": 4, "halo": -1}, r"Expected non-negative halo, got -1 instead\."),
        ({"tile": (4, 4, 4)}, r"Expected tile as one int or 2 ints"),
        ({"tile": 4, "halo": (1, 1, 1)}, r"Expected halo as one int or 2 ints"),
    ],
)
def test_build_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlockGrid.build((8, 8), **kwargs)

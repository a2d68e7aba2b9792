"""The streaming merge against `stitch.global_ids`, and its memory at 10⁴ and 10⁵ blocks."""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe import stitch
from segpipe.blocks import BlockGrid
from segpipe.merge import EdgeTable, MergedIds, merge_ids, reach


def _assert_same(got: MergedIds, counts: list[int], edges: list[EdgeTable]) -> None:
    ref = stitch.global_ids(counts, edges)
    assert got.count == ref.count
    assert got.dtype == ref.dtype
    for b in range(len(counts)):
        lut = got.block_lut(b)
        want = ref.block_lut(b)
        assert lut.dtype == want.dtype
        np.testing.assert_array_equal(lut, want, err_msg=f"block {b}")


def test_u_shape_joined_rows_below_gets_one_id(tmp_path: Path) -> None:
    # 4 rows x 3 columns of blocks, one object per block. Left arm: column 0, right
    # arm: column 2, both from row 0; they meet only in row 3 (through column 1).
    # Block (0, 1) holds a separate object numbered between the arms.
    grid = (4, 3)
    counts = [1] * 12
    one = np.array([[1, 1]])
    edges: list[EdgeTable] = [
        (0, 3, one),
        (2, 5, one),
        (3, 6, one),
        (5, 8, one),
        (6, 9, one),
        (8, 11, one),
        (9, 10, one),
        (10, 11, one),
    ]
    ids = merge_ids(grid, counts, iter(edges), tmp_path, batch=3)
    luts = [ids.block_lut(b)[1] for b in range(12)]
    assert luts[0] == luts[2] == luts[11] == 1  # both arms: one object, the first id
    assert luts[1] == 2  # the object between the arms comes next
    assert ids.count == 4  # the U, and blocks 1, 4 and 7 alone
    _assert_same(ids, counts, edges)


def test_documented_example_and_empty_blocks(tmp_path: Path) -> None:
    ids = merge_ids((1, 2), [2, 1], [(0, 1, np.array([[2, 1]]))], tmp_path / "a")
    assert ids.count == 2
    assert ids.block_lut(0).tolist() == [0, 1, 2]
    assert ids.block_lut(1).tolist() == [0, 2]
    empty = merge_ids((2, 2), [0, 0, 0, 0], [], tmp_path / "b")
    assert empty.count == 0
    assert [lut.tolist() for lut in empty.luts()] == [[0]] * 4


def test_rejects_out_of_order_far_and_unknown_ids(tmp_path: Path) -> None:
    one = np.array([[1, 1]])
    with pytest.raises(ValueError, match="block order"):
        merge_ids((3, 3), [1] * 9, [(4, 5, one), (0, 1, one)], tmp_path / "a", batch=1)
    with pytest.raises(ValueError, match="do not touch"):
        merge_ids((4, 4), [1] * 16, [(0, 15, one)], tmp_path / "b", batch=1)
    with pytest.raises(ValueError, match=r"local ids must lie in 1\.\.1"):
        merge_ids((2, 2), [1] * 4, [(0, 1, np.array([[1, 2]]))], tmp_path / "c")
    with pytest.raises(ValueError, match="counts for 4 blocks"):
        merge_ids((2, 2), [1] * 3, [], tmp_path / "d")


@st.composite
def _cases(draw: st.DrawFn) -> tuple[tuple[int, ...], list[int], list[EdgeTable], int]:
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, 6 if ndim == 2 else 4)) for _ in range(ndim))
    grid = BlockGrid.build(shape, tile=1)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, len(grid)).tolist()
    # a few long objects: each joins the same local id through many blocks
    density = draw(st.floats(0.0, 1.0))
    edges: list[EdgeTable] = []
    for a, b, _ in grid.neighbour_pairs():
        na, nb = counts[a.id], counts[b.id]
        if na and nb and rng.random() < density:
            k = int(rng.integers(1, 4))
            pairs = np.stack([rng.integers(1, na + 1, k), rng.integers(1, nb + 1, k)], axis=1)
            edges.append((a.id, b.id, pairs))
    batch = draw(st.integers(1, 12))
    return grid.grid_shape, counts, edges, batch


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_equals_stitch_global_ids_on_random_grids(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[tuple[int, ...], list[int], list[EdgeTable], int],
) -> None:
    grid, counts, edges, batch = case
    work = tmp_path_factory.mktemp("merge")
    _assert_same(merge_ids(grid, counts, iter(edges), work, batch=batch), counts, edges)
    # counts as a function, tables with a > b (reversed pairs): same ids
    flipped = [(b, a, e[:, ::-1]) for a, b, e in edges]
    got = merge_ids(grid, lambda b: counts[b], iter(flipped), work / "f", batch=batch)
    _assert_same(got, counts, edges)


# -- scale: synthetic face tables of a (rows, 316) grid ---------------------------


def _count(b: int) -> int:
    return 3 + (b * 7919) % 3


def _faces(rows: int, cols: int) -> Iterator[EdgeTable]:
    """A few objects across each face: local 1 of every fifth column chains through all
    rows (long objects), and the bottom row joins every column's local 1 (U shapes that
    close only in the last row); local 2/3 cross some faces and corners."""
    for r in range(rows):
        for c in range(cols):
            a = r * cols + c
            h = (a * 2654435761) % 97
            if c + 1 < cols:
                right = [(2, 3)] if h < 40 else []
                if r == rows - 1:
                    right.append((1, 1))
                if right:
                    yield a, a + 1, np.array(right, np.int64)
            if r + 1 < rows:
                down = [(1, 1)] if c % 5 == 0 else []
                if h % 3:
                    down.append((3, 2))
                if down:
                    yield a, a + cols, np.array(down, np.int64)
                if c + 1 < cols and h > 90:
                    yield a, a + cols + 1, np.array([[2, 2]], np.int64)


def _merge_peak(rows: int, cols: int, work: Path) -> tuple[int, int]:
    """(object count, tracemalloc peak in bytes) of merging and reading every LUT."""
    gc.collect()
    tracemalloc.start()
    try:
        ids = merge_ids((rows, cols), _count, _faces(rows, cols), work)
        for lut in ids.luts():
            assert lut[0] == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return ids.count, peak


def test_synthetic_faces_equal_stitch(tmp_path: Path) -> None:
    rows, cols = 16, 316  # the width of the scale test below
    counts = [_count(b) for b in range(rows * cols)]
    edges = list(_faces(rows, cols))
    _assert_same(merge_ids((rows, cols), counts, iter(edges), tmp_path), counts, edges)


def _warm(tmp_path: Path) -> None:
    # first calls import and cache (NumPy's ufunc.at, zipfile): not the merge's memory
    merge_ids((4, 4), _count, _faces(4, 4), tmp_path / "warm").remove()


BOUND = 2 * 2**20  # bytes: the frontier of 316 columns, whatever the number of rows


def _peak_in_fresh_process(rows: int, cols: int, work: Path) -> tuple[int, int]:
    # A fresh interpreter per size: the rest of a test session (its garbage, caches
    # and allocator state) must not count towards either size's peak.
    code = (
        "import sys; from pathlib import Path; from tests import test_merge as t; "
        "t._warm(Path(sys.argv[3])); "
        "print(*t._merge_peak(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]) / 'm'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(rows), str(cols), str(work)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    count, peak = done.stdout.split()
    return int(count), int(peak)


def test_memory_is_bounded_by_the_frontier_10k_to_100k(tmp_path: Path) -> None:
    _, small = _peak_in_fresh_process(32, 316, tmp_path / "small")  # 10 112 blocks
    count, large = _peak_in_fresh_process(316, 316, tmp_path / "large")  # 99 856 blocks
    print(f"merge peak: 10^4 blocks {small / 2**20:.3f} MiB, 10^5 {large / 2**20:.3f} MiB")
    assert count > 0
    assert small < BOUND and large < BOUND
    assert large < 1.3 * small, (small, large)


def test_reach_is_the_largest_neighbour_offset() -> None:
    for shape in [(5, 7), (3, 4, 6)]:
        grid = BlockGrid.build(shape, tile=1)
        assert reach(grid.grid_shape) == max(b.id - a.id for a, b, _ in grid.neighbour_pairs())


def test_one_block_is_its_own_numbering_without_files(tmp_path: Path) -> None:
    """A grid of one block: ids 1..n map to themselves, as `global_ids` gives, and no
    file is written; a link is refused (no block has a neighbour)."""
    ids = merge_ids((1, 1), [3], [], tmp_path / "one")
    want = stitch.global_ids([3], [])
    assert ids.count == want.count == 3
    assert ids.block_lut(0).tolist() == want.block_lut(0).tolist() == [0, 1, 2, 3]
    assert ids.block_lut(0).dtype == np.uint32
    ids.remove()
    assert ids.block_lut(0).tolist() == [0, 1, 2, 3]
    assert not (tmp_path / "one").exists()
    assert merge_ids((1,), [0], [], tmp_path / "empty").block_lut(0).tolist() == [0]
    with pytest.raises(ValueError, match="do not touch"):
        merge_ids((1, 1), [2], [(0, 0, np.array([[1, 2]]))], tmp_path / "bad")

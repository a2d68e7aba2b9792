"""Stitching: face/overlap edges on hand-made cases, global ids, and the blockwise-label oracle.

The oracle follows dask-image's test of ``label``: label each block on its own,
join the blocks through their faces, and compare with scikit-image's label of
the whole image, up to renumbering, over many chunkings.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import label

from segpipe.blocks import BlockGrid
from segpipe.stitch import (
    GlobalIds,
    face_edges,
    face_view,
    global_ids,
    overlap_edges,
    sequential_core,
)

SETTINGS = settings(max_examples=120, deadline=None, database=None, derandomize=True)


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """Same background, and a bijection between the nonzero labels of ``a`` and ``b``."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    fa, fb = a[a != 0].astype(np.int64), b[b != 0].astype(np.int64)
    pairs = np.unique(np.stack([fa, fb], axis=1), axis=0)
    return len(pairs) == len(np.unique(fa)) == len(np.unique(fb))


def stitched_label(semantic: np.ndarray, tile: int | tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Label ``semantic`` block by block and stitch through faces, as the pipeline does."""
    ndim = semantic.ndim
    grid = BlockGrid.build(semantic.shape, tile=tile)
    local: dict[int, np.ndarray] = {}
    counts = []
    for b in grid:
        block = semantic[b.core]
        labels, _, count = sequential_core(
            label(block, background=0, connectivity=ndim), (slice(None),) * ndim
        )
        local[b.id] = labels
        counts.append(count)
    edges = []
    for a, b, d in grid.neighbour_pairs():
        back = tuple(-x for x in d)
        va = face_view(local[a.id], semantic[a.core], d)
        vb = face_view(local[b.id], semantic[b.core], back)
        edges.append((a.id, b.id, face_edges(va, vb, d)))
    ids = global_ids(counts, edges)
    out = np.zeros(semantic.shape, ids.dtype)
    for b in grid:
        out[b.core] = ids.block_lut(b.id)[local[b.id]]
    return out, ids.count


def check_against_whole_image(semantic: np.ndarray, tile: int | tuple[int, ...]) -> None:
    expected = label(semantic, background=0, connectivity=semantic.ndim)
    got, count = stitched_label(semantic, tile)
    assert same_up_to_renumbering(got, expected)
    assert count == expected.max()
    # Global ids are consecutive from 1.
    np.testing.assert_array_equal(np.unique(got[got > 0]), np.arange(1, count + 1))


# -- the helper itself --------------------------------------------------------------


def test_same_up_to_renumbering() -> None:
    a = np.array([[1, 1, 0], [0, 2, 2]])
    assert same_up_to_renumbering(a, np.array([[7, 7, 0], [0, 3, 3]]))
    assert not same_up_to_renumbering(a, np.array([[1, 1, 0], [0, 1, 1]]))  # merged
    assert not same_up_to_renumbering(a, np.array([[1, 2, 0], [0, 3, 3]]))  # split
    assert not same_up_to_renumbering(a, np.array([[1, 1, 0], [4, 2, 2]]))  # background
    assert not same_up_to_renumbering(a, a[:, :2])  # shape


# -- sequential_core ------------------------------------------------------------------


def test_sequential_core_renumbers_core_objects_in_id_order() -> None:
    labels = np.array(
        [
            [9, 0, 4, 4],
            [0, 7, 7, 0],
            [2, 0, 0, 5],
        ]
    )
    core = (slice(1, 3), slice(1, 4))  # holds ids 7 and 5
    core_labels, full, count = sequential_core(labels, core)
    assert count == 2
    np.testing.assert_array_equal(core_labels, [[2, 2, 0], [0, 0, 1]])
    # Objects only in the halo (9, 4, 2) become background.
    np.testing.assert_array_equal(full, [[0, 0, 0, 0], [0, 2, 2, 0], [0, 0, 0, 1]])
    assert core_labels.dtype == np.uint32


@SETTINGS
@given(
    shape=st.sampled_from([(17, 23), (6, 9, 11)]),
    classes=st.integers(1, 3),
    density=st.floats(0.2, 0.8),
    seed=st.integers(0, 2**16),
)
def test_connected_component_labels_keep_their_promise_of_sequential_ids(
    shape: tuple[int, ...], classes: int, density: float, seed: int
) -> None:
    """The segmenters that say ``sequential=True`` label with `label_classes`: its ids
    must be exactly 1..max, so skipping the count gives what counting gives."""
    from segpipe.segmenters.threshold import label_classes

    rng = np.random.default_rng(seed)
    semantic = np.where(rng.random(shape) < density, rng.integers(1, classes + 1, shape), 0)
    labels = label_classes(semantic.astype(np.uint8))
    present = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(present, np.arange(1, int(labels.max(initial=0)) + 1))
    whole = tuple(slice(0, n) for n in shape)
    fast = sequential_core(labels, whole, sequential=True)
    counted = sequential_core(labels, whole)
    assert fast[2] == counted[2]
    np.testing.assert_array_equal(fast[0], counted[0])
    assert fast[0].dtype == np.uint32


# -- face_view / face_edges -----------------------------------------------------------


def test_face_view_slabs() -> None:
    labels = np.arange(20, dtype=np.uint32).reshape(4, 5)
    semantic = np.ones((4, 5), np.uint8)
    assert face_view(labels, semantic, (1, 0))[0].tolist() == [[15, 16, 17, 18, 19]]
    assert face_view(labels, semantic, (-1, 0))[0].tolist() == [[0, 1, 2, 3, 4]]
    assert face_view(labels, semantic, (0, 1))[0].tolist() == [[4], [9], [14], [19]]
    assert face_view(labels, semantic, (0, -1))[0].tolist() == [[0], [5], [10], [15]]
    assert face_view(labels, semantic, (1, 1))[0].tolist() == [[19]]
    assert face_view(labels, semantic, (1, -1))[0].tolist() == [[15]]
    assert face_view(labels, semantic, (-1, 1))[0].tolist() == [[4]]
    assert face_view(labels, semantic, (-1, -1))[0].tolist() == [[0]]
    view, classes = face_view(labels, semantic, (1, 0))
    assert classes.shape == view.shape == (1, 5)
    view[...] = 0  # a view is a copy: the block's labels are untouched
    assert labels[3, 0] == 15


def _edges(
    a: np.ndarray,
    b: np.ndarray,
    d: tuple[int, ...],
    sa: np.ndarray | None = None,
    sb: np.ndarray | None = None,
) -> set[tuple[int, int]]:
    """face_edges between blocks A and B = A + d, given their whole core labels."""
    sa = (a > 0).astype(np.uint8) if sa is None else sa
    sb = (b > 0).astype(np.uint8) if sb is None else sb
    back = tuple(-x for x in d)
    e = face_edges(face_view(a, sa, d), face_view(b, sb, back), d)
    assert e.dtype == np.int64 and e.shape[1:] == (2,)
    pairs = {(int(x), int(y)) for x, y in e}
    assert len(pairs) == len(e), "duplicate edges"
    return pairs


def test_face_edges_2d_face_with_diagonal_contact() -> None:
    # A is left of B (d = (0, 1)): A's last column against B's first column.
    a = np.array([[0, 1], [0, 0], [0, 2], [0, 2]], np.uint32)
    b = np.array([[0, 0], [3, 0], [0, 0], [4, 0]], np.uint32)
    # A(0,1)=1 touches B(1,0)=3 diagonally; A(2,1)=2 touches B(1,0)=3 diagonally
    # and B(3,0)=4 diagonally; A(3,1)=2 touches B(3,0)=4 directly.
    assert _edges(a, b, (0, 1)) == {(1, 3), (2, 3), (2, 4)}


def test_face_edges_2d_vertical_face_no_contact() -> None:
    # A above B (d = (1, 0)); ids two columns apart do not touch.
    a = np.array([[0, 0, 0, 0], [5, 0, 0, 0]], np.uint32)
    b = np.array([[0, 0, 6, 0], [0, 0, 0, 0]], np.uint32)
    assert _edges(a, b, (1, 0)) == set()
    b[0, 1] = 7
    assert _edges(a, b, (1, 0)) == {(5, 7)}


def test_face_edges_class_mismatch() -> None:
    a = np.array([[1, 2]], np.uint32)
    b = np.array([[3, 4]], np.uint32)
    sa = np.array([[1, 2]], np.uint8)
    sb = np.array([[2, 2]], np.uint8)
    # d = (1, 0): every pixel of A's bottom row touches B's top row pixels in reach.
    # Only class-2 pairs link: A's 2 with B's 3 and 4; A's 1 (class 1) links nothing.
    assert _edges(a, b, (1, 0), sa, sb) == {(2, 3), (2, 4)}
    assert _edges(a, b, (1, 0), sa, np.array([[3, 3]], np.uint8)) == set()


def test_face_edges_2d_corner_only() -> None:
    a = np.zeros((3, 3), np.uint32)
    b = np.zeros((3, 3), np.uint32)
    a[2, 2], b[0, 0] = 8, 9
    assert _edges(a, b, (1, 1)) == {(8, 9)}
    # Anything but the two corner pixels is out of reach across a corner.
    a[2, 2], a[2, 1], a[1, 2] = 0, 8, 8
    assert _edges(a, b, (1, 1)) == set()


def test_face_edges_2d_anti_diagonal_corner() -> None:
    # A at grid (0, 1), B at (1, 0): d = (1, -1); A's bottom-left meets B's top-right.
    a = np.zeros((2, 2), np.uint32)
    b = np.zeros((2, 2), np.uint32)
    a[1, 0], b[0, 1] = 3, 4
    assert _edges(a, b, (1, -1)) == {(3, 4)}
    a[1, 0], a[1, 1] = 0, 3
    assert _edges(a, b, (1, -1)) == set()


def test_face_edges_3d_face_edge_and_corner() -> None:
    a = np.zeros((4, 4, 3), np.uint32)
    b = np.zeros((4, 4, 3), np.uint32)
    # Face d = (0, 0, 1): A's x=2 plane against B's x=0 plane; contact at (z±1, y±1).
    a[0, 0, 2], b[1, 1, 0] = 1, 2  # diagonal in (z, y): touching
    a[3, 3, 2], b[3, 1, 0] = 3, 4  # two apart in y from each other, far from 1 and 2
    assert _edges(a, b, (0, 0, 1)) == {(1, 2)}
    b[2, 2, 0] = 5  # diagonal to A's 3 only
    assert _edges(a, b, (0, 0, 1)) == {(1, 2), (3, 5)}

    # Edge d = (1, 1, 0): the line A[2, 2, :] against B[0, 0, :].
    a = np.zeros((3, 3, 3), np.uint32)
    b = np.zeros((3, 3, 3), np.uint32)
    a[2, 2, 0], b[0, 0, 1] = 5, 6  # x differs by 1: touching
    a[2, 1, 2], b[0, 0, 2] = 7, 8  # A's voxel is not on the edge line
    assert _edges(a, b, (1, 1, 0)) == {(5, 6)}

    # Corner d = (1, -1, 1): A's (2, 0, 2) against B's (0, 2, 0) only.
    a = np.zeros((3, 3, 3), np.uint32)
    b = np.zeros((3, 3, 3), np.uint32)
    a[2, 0, 2], b[0, 2, 0] = 9, 10
    a[2, 1, 2] = 11
    assert _edges(a, b, (1, -1, 1)) == {(9, 10)}


# -- overlap_edges ------------------------------------------------------------------


def test_overlap_edges_iou_rule() -> None:
    va = np.array([1, 1, 1, 1, 0, 0, 2, 2], np.uint32)
    vb = np.array([5, 5, 5, 0, 0, 6, 6, 6], np.uint32)
    # (1, 5): 3 / (4 + 3 - 3) = 0.75; (2, 6): 2 / (2 + 3 - 2) = 0.67.
    assert overlap_edges(va, vb).tolist() == [[1, 5], [2, 6]]
    assert overlap_edges(va, vb, iou=0.7).tolist() == [[1, 5]]


def test_overlap_edges_half_is_not_enough() -> None:
    # IoU exactly 0.5 does not link: 1 / (2 + 1 - 1).
    assert overlap_edges(np.array([1, 1, 0]), np.array([2, 0, 0])).shape == (0, 2)
    # One object of A split evenly by two of B: neither pair passes.
    assert overlap_edges(np.array([1, 1, 1, 1]), np.array([2, 2, 3, 3])).shape == (0, 2)
    # Split unevenly: 3 / 5 = 0.6 links, 2 / 5 = 0.4 does not.
    assert overlap_edges(np.array([1, 1, 1, 1, 1]), np.array([2, 2, 2, 3, 3])).tolist() == [[1, 2]]


def test_overlap_edges_2d_and_no_overlap() -> None:
    va = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], np.uint32)
    vb = np.array([[0, 4, 4], [0, 4, 4], [0, 0, 0]], np.uint32)
    # 2 / (4 + 4 - 2) = 1/3.
    assert overlap_edges(va, vb).shape == (0, 2)
    vb = np.array([[4, 4, 0], [4, 4, 4], [0, 0, 0]], np.uint32)
    assert overlap_edges(va, vb).tolist() == [[1, 4]]  # 4 / 5
    assert overlap_edges(va, np.zeros_like(va)).shape == (0, 2)


# -- global_ids ----------------------------------------------------------------


def test_global_ids_hand_computed() -> None:
    # Provisional ids: block 0 -> 0, 1; block 1 -> 2, 3, 4; block 2 -> 5.
    counts = [2, 3, 1]
    edges = [
        (0, 1, np.array([[2, 1]], np.int64)),
        (1, 2, np.array([[3, 1]], np.int64)),
        (0, 2, np.zeros((0, 2), np.int64)),
    ]
    ids = global_ids(counts, edges)
    assert ids.count == 4
    assert ids.dtype == np.uint32
    assert ids.block_lut(0).tolist() == [0, 1, 2]
    assert ids.block_lut(1).tolist() == [0, 2, 3, 4]
    assert ids.block_lut(2).tolist() == [0, 4]
    assert ids.block_lut(1).dtype == np.uint32


def test_global_ids_without_edges_and_empty_blocks() -> None:
    ids = global_ids([2, 0, 1], [])
    assert ids.count == 3
    assert ids.block_lut(0).tolist() == [0, 1, 2]
    assert ids.block_lut(1).tolist() == [0]
    assert ids.block_lut(2).tolist() == [0, 3]
    empty = global_ids([0, 0], [(0, 1, np.zeros((0, 2), np.int64))])
    assert empty.count == 0
    assert empty.block_lut(1).tolist() == [0]


def test_global_ids_chain_across_many_blocks() -> None:
    # 50 blocks of 2 ids; id 2 of each block is id 1 of the next.
    n = 50
    counts = [2] * n
    edges = [(i, i + 1, np.array([[2, 1]], np.int64)) for i in range(n - 1)]
    ids = global_ids(counts, edges)
    # Block 0's id 1 is alone; 0:2 ~ 1:1, 1:2 ~ 2:1, ...: ids alternate, then block 49's id 2.
    assert ids.count == n + 1
    assert ids.block_lut(0).tolist() == [0, 1, 2]
    for i in range(1, n):
        assert ids.block_lut(i).tolist() == [0, i + 1, i + 2]
    # Everything through id 1 of each block: a single object spanning all blocks.
    chain = [(i, i + 1, np.array([[1, 1], [2, 2]], np.int64)) for i in range(n - 1)]
    ids = global_ids(counts, chain)
    assert ids.count == 2
    assert all(ids.block_lut(i).tolist() == [0, 1, 2] for i in range(n))


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_global_ids_do_not_depend_on_edge_or_block_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    nblocks = int(rng.integers(1, 12))
    counts = [int(c) for c in rng.integers(0, 6, nblocks)]
    edges = []
    for _ in range(int(rng.integers(0, 15))):
        a, b = sorted(int(x) for x in rng.integers(0, nblocks, 2))
        if a == b or counts[a] == 0 or counts[b] == 0:
            continue
        k = int(rng.integers(1, 4))
        pairs = np.stack([rng.integers(1, counts[a] + 1, k), rng.integers(1, counts[b] + 1, k)], 1)
        edges.append((a, b, pairs.astype(np.int64)))
    ids = global_ids(counts, edges)

    # Reference: union-find over (block, local id), numbered by first appearance.
    parent = {(b, i): (b, i) for b in range(nblocks) for i in range(1, counts[b] + 1)}

    def find(x: tuple[int, int]) -> tuple[int, int]:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b, e in edges:
        for i, j in e:
            parent[find((a, int(i)))] = find((b, int(j)))
    numbering: dict[tuple[int, int], int] = {}
    for key in sorted(parent):
        numbering.setdefault(find(key), len(numbering) + 1)
    assert ids.count == len(numbering)
    for b in range(nblocks):
        expected = [0, *(numbering[find((b, i))] for i in range(1, counts[b] + 1))]
        assert ids.block_lut(b).tolist() == expected

    # Shuffled edges, reversed pairs (b, a, swapped columns), shuffled rows: same result.
    shuffled = [
        (b, a, e[rng.permutation(len(e))][:, ::-1]) if rng.random() < 0.5 else (a, b, e)
        for a, b, e in (edges[i] for i in rng.permutation(len(edges)))
    ]
    again = global_ids(counts, shuffled)
    assert again.count == ids.count
    for b in range(nblocks):
        assert again.block_lut(b).tolist() == ids.block_lut(b).tolist()


def test_global_ids_dtype_switches_to_uint64() -> None:
    # Built directly: 2**32 ids would not fit in memory here.
    below = GlobalIds(np.array([0, 2]), np.array([1, 2**32 - 1]), 2**32 - 1)
    assert below.dtype == np.uint32
    assert below.block_lut(0).tolist() == [0, 1, 2**32 - 1]
    assert below.block_lut(0).dtype == np.uint32
    at = GlobalIds(np.array([0, 1, 3]), np.array([7, 2**32 - 1, 2**32]), 2**32)
    assert at.dtype == np.uint64
    assert at.block_lut(1).dtype == np.uint64
    assert at.block_lut(1).tolist() == [0, 2**32 - 1, 2**32]
    assert at.block_lut(0).tolist() == [0, 7]
    beyond = GlobalIds(np.array([0, 1]), np.array([2**40 + 3]), 2**40 + 3)
    assert beyond.block_lut(0).tolist() == [0, 2**40 + 3]


# -- the oracle ----------------------------------------------------------------


CHUNKINGS_2D = [1, 2, 3, (1, 7), (5, 2), (8, 3), 17, 100]
CHUNKINGS_3D = [1, 2, (1, 3, 2), (4, 1, 5), (3, 3, 3), 50]


@pytest.mark.parametrize("tile", CHUNKINGS_2D)
@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
def test_oracle_2d_binary(tile: int | tuple[int, int], density: float) -> None:
    rng = np.random.default_rng(int(density * 10))
    image = (rng.random((23, 17)) < density).astype(np.uint8)
    check_against_whole_image(image, tile)


@pytest.mark.parametrize("tile", CHUNKINGS_3D)
@pytest.mark.parametrize("density", [0.15, 0.4])
def test_oracle_3d_binary(tile: int | tuple[int, int, int], density: float) -> None:
    rng = np.random.default_rng(int(density * 100))
    image = (rng.random((9, 11, 8)) < density).astype(np.uint8)
    check_against_whole_image(image, tile)


@pytest.mark.parametrize("tile", [1, 2, (3, 4), 6])
def test_oracle_2d_classes(tile: int | tuple[int, int]) -> None:
    # Touching regions of different classes are different objects.
    image = np.random.default_rng(3).integers(0, 3, (16, 19)).astype(np.uint8)
    check_against_whole_image(image, tile)


def test_oracle_diagonal_line_across_corners() -> None:
    # A diagonal chain links blocks only through their corners.
    image = np.eye(12, dtype=np.uint8) | np.fliplr(np.eye(12, dtype=np.uint8))
    for tile in [1, 2, 3, 4, 5]:
        check_against_whole_image(image, tile)
    cube = np.zeros((8, 8, 8), np.uint8)
    cube[np.arange(8), np.arange(8), np.arange(8)] = 1
    cube[np.arange(8), 7 - np.arange(8), np.arange(8)] = 1
    for tile in [1, 2, 3]:
        check_against_whole_image(cube, tile)


@st.composite
def binary_images_and_tiles(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, ...], int]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 14 if ndim < 3 else 7)) for _ in range(ndim))
    tile = tuple(draw(st.integers(1, n + 2)) for n in shape)
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, tile, seed


@SETTINGS
@given(binary_images_and_tiles(), st.sampled_from([0.2, 0.45, 0.6]), st.integers(1, 3))
def test_oracle_property(case: tuple, density: float, nclasses: int) -> None:
    shape, tile, seed = case
    rng = np.random.default_rng(seed)
    fg = rng.random(shape) < density
    image = (fg * rng.integers(1, nclasses + 1, shape)).astype(np.uint8)
    check_against_whole_image(image, tile)

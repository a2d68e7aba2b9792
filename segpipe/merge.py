"""Global instance ids from block-local ids in memory bounded by the grid's frontier.

`merge_ids` gives exactly what `segpipe.stitch.global_ids` gives (ids consecutive
from 1, numbered by the first (block id, local id) of each object), but it never
holds all blocks' counts or edges: it streams the per-pair edge tables in block
order and keeps only the blocks edges can still reach (one row of blocks plus the
neighbour reach in row-major order) in memory. Everything else is spilled to
small ``.npz`` files under a work directory, one per *batch* of consecutive blocks.

Three passes, each over the batches once:

1. forward: a union-find over the labels of the active blocks. Every element
   (block, local id) starts as its own label, its provisional id; a label is
   always the smallest provisional id of its set. Joining two sets *kills* the
   larger label (logged). A batch's blocks can get no edge after their batch,
   so their current labels are written and they leave memory. A written label
   may still be killed later (U shapes: two arms joined rows below).
2. backward: the kill log read in reverse resolves every written label to the
   final smallest provisional id of its object; only labels of objects open at
   that point are held. It also notes the last batch that mentions each root.
3. forward: roots are numbered in provisional-id order (1, 2, ...), which is
   the numbering by first (block id, local id); each batch's lookup tables are
   written. A root is dropped after the last batch that mentions it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe.io import storage
from segpipe.io.markers import load_npz, save_npz
from segpipe.io.storage import Location, Where

Int64s = NDArray[np.int64]
EdgeTable = tuple[int, int, NDArray[np.integer]]


def reach(grid_shape: Sequence[int]) -> int:
    """Largest ``b - a`` of two touching blocks (faces, edges or corners) in row-major ids.

    Examples
    --------
    >>> reach((316, 316))
    317
    """
    strides = [math.prod(grid_shape[k + 1 :]) for k in range(len(grid_shape))]
    return sum(strides)


def _lookup(keys: Int64s, values: Int64s, x: Int64s) -> Int64s:
    """``x`` with each value found in the sorted ``keys`` replaced by its ``values``."""
    if not len(keys) or not len(x):
        return x
    pos = np.searchsorted(keys, x)
    pos[pos == len(keys)] = 0
    hit = keys[pos] == x
    out = x.copy()
    out[hit] = values[pos[hit]]
    return out


def _components(u: Int64s, v: Int64s, n: int) -> Int64s:
    """Smallest node of each node's connected component (edges ``u[i]``–``v[i]``).

    Hooking larger roots under smaller ones, then pointer jumping, until every
    edge joins one root: plain NumPy, no sparse matrix per batch.
    """
    parent = np.arange(n, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(pu, pv)[differ], np.minimum(pu, pv)[differ])
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up


def _counts_fn(counts: Sequence[int] | Callable[[int], int], n: int) -> Callable[[int], int]:
    if callable(counts):
        return counts
    if len(counts) != n:
        raise ValueError(f"Expected counts for {n} blocks, got {len(counts)} instead.")
    return lambda b: int(counts[b])


@dataclass
class MergedIds:
    """Lookup from (block, local id) to global id, stored as one ``.npz`` per batch, or
    ``held`` in memory (a grid of one block).

    ``block_lut(b)`` equals `segpipe.stitch.GlobalIds.block_lut`; reading the
    blocks in order loads each batch file once.
    """

    workdir: Location
    n_blocks: int
    batch: int
    count: int
    _cache: tuple[int, Int64s, Any] | None = field(default=None, repr=False)
    held: bool = False

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """uint32 while the ids fit, uint64 beyond."""
        return np.dtype(np.uint32 if self.count < 2**32 else np.uint64)

    def _load(self, s: int) -> tuple[int, Int64s, Any]:
        if self._cache is None or self._cache[0] != s:
            with load_npz(self.workdir / f"lut-{s:07d}.npz") as f:
                starts = np.concatenate([[0], np.cumsum(f["n"], dtype=np.int64)])
                self._cache = (s, starts, f["gid"])
        return self._cache

    def block_lut(self, block_id: int) -> NDArray[np.unsignedinteger]:
        """Local id → global id for one block (index 0 maps background to 0)."""
        if not 0 <= block_id < self.n_blocks:
            raise IndexError(f"Expected a block id in [0, {self.n_blocks}), got {block_id}.")
        s, starts, gid = self._load(block_id // self.batch)
        k = block_id - s * self.batch
        lut = np.zeros(int(starts[k + 1] - starts[k]) + 1, dtype=self.dtype)
        lut[1:] = gid[starts[k] : starts[k + 1]]
        return lut

    def luts(self) -> Iterator[NDArray[np.unsignedinteger]]:
        """Every block's lookup table, in block order."""
        for b in range(self.n_blocks):
            yield self.block_lut(b)

    def remove(self) -> None:
        """Delete the lookup files (the work directory); a lookup ``held`` stays."""
        if not self.held:
            self._cache = None
        try:
            storage.remove_tree(self.workdir)
        except OSError:
            return


class _Edges:
    """The edge tables of one batch of blocks at a time, from a block-ordered stream."""

    def __init__(self, edges: Iterable[EdgeTable]) -> None:
        self._it = iter(edges)
        self._held: EdgeTable | None = None
        self._last = -1

    def take(self, stop: int) -> Iterator[EdgeTable]:
        """Tables whose lower block id is below ``stop``, normalised to ``a <= b``."""
        while True:
            if self._held is None:
                nxt = next(self._it, None)
                if nxt is None:
                    return
                a, b, e = int(nxt[0]), int(nxt[1]), np.asarray(nxt[2])
                if a > b:
                    a, b, e = b, a, e[:, ::-1]
                if a < self._last:
                    raise ValueError(
                        f"edges: Expected tables in block order, got block {a} after {self._last}."
                    )
                self._last = a
                self._held = (a, b, e)
            if self._held[0] >= stop:
                return
            yield self._held
            self._held = None


def merge_ids(
    grid_shape: Sequence[int],
    counts: Sequence[int] | Callable[[int], int],
    edges: Iterable[EdgeTable],
    workdir: Where,
    *,
    batch: int | None = None,
) -> MergedIds:
    """Join block-local ids linked by ``edges`` into global consecutive ids, streaming.

    Parameters
    ----------
    grid_shape : sequence of int
        Blocks per axis; block ids are row-major (`segpipe.blocks.BlockGrid.block_id`).
    counts : sequence of int or callable
        Local ids (1..n) per block, or ``counts(block_id) -> n`` (read in block order).
    edges : iterable of (block a, block b, (n, 2) array)
        Local-id pairs (id in a, id in b) that are the same object, for touching
        blocks, ordered by ``min(a, b)`` (as `BlockGrid.neighbour_pairs` yields them).
    workdir : str or Path
        Directory for the spilled batches and the lookup tables (created; its
        ``lut-*.npz`` files are what the result reads).
    batch : int, optional
        Blocks per spilled batch; default one row of the grid (at least 64 blocks).

    Returns
    -------
    MergedIds
        ``.count``, ``.dtype`` and ``.block_lut(b)``, equal to
        ``stitch.global_ids(counts, edges)``.

    Raises
    ------
    ValueError
        If the tables are out of block order, link blocks farther apart than
        neighbours, or name local ids beyond a block's count.

    Notes
    -----
    Memory is O(objects of ``batch`` + `reach` blocks), whatever the number of
    blocks; disk holds about 24 bytes per local id while it runs, and the result
    4 (uint32) or 8 bytes per local id.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> ids = merge_ids((1, 2), [2, 1], [(0, 1, np.array([[2, 1]]))], tempfile.mkdtemp())
    >>> ids.count, ids.block_lut(1).tolist()
    (2, [0, 2])
    """
    n_blocks = math.prod(int(g) for g in grid_shape)
    if any(int(g) < 1 for g in grid_shape):
        raise ValueError(f"Expected a grid shape of positive ints, got {tuple(grid_shape)}.")
    size = int(batch) if batch else max(int(grid_shape[-1]), 64)
    size = max(1, min(size, n_blocks))
    count_of = _counts_fn(counts, n_blocks)
    work = storage.location(workdir)
    if n_blocks == 1:
        return _one_block(int(count_of(0)), edges, work)
    n_batches = -(-n_blocks // size)
    total, kills = _forward(n_blocks, size, reach(grid_shape), count_of, _Edges(edges), work)
    _backward(n_batches, work)
    count = total - kills
    counted = _number(n_batches, work, np.dtype(np.uint32 if count < 2**32 else np.uint64))
    if counted != count:  # the passes disagree: a bug, never a result
        raise AssertionError(f"merge: numbered {counted} objects, expected {count}.")
    return MergedIds(work, n_blocks, size, count)


def _one_block(n: int, edges: Iterable[EdgeTable], work: Location) -> MergedIds:
    """`merge_ids` of a grid of one block: its local ids are the global ones. The lookup
    is held in the result, not spilled: nothing to stream, and no file to write."""
    if n < 0:
        raise ValueError(f"counts: Expected >= 0 local ids, got {n} for block 0.")
    for a, b, _ in edges:  # consumed all the same: a lazy stream runs its tasks
        raise ValueError(f"edges: blocks {a} and {b} do not touch (a grid of one block).")
    ids = MergedIds(work, 1, 1, n, held=True)
    ids._cache = (0, np.array([0, n], np.int64), np.arange(1, n + 1, dtype=ids.dtype))
    return ids


def _forward(
    n_blocks: int,
    size: int,
    horizon_reach: int,
    count_of: Callable[[int], int],
    edges: _Edges,
    work: Location,
) -> tuple[int, int]:
    """Pass 1: union-find over the active blocks; spill labels and kills per batch."""
    offsets = [0]  # provisional id of (block b, local 1), for blocks seen so far
    n_of: list[int] = []
    base = 0  # provisional id of cur[0]
    cur = np.zeros(0, np.int64)  # label of each active provisional id
    first = 0  # first block whose offset is still in `offsets` (offsets[0] is its)
    kills = 0
    for s in range(-(-n_blocks // size)):
        x0, x1 = s * size, min((s + 1) * size, n_blocks)
        top = min(x1 + horizon_reach, n_blocks)  # blocks edges of this batch may reach
        grown = first + len(n_of)
        while grown < top:  # new blocks enter, each id its own label
            n = int(count_of(grown))
            if n < 0:
                raise ValueError(f"counts: Expected >= 0 local ids, got {n} for block {grown}.")
            n_of.append(n)
            offsets.append(offsets[-1] + n)
            grown += 1
        end = offsets[top - first]
        cur = np.concatenate([cur, np.arange(base + len(cur), end, dtype=np.int64)])
        tables: list[NDArray[np.integer]] = []
        pairs: list[tuple[int, int]] = []
        for a, b, e in edges.take(x1):
            if len(e):
                tables.append(e)
                pairs.append((a, b))
        us = vs = np.zeros(0, np.int64)
        if tables:
            # one vectorised pass over the batch: per-table NumPy calls dominate otherwise
            sizes = np.fromiter((len(e) for e in tables), np.int64, len(tables))
            ab = np.asarray(pairs, np.int64)
            a_ = np.repeat(ab[:, 0] - first, sizes)
            b_ = np.repeat(ab[:, 1] - first, sizes)
            e = np.concatenate(tables).astype(np.int64, copy=False).reshape(-1, 2)
            if int(ab[:, 1].max()) >= top:
                bad = ab[ab[:, 1] >= top][0]
                raise ValueError(
                    f"edges: blocks {bad[0]} and {bad[1]} do not touch "
                    f"(ids at most {horizon_reach} apart)."
                )
            n_arr = np.asarray(n_of, np.int64)
            if e.min() < 1 or (e[:, 0] > n_arr[a_]).any() or (e[:, 1] > n_arr[b_]).any():
                wrong = (e.min(axis=1) < 1) | (e[:, 0] > n_arr[a_]) | (e[:, 1] > n_arr[b_])
                i = int(np.argmax(wrong))
                raise ValueError(
                    f"edges ({a_[i] + first}, {b_[i] + first}): local ids must lie in "
                    f"1..{n_arr[a_[i]]} and 1..{n_arr[b_[i]]}, got {e[i].tolist()}."
                )
            off_arr = np.asarray(offsets, np.int64) - base
            us = off_arr[a_] + e[:, 0] - 1
            vs = off_arr[b_] + e[:, 1] - 1
        k_lab = np.zeros(0, np.int64)
        t_lab = np.zeros(0, np.int64)
        if len(us):
            lu, lv = cur[us], cur[vs]
            nodes, inv = np.unique(np.concatenate([lu, lv]), return_inverse=True)
            m = len(lu)
            # nodes are sorted: the smallest index of a component is its root label
            target = nodes[_components(inv[:m], inv[m:], len(nodes))]
            dead = target != nodes
            k_lab, t_lab = nodes[dead], target[dead]
            cur = _lookup(k_lab, t_lab, cur)
            kills += len(k_lab)
        # the batch's blocks get no more edges: write their labels, forget them
        done = offsets[x1 - first] - base
        save_npz(
            work / f"p1-{s:07d}.npz",
            {
                "lab": cur[:done],
                "n": np.asarray(n_of[x0 - first : x1 - first], np.int64),
                "kill": k_lab,
                "to": t_lab,
                "off": np.asarray(offsets[x0 - first], np.int64),
                "top": np.asarray(end, np.int64),
            },
        )
        cur = cur[done:].copy()
        base += done
        drop = x1 - first
        del n_of[:drop]
        del offsets[:drop]
        first = x1
    return offsets[-1], kills


def _backward(n_batches: int, work: Location) -> None:
    """Pass 2: resolve written labels to final roots (kill log read in reverse)."""
    fin_k = np.zeros(0, np.int64)  # killed label -> its final root, sorted by label
    fin_v = np.zeros(0, np.int64)
    seen = np.zeros(0, np.int64)  # roots mentioned by later batches
    for s in reversed(range(n_batches)):
        path = work / f"p1-{s:07d}.npz"
        with load_npz(path) as f:
            lab, n, kill, to = f["lab"], f["n"], f["kill"], f["to"]
            off, top = int(f["off"]), int(f["top"])
        keep = fin_k < top  # labels this batch (and earlier ones) can name
        fin_k, fin_v = fin_k[keep], fin_v[keep]
        final = _lookup(fin_k, fin_v, lab)  # written after this batch's kills: roots then
        to = _lookup(fin_k, fin_v, to)  # roots after this batch; later kills are in fin
        order = np.argsort(np.concatenate([fin_k, kill]), kind="stable")
        fin_k = np.concatenate([fin_k, kill])[order]
        fin_v = np.concatenate([fin_v, to])[order]
        roots = np.unique(final)
        last = roots[~np.isin(roots, seen, assume_unique=True)]
        seen = np.union1d(seen, roots)
        seen = seen[seen < off]  # earlier batches name only ids below this batch's
        save_npz(
            work / f"p2-{s:07d}.npz",
            {"final": final, "n": n, "last": last, "off": np.asarray(off, np.int64)},
        )
        path.unlink()


def _number(n_batches: int, work: Location, dtype: np.dtype[Any]) -> int:
    """Pass 3: number roots in provisional-id order; write each batch's lookup tables."""
    open_k = np.zeros(0, np.int64)  # roots still named by later batches -> global id
    open_v = np.zeros(0, np.int64)
    counter = 0
    for s in range(n_batches):
        path = work / f"p2-{s:07d}.npz"
        with load_npz(path) as f:
            final, n, last, off = f["final"], f["n"], f["last"], int(f["off"])
        own = off + np.arange(len(final), dtype=np.int64)
        is_root = final == own
        gid = np.zeros(len(final), np.int64)
        gid[is_root] = counter + np.arange(1, int(is_root.sum()) + 1)
        counter += int(is_root.sum())
        inside = ~is_root & (final >= off)
        gid[inside] = gid[final[inside] - off]
        outside = final < off
        if outside.any():
            wanted = final[outside]
            pos = np.minimum(np.searchsorted(open_k, wanted), max(len(open_k) - 1, 0))
            if not len(open_k) or (open_k[pos] != wanted).any():  # a bug, never a result
                raise AssertionError(f"merge: batch {s} names a root no longer held.")
            gid[outside] = open_v[pos]
        open_k = np.concatenate([open_k, own[is_root]])
        open_v = np.concatenate([open_v, gid[is_root]])
        alive = ~np.isin(open_k, last)
        open_k, open_v = open_k[alive], open_v[alive]  # stays sorted: appended ids grow
        save_npz(work / f"lut-{s:07d}.npz", {"gid": gid.astype(dtype), "n": n})
        path.unlink()
    return counter

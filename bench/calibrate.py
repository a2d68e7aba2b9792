"""Measure the per-block costs `segpipe plan` uses and write ``segpipe/data/plan_costs.json``.

Usage: python -m bench.calibrate [--tile 1024] [--repeats 3] [--segmenters otsu watershed ...]

Times the real block functions of `segpipe.stages` (and the relabel pass,
its relabel, panoptic and measure steps apart, and the pyramid) on one thread
on the middle block (1024²) of a synthetic uint16 nuclei image (3 × 3 tiles,
written as a tiled TIFF), once per segmenter
(`segpipe.plan.measure_costs`; the stages other than segment from the first
segmenter, otsu); the per-task overhead of Dask (`map_blocks`
of a no-op on a LocalCluster) and the streaming merge per block
(`segpipe.merge.merge_ids` on a 32 × 316 grid of synthetic face tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.common import machine
from segpipe import synthetic
from segpipe.plan import COSTS_FILE, Costs, measure_costs

CLASSICAL = ["otsu", "multiotsu", "threshold", "local", "region-growing", "watershed", "edges"]


def _noop(i: int) -> int:
    return i


def task_overhead(n: int = 2000) -> float:
    """Seconds per Dask task of `engine.map_blocks` on a 1-worker, 2-thread LocalCluster."""
    from distributed import Client, LocalCluster

    from segpipe.engine import map_blocks

    with (
        LocalCluster(n_workers=1, threads_per_worker=2, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        map_blocks(client, _noop, [(i,) for i in range(50)], stage="warm")
        t = time.perf_counter()
        map_blocks(client, _noop, [(i,) for i in range(n)], stage="noop")
        return (time.perf_counter() - t) / n * 2  # two threads ran them side by side


def _faces(rows: int, cols: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for r in range(rows):
        for c in range(cols):
            a = r * cols + c
            if c + 1 < cols and (a * 2654435761) % 97 < 40:
                yield a, a + 1, np.array([[2, 3]], np.int64)
            if r + 1 < rows:
                yield a, a + cols, np.array([[1, 1], [3, 2]], np.int64)


def merge_cost(rows: int = 32, cols: int = 316) -> float:
    """Seconds per block of `merge_ids` (and reading every LUT) on synthetic face tables."""
    from segpipe.merge import merge_ids

    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        ids = merge_ids((rows, cols), lambda b: 4, _faces(rows, cols), work)
        for _ in ids.luts():
            pass
        return (time.perf_counter() - t) / (rows * cols)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segmenters", nargs="+", default=[*CLASSICAL, "unet"])
    parser.add_argument("--out", type=Path, default=COSTS_FILE)
    args = parser.parse_args(argv)
    from segpipe.io.readers import open_source
    from segpipe.segmenters import get_segmenter

    print(machine(), flush=True)
    costs: Costs | None = None
    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic.write_tiff(Path(tmp) / "nuclei.tif", (3 * args.tile,) * 2, seed=1)
        spec = open_source(path)
        overhead = task_overhead()
        merge = merge_cost()
        print(f"Dask task overhead {overhead * 1e3:.2f} ms, merge {merge * 1e6:.1f} us/block")
        base = Costs({}, {}, {}, overhead, merge)
        for name in args.segmenters:
            try:
                segmenter = get_segmenter(name)
            except Exception as err:  # e.g. a deep segmenter without its weights
                print(f"{name}: skipped ({err})")
                continue
            t = time.perf_counter()
            costs = measure_costs(
                spec, segmenter, tile=args.tile, base=costs or base, repeats=args.repeats
            )
            # The stages around the segmenter (ingest, filter, relabel pass, pyramid) are
            # priced on the first segmenter's blocks (otsu): each later one would replace
            # them with the cost of its own objects (unet's several classes per object
            # take the measure step's sort: 60 against 6 ns/px).
            stages = stages or costs.stages
            costs = dataclasses.replace(costs, stages=stages)
            seg = costs.segment[name]
            print(
                f"{name}: {seg.ns_per_px:.1f} ns/px, working set {seg.working_bytes_per_px:.1f} "
                f"B/px ({time.perf_counter() - t:.1f} s)",
                flush=True,
            )
    if costs is None:
        return 1
    table = costs.to_json()
    if args.out.exists():  # start-up figures come from bench.startup: kept
        table.setdefault("startup", json.loads(args.out.read_text()).get("startup"))
        if table["startup"] is None:
            del table["startup"]
    table["source"] = (
        f"python -m bench.calibrate --tile {args.tile} --repeats {args.repeats}, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, synthetic uint16 nuclei, one thread; "
        + machine()
    )
    args.out.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sharded vs unsharded outputs, side by side in one run (issue #17 part 5).

Usage: python -m bench.sharding [--size 8192] [--repeats 3] [--inner 256]
                                [--regions 200] [--workdir DIR] [--out bench/sharding.json]

On one synthetic tiled uint16 TIFF, for each layout of the output arrays
(`RunConfig.viewer_chunk`: ``0``, one chunk per block, and ``--inner``, each
block a shard of inner chunks), alternating the two in each repeat:
- `otsu` end to end (`pipeline.run_image`, TIFF in, OME-Zarr out, tile 2048²) on a
  LocalCluster of 2 worker processes × 1 thread: median and best seconds, Mpx/s,
  and the median of each repeat's sharded/unsharded ratio;
- bytes on disk of the image's group (image, labels, pyramids, tables);
- the time to read one 256² region of ``labels/instances/0`` as a viewer opening the
  array does: a fresh ``zarr.open_array`` and the read, median over ``--regions``
  random regions (page cache hot: the difference is what is decoded), and the
  encoded bytes those regions touch (what a viewer fetches from remote storage).

Prints a markdown table with the sharded/unsharded ratios and writes the figures
as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine
from segpipe import synthetic
from segpipe.config import AUTO_TILE

REGION = 256


def _run(client: Any, path: Path, out: Path, inner: int) -> float:
    from segpipe.image import ImagePlan
    from segpipe.io.readers import open_source
    from segpipe.pipeline import run_image
    from segpipe.segmenters import get_segmenter

    shutil.rmtree(out, ignore_errors=True)
    tile = (AUTO_TILE[2],) * 2
    plan = ImagePlan(open_source(path), str(out), tile, get_segmenter("otsu"), viewer_chunk=inner)
    t0 = time.perf_counter()
    run_image(client, plan)
    return time.perf_counter() - t0


def _disk(group: Path) -> int:
    return sum(p.stat().st_size for p in group.rglob("*") if p.is_file())


def _stored_bytes(array: Path, region: tuple[slice, ...]) -> int:
    """Encoded bytes of the chunks (inner chunks of a sharded array, with the shard
    index) that ``region`` touches: what a reader of that region must fetch."""
    from segpipe.io import chunks, omezarr

    lay = omezarr._layout(str(array), omezarr._stamp(array))
    assert lay is not None
    if lay.inner is None:
        return sum(lay.path(i).stat().st_size for i in lay.covered(region))
    inner = chunks.Layout(lay.root, lay.shape, lay.inner, lay.dtype, lay.fill_value, lay.blosc)
    per = tuple(c // i for c, i in zip(lay.chunks, lay.inner, strict=True))
    index_size = 16 * int(np.prod(per)) + 4
    total = 0
    shards: set[tuple[int, ...]] = set()
    for at in inner.covered(region):
        shard = tuple(a // p for a, p in zip(at, per, strict=True))
        data = lay.path(shard).read_bytes()
        index = np.frombuffer(data[-index_size:-4], "<u8").reshape(*per, 2)
        total += int(index[tuple(a % p for a, p in zip(at, per, strict=True))][1])
        shards.add(shard)
    return total + index_size * len(shards)


def _region_reads(array: Path, shape: tuple[int, ...], n: int) -> tuple[float, float]:
    """Median seconds to open ``array`` afresh and read a random 256² region, and the
    median encoded bytes such a region touches."""
    import zarr

    rng = np.random.default_rng(0)
    seconds, stored = [], []
    for _ in range(n):
        y, x = (int(rng.integers(0, s - REGION)) for s in shape)
        region = (slice(y, y + REGION), slice(x, x + REGION))
        t0 = time.perf_counter()
        arr = zarr.open_array(str(array), mode="r")
        arr[region]
        seconds.append(time.perf_counter() - t0)
        stored.append(_stored_bytes(array, region))
    return statistics.median(seconds), statistics.median(stored)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--regions", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segpipe-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sharding.json"))
    args = parser.parse_args(argv)
    import dask
    from distributed import Client, LocalCluster

    from segpipe.backends import worker_env_config

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    path = args.workdir / f"nuclei-{args.size}.tif"
    if not path.exists():
        synthetic.write_tiff(path, (args.size, args.size), tile=512, seed=1)
    layouts = {"unsharded": 0, "sharded": args.inner}
    seconds: dict[str, list[float]] = {k: [] for k in layouts}
    with (
        dask.config.set(worker_env_config()),
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        _run(client, path, args.workdir / "warm.zarr", 0)  # workers' imports, page cache
        for r in range(args.repeats):
            order = list(layouts) if r % 2 == 0 else list(reversed(layouts))
            for name in order:
                out = args.workdir / f"shard-{name}.zarr"
                seconds[name].append(_run(client, path, out, layouts[name]))
                print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    mpx = args.size**2 / 1e6
    rows: dict[str, dict[str, float]] = {}
    for name in layouts:
        group = args.workdir / f"shard-{name}.zarr" / path.stem
        labels = group / "labels" / "instances" / "0"
        read_s, read_bytes = _region_reads(labels, (args.size, args.size), args.regions)
        run_s = statistics.median(seconds[name])
        rows[name] = {
            "seconds": run_s,
            "best_seconds": min(seconds[name]),
            "mpx_per_s": mpx / run_s,
            "disk_bytes": _disk(group),
            "read_256_ms": read_s * 1e3,
            "read_256_stored_bytes": read_bytes,
        }
    plain, sharded = rows["unsharded"], rows["sharded"]
    ratios = {k: sharded[k] / plain[k] for k in plain}
    # each repeat runs both layouts back to back: its ratio is less exposed to the
    # machine's other load than the ratio of medians
    paired = statistics.median(
        b / a for a, b in zip(seconds["unsharded"], seconds["sharded"], strict=True)
    )
    print(
        f"\n{args.size}² otsu, tile {AUTO_TILE[2]}², inner chunks {args.inner}², "
        f"medians of {args.repeats} runs and {args.regions} regions\n"
    )
    print("| | unsharded | sharded | sharded / unsharded |\n|---|---|---|---|")
    for key, label, fmt in (
        ("seconds", "end to end, s (median)", "{:.2f}"),
        ("best_seconds", "end to end, s (best)", "{:.2f}"),
        ("mpx_per_s", "throughput, Mpx/s", "{:.2f}"),
        ("disk_bytes", "on disk, MiB", "{:.1f}"),
        ("read_256_ms", "open + read a 256² labels region, ms", "{:.2f}"),
        ("read_256_stored_bytes", "encoded bytes a 256² region touches, KiB", "{:.1f}"),
    ):
        scale = 2**20 if key == "disk_bytes" else 2**10 if "bytes" in key else 1
        a, b = (fmt.format(v[key] / scale) for v in (plain, sharded))
        print(f"| {label} | {a} | {b} | {ratios[key]:.2f} |")
    print(f"| end to end, median of each repeat's ratio | | | {paired:.2f} |")
    result = {
        "machine": machine(),
        "size": args.size,
        "tile": AUTO_TILE[2],
        "inner": args.inner,
        "repeats": args.repeats,
        "regions": args.regions,
        "runs_seconds": seconds,
        "layouts": rows,
        "sharded_over_unsharded": ratios,
        "paired_seconds_ratio": paired,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

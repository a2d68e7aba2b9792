"""Peak memory of the whole process tree of `segpipe run --segmenter otsu` vs image size;
and of a volume per segmenter, ``tile: auto`` beside a fixed tile.

Usage: python -m bench.memory [--sizes 8192 32768] [--workdir /tmp/segpipe-bench]
       python -m bench.memory --volume 192 512 [--segmenters otsu watershed]
                              [--fixed-tile 192,256,256]

With ``--volume D S``: a D × S² uint16 volume of synthetic touching nuclei, run with
each segmenter at ``tile: auto`` (sized by its declared working set within
``thread_memory``) and at ``--fixed-tile`` (what ``tile: auto`` gave before it knew
the segmenter), side by side: peak RSS of the tree, seconds, objects found.

Writes tiled uint16 TIFFs of synthetic nuclei (never held in memory), runs the
CLI as a subprocess (CLI, Prefect's embedded server, Dask scheduler, nanny
and worker all count) and prints peak RSS per size and the ratio to the
smallest size, measured side by side in one invocation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bench.common import TreeRun, machine, run_tree
from segpipe import synthetic
from segpipe.config import AUTO_TILE


def _segpipe_run(segpipe: str, tif: Path, out: Path, segmenter: str, tile: str) -> TreeRun:
    """`segpipe run` of ``tif`` into ``out`` as a subprocess, its process tree sampled."""
    args = ["--input", str(tif), "--output", str(out), "--segmenter", segmenter, "--tile", tile]
    return run_tree(
        [segpipe, "run", "--quiet", *args], env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--tile", type=int, default=AUTO_TILE[2])  # what `tile: auto` picks
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segpipe-bench"))
    parser.add_argument("--volume", type=int, nargs=2, metavar=("DEPTH", "SIZE"))
    parser.add_argument("--segmenters", nargs="+", default=["otsu", "watershed"])
    parser.add_argument("--fixed-tile", default="192,256,256")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    segpipe = str(Path(sys.executable).parent / "segpipe")
    if args.volume:
        return _volume(segpipe, args)
    rows = []
    for size in args.sizes:
        tif = args.workdir / f"nuclei-{size}.tif"
        if not tif.exists():
            print(f"writing {tif} ...", flush=True)
            synthetic.write_tiff(tif, (size, size), tile=512, seed=1)
        out = args.workdir / f"out-{size}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        run = _segpipe_run(segpipe, tif, out, "otsu", str(args.tile))
        if run.returncode != 0:
            print(run.output)
            return 1
        mpx = size * size / 1e6
        rows.append((size, run.peak_rss, run.seconds, mpx / run.seconds))
        print(
            f"{size}²: peak RSS {run.peak_rss / 2**30:.2f} GiB, {run.seconds:.1f} s, "
            f"{mpx / run.seconds:.2f} Mpx/s (incl. start-up)",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    base = rows[0][1]
    print("\nsize     peak RSS (GiB)  ratio to smallest  seconds  Mpx/s")
    for size, peak, secs, rate in rows:
        print(f"{size:<8} {peak / 2**30:>14.2f} {peak / base:>18.2f} {secs:>8.1f} {rate:>6.2f}")
    return 0


def _volume(segpipe: str, args: argparse.Namespace) -> int:
    import zarr

    depth, size = args.volume
    tif = args.workdir / f"volume-{depth}x{size}.tif"
    if not tif.exists():
        synthetic.write_tiff(tif, (depth, size, size), seed=3)
    print(f"{depth} x {size}² volume, tree peak RSS per segmenter and tile")
    for name in args.segmenters:
        for tile in ("auto", args.fixed_tile):
            out = args.workdir / f"volume-{name}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            run = _segpipe_run(segpipe, tif, out, name, tile)
            if run.returncode != 0:
                print(run.output)
                return 1
            group = zarr.open_group(str(out / tif.stem), mode="r")
            chunks = group["labels/instances/0"].chunks
            objects = group.attrs["segpipe"]["objects"]
            print(
                f"{name:10} tile {tile:12} (block {'x'.join(map(str, chunks))}): peak RSS "
                f"{run.peak_rss / 2**30:.2f} GiB, {run.seconds:.1f} s, {objects} objects",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

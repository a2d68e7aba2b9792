"""Throughput of `otsu` end to end, side by side in one run (the performance issue's baseline).

Usage: python -m bench.throughput [--sizes 4096 8192] [--repeats 3] [--workdir DIR]

For each size, on the same synthetic tiled uint16 TIFF, medians over
``--repeats`` runs of:
- scikit-image on the whole image in one process (float32: gaussian σ=2,
  threshold_otsu, label; no I/O but the TIFF read);
- segpipe's stages (`pipeline.run_image`, TIFF in, OME-Zarr out) on a
  LocalCluster of 2 worker processes × 1 thread, with time per stage;
- dask-image (`ndfilters.gaussian_filter` + global Otsu + `ndmeasure.label`)
  on the same LocalCluster.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from bench.common import machine
from segpipe import synthetic


def _skimage(path: Path) -> float:
    from skimage import filters, measure

    t0 = time.perf_counter()
    image = tifffile.imread(path).astype(np.float32)
    smooth = filters.gaussian(image, sigma=2, preserve_range=True)
    measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)
    return time.perf_counter() - t0


def _segpipe(client: Any, path: Path, out: Path, tile: int) -> tuple[float, dict[str, float]]:
    from segpipe.io.readers import open_source
    from segpipe.pipeline import ImagePlan, run_image
    from segpipe.segmenters import get_segmenter

    shutil.rmtree(out, ignore_errors=True)
    plan = ImagePlan(open_source(path), str(out), (tile, tile), get_segmenter("otsu", sigma=2.0))
    t0 = time.perf_counter()
    result = run_image(client, plan)
    return time.perf_counter() - t0, result.stages


def _dask_image(client: Any, path: Path, tile: int) -> float:
    import dask.array as da
    from dask_image import ndfilters, ndmeasure
    from skimage import filters

    t0 = time.perf_counter()
    image = da.from_array(tifffile.imread(path, aszarr=False), chunks=tile).astype(np.float32)
    smooth = ndfilters.gaussian_filter(image, sigma=2, mode="nearest", truncate=4.0).persist()
    lo, hi = da.compute(smooth.min(), smooth.max())
    counts, edges = da.histogram(smooth, bins=256, range=(float(lo), float(hi)))
    centers = (edges[:-1] + edges[1:]) / 2
    t = filters.threshold_otsu(hist=(counts.compute(), centers))
    labels, _ = ndmeasure.label(smooth > t, structure=np.ones((3, 3)))
    da.store(labels, np.empty(labels.shape, labels.dtype), lock=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segpipe-bench"))
    parser.add_argument("--no-dask-image", action="store_true")
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    rows = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        for size in args.sizes:
            path = args.workdir / f"nuclei-{size}.tif"
            if not path.exists():
                synthetic.write_tiff(path, (size, size), tile=512, seed=1)
            sk, sp, di, stages = [], [], [], []
            for _ in range(args.repeats):
                sk.append(_skimage(path))
                seconds, stage = _segpipe(client, path, args.workdir / f"tp-{size}.zarr", args.tile)
                sp.append(seconds)
                stages.append(stage)
                if not args.no_dask_image:
                    di.append(_dask_image(client, path, args.tile))
            mpx = size * size / 1e6
            med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
            row = (
                size,
                statistics.median(sk),
                statistics.median(sp),
                statistics.median(di) if di else float("nan"),
                med,
            )
            rows.append(row)
            print(
                f"{size}²: skimage {row[1]:.2f} s ({mpx / row[1]:.2f} Mpx/s), segpipe "
                f"{row[2]:.2f} s ({mpx / row[2]:.2f} Mpx/s), dask-image {row[3]:.2f} s; "
                "segpipe stages: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()),
                flush=True,
            )
    print("\nsize   skimage s  segpipe s  dask-image s  segpipe/skimage speed  segpipe/dask-image")
    for size, sk_s, sp_s, di_s, _ in rows:
        print(
            f"{size:<6} {sk_s:>9.2f} {sp_s:>10.2f} {di_s:>13.2f} {sk_s / sp_s:>22.2f} "
            f"{di_s / sp_s:>19.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

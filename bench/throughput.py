"""Throughput of `otsu` end to end, side by side in one run (the performance issue's baseline).

Usage: python -m bench.throughput [--sizes 4096 8192 16384] [--repeats 3]
                                  [--segmenters otsu watershed unet] [--workdir DIR]

For each size, on the same synthetic tiled uint16 TIFF, medians over
``--repeats`` runs of:
- scikit-image on the whole image in one process (float32: gaussian σ=2,
  threshold_otsu, label; no I/O but the TIFF read);
- segpipe's stages (`pipeline.run_image`, TIFF in, OME-Zarr out) on a
  LocalCluster of 2 worker processes × 1 thread, with time per stage and the
  workers' busy share of it (the sum of the stage's task compute times from
  Dask's task stream / (wall × threads); for the relabel pass, whose time is
  shared out to relabel, panoptic, measure and write, that of the four
  together); the rest is the scheduler, the client and waiting;
- dask-image (`ndfilters.gaussian_filter` + global Otsu + `ndmeasure.label`)
  on the same LocalCluster, up to ``--dask-image-max`` pixels a side;
- every other ``--segmenters`` entry through segpipe alone (throughput only).
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
from segpipe.config import AUTO_TILE


def _skimage(path: Path) -> float:
    from skimage import filters, measure

    t0 = time.perf_counter()
    image = tifffile.imread(path).astype(np.float32)
    smooth = filters.gaussian(image, sigma=2, preserve_range=True)
    measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)
    return time.perf_counter() - t0


def _segpipe(
    client: Any, path: Path, out: Path, tile: int, segmenter: str = "otsu"
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Seconds, seconds per stage, and busy share of the workers per stage."""
    from distributed import get_task_stream

    from segpipe.image import ImagePlan
    from segpipe.io.readers import open_source
    from segpipe.pipeline import run_image
    from segpipe.segmenters import get_segmenter

    shutil.rmtree(out, ignore_errors=True)
    plan = ImagePlan(open_source(path), str(out), (tile, tile), get_segmenter(segmenter))
    threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    t0 = time.perf_counter()
    with get_task_stream(client) as ts:
        result = run_image(client, plan)
    seconds = time.perf_counter() - t0
    busy: dict[str, float] = {}
    for task in ts.data:
        stage = _STAGE_OF.get(str(task["key"]).split("-", 1)[0].rstrip("0123456789"), "other")
        spent = sum(s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute")
        busy[stage] = busy.get(stage, 0.0) + spent
    share = {k: busy.get(k, 0.0) / (v * threads) for k, v in result.stages.items() if v > 0}
    # The relabel pass's wall time is shared out to relabel, panoptic, measure and write
    # (by its tasks' time in each): its busy share is that of the four together.
    pass_wall = sum(result.stages.get(k, 0.0) for k in _PASS)
    pass_busy = sum(busy.get(k, 0.0) for k in _PASS)
    for k in _PASS:
        share[k] = pass_busy / max(pass_wall * threads, 1e-9)
    share["all"] = sum(busy.values()) / max(seconds * threads, 1e-9)
    return seconds, result.stages, share


_PASS = ("relabel", "panoptic", "measure", "write")


# Dask task key prefixes → the stage of `run_image` they belong to.
_STAGE_OF = {
    "ingest": "ingest",
    "filter": "statistics",
    "statistics": "statistics",
    "segment": "segment",
    "links": "stitch",
    "relabel": "relabel",  # the relabel pass (also panoptic, measure and level 1)
    "pyramid": "write",
    "panoptic": "panoptic",  # its pyramid
    "preview": "preview",
}


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--segmenters", nargs="+", default=["otsu"])
    parser.add_argument("--dask-image-max", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=AUTO_TILE[2])  # what `tile: auto` picks
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segpipe-bench"))
    parser.add_argument("--no-dask-image", action="store_true")
    args = parser.parse_args(argv)
    import dask
    from distributed import Client, LocalCluster

    from segpipe.backends import worker_env_config

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    rows = []
    with (
        dask.config.set(worker_env_config()),  # segpipe's worker settings, for both
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        for size in args.sizes:
            path = args.workdir / f"nuclei-{size}.tif"
            if not path.exists():
                synthetic.write_tiff(path, (size, size), tile=512, seed=1)
            sk, sp, di, stages, shares = [], [], [], [], []
            others: dict[str, list[float]] = {s: [] for s in args.segmenters if s != "otsu"}
            out = args.workdir / f"tp-{size}.zarr"
            for _ in range(args.repeats):
                sk.append(_skimage(path))
                seconds, stage, share = _segpipe(client, path, out, args.tile)
                sp.append(seconds)
                stages.append(stage)
                shares.append(share)
                if not args.no_dask_image and size <= args.dask_image_max:
                    di.append(_dask_image(client, path, args.tile))
                for name in others:
                    others[name].append(_segpipe(client, path, out, args.tile, name)[0])
            mpx = size * size / 1e6
            med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
            busy = {k: statistics.median(s.get(k, 0.0) for s in shares) for k in stages[0]}
            overall = [s["all"] for s in shares]
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
                "segpipe stages (s, workers busy): "
                + ", ".join(f"{k} {v:.2f} ({busy[k]:.0%})" for k, v in med.items())
                + f"; workers busy over the whole run {statistics.median(overall):.0%}",
                flush=True,
            )
            for name, secs in others.items():
                m = statistics.median(secs)
                print(f"{size}²: segpipe {name} {m:.2f} s ({mpx / m:.2f} Mpx/s)", flush=True)
            merged = med.get("stitch", 0) + med.get("relabel", 0)
            print(
                f"{size}²: stitch + relabel share of segpipe otsu: "
                f"{merged / sum(med.values()):.1%}",
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

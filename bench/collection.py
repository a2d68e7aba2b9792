"""A collection of many fields against a plain process pool, side by side in one run.

Usage: python -m bench.collection [--fields 8 64] [--size 1024] [--big 8192] [--repeats 1]
                                  [--workers 2] [--threads 1] [--workdir DIR]

On the same synthetic tiled uint16 TIFFs (``--size``² fields):
- the pool: ``concurrent.futures.ProcessPoolExecutor`` of ``--workers``
  processes; per file: read the TIFF, float32 Gaussian σ 2, Otsu, label,
  write the labels to a zstd Zarr array (all it writes);
- segpipe: the Prefect flow (`flows.segment.segment_collection`, Prefect's
  embedded API started once beforehand) on a LocalCluster of ``--workers``
  processes × ``--threads`` threads, writing everything it writes (image and
  pyramid, semantic / instance / panoptic labels and pyramids, tables,
  previews, manifests, provenance);
- segpipe on one ``--big``² image of the same total pixels (64 × 1024² =
  8192²), the single-image figure the collection is held to.

Marginal cost per image is (t(64) − t(8)) / 56 for each; the ratio
pool / segpipe is the figure the collections issue asks ≥ 0.5 of. The
workers' busy share is the sum of task compute times from Dask's task
stream / (wall × threads) over the 64-field run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import machine
from segpipe import synthetic


def pool_one(args: tuple[str, str]) -> int:
    """What a ten-line script does per field: labels only, to a zstd Zarr array."""
    import numpy as np
    import tifffile
    import zarr
    from skimage import filters, measure
    from zarr.codecs import ZstdCodec

    src, dst = args
    image = tifffile.imread(src).astype(np.float32)
    smooth = filters.gaussian(image, sigma=2, preserve_range=True)
    labels = measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)
    arr = zarr.create_array(
        dst, shape=labels.shape, chunks=labels.shape, dtype=np.uint32, compressors=ZstdCodec()
    )
    arr[:] = labels.astype(np.uint32)
    return int(labels.max())


def run_pool(paths: list[Path], out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    jobs = [(str(p), str(out / f"{p.stem}.zarr")) for p in paths]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(pool_one, jobs))
    return time.perf_counter() - t0


def run_segpipe(source: Path, out: Path, address: str) -> float:
    from flows.segment import heartbeats_as_set, segment_collection
    from segpipe.config import RunConfig

    shutil.rmtree(out, ignore_errors=True)
    config = RunConfig(input=str(source), output=str(out), cluster=address)
    t0 = time.perf_counter()
    with heartbeats_as_set():  # as `segpipe run` calls the flow
        rows = segment_collection(config.model_dump(mode="json", exclude={"prefect"}))
    seconds = time.perf_counter() - t0
    assert all(r["status"] == "done" for r in rows), rows
    return seconds


def busy_share(client: Any, stream: list[dict[str, Any]], wall: float) -> float:
    """Sum of task compute time in ``stream`` / (wall × threads)."""
    compute = sum(
        s["stop"] - s["start"]
        for t in stream
        for s in t.get("startstops", ())
        if s.get("action") == "compute"
    )
    threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    return compute / (wall * threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fields", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--big", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    import dask
    from distributed import Client, LocalCluster, get_task_stream

    from segpipe.backends import worker_env_config

    work = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-bench-collection-"))
    few, many = args.fields
    fields = work / "fields"
    paths = [
        synthetic.write_tiff(fields / f"f{i:04d}.tif", (args.size, args.size), seed=i)
        for i in range(many)
    ]
    subsets = {}
    for n in (few, many):
        subsets[n] = work / f"fields-{n}"
        subsets[n].mkdir(exist_ok=True)
        for p in paths[:n]:
            link = subsets[n] / p.name
            if not link.exists():
                link.symlink_to(p)
    big = synthetic.write_tiff(work / "big" / "big.tif", (args.big, args.big), seed=99)
    print(machine())
    times: dict[str, list[float]] = {}
    busy: list[float] = []
    with (
        # segpipe's glibc malloc settings, set before the workers start as `segpipe run`
        # sets them (a LocalCluster's env= is applied after: glibc has read its own)
        dask.config.set(worker_env_config()),
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        address = cluster.scheduler_address
        run_segpipe(subsets[few], work / "warm.zarr", address)  # Prefect's API, numba, caches
        for _ in range(args.repeats):
            for n in (few, many):
                times.setdefault(f"pool {n}", []).append(
                    run_pool(paths[:n], work / "pool", args.workers)
                )
                with get_task_stream(client) as stream:
                    t = run_segpipe(subsets[n], work / "out.zarr", address)
                times.setdefault(f"segpipe {n}", []).append(t)
                if n == many:
                    busy.append(busy_share(client, stream.data, t))
            times.setdefault("segpipe big", []).append(
                run_segpipe(big.parent, work / "big.zarr", address)
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    span = many - few
    pool_marginal = (med[f"pool {many}"] - med[f"pool {few}"]) / span
    seg_marginal = (med[f"segpipe {many}"] - med[f"segpipe {few}"]) / span
    for k, v in med.items():
        print(f"{k:>14}: {v:7.2f} s")
    print(
        f"marginal per {args.size}² field: pool {pool_marginal:.3f} s, segpipe {seg_marginal:.3f} s"
    )
    print(f"ratio pool / segpipe (marginal): {pool_marginal / seg_marginal:.2f}")
    print(
        f"{many} fields / one {args.big}²: "
        f"{med[f'segpipe {many}'] / med['segpipe big']:.2f}x the time"
    )
    print(f"workers busy over the {many}-field run: {100 * statistics.median(busy):.0f} %")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

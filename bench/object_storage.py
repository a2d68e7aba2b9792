"""Object storage vs local disk, side by side in one run (issue #16 part 4).

Usage: python -m bench.object_storage [--size 4096] [--tile 1024] [--repeats 3]
                                      [--segmenter otsu] [--out bench/object_storage.json]

One synthetic tiled uint16 TIFF, segmented end to end (`pipeline.run_image`: TIFF in,
OME-Zarr out, with pyramids, tables and preview) on one LocalCluster of 2 worker
processes × 1 thread, alternating in each repeat:
- ``local``: the TIFF on local disk into a store on local disk;
- ``s3``: the same TIFF as an object of a real S3 server (moto, started here on
  127.0.0.1) into a store in the same bucket.

Requests are counted by the server itself (its access log: one line per HTTP
request), by method, and divided by the image's blocks. moto is a Python server
on the same 2 cores, so the s3 times say what the requests cost against a slow
local server, not what a cloud bucket gives; the request counts hold anywhere.

Prints a markdown table and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine
from segpipe import synthetic

METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _requests(log: Path, start: int) -> tuple[collections.Counter[str], int]:
    """Requests the server logged after byte ``start`` of its log, by method."""
    with log.open("rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if '"' in line:
            method = line.split('"', 2)[1].split(" ", 1)[0]
            counts[method if method in METHODS else "other"] += 1
    return counts, log.stat().st_size


def _run(client: Any, source: str, out: str, tile: int, segmenter: str) -> tuple[float, int]:
    from segpipe.image import ImagePlan
    from segpipe.io import storage
    from segpipe.io.readers import open_source
    from segpipe.pipeline import run_image
    from segpipe.segmenters import get_segmenter

    where = storage.location(out)
    if where.exists():
        storage.remove_tree(where)
    plan = ImagePlan(open_source(source), out, (tile, tile), get_segmenter(segmenter))
    t0 = time.perf_counter()
    run_image(client, plan)
    return time.perf_counter() - t0, len(plan.grid())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segmenter", default="otsu")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("object_storage.json"))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="segpipe-s3-bench-"))
    port = _free_port()
    log = work / "moto.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        time.sleep(2)
        import s3fs
        from distributed import Client, LocalCluster

        from segpipe.cluster import StorageSettings
        from segpipe.config import StorageConfig
        from segpipe.io import storage

        storage.configure(StorageConfig())
        tiff = synthetic.write_tiff(work / "img.tif", (args.size, args.size), tile=512, seed=1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(tiff), "bench/img.tif")
        cases = {
            "local": (str(tiff), str(work / "out.zarr")),
            "s3": ("s3://bench/img.tif", "s3://bench/out.zarr"),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        requests: dict[str, dict[str, int]] = {}
        blocks = 0
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
            Client(cluster) as client,
        ):
            client.register_plugin(StorageSettings(StorageConfig()), name="segpipe-storage")
            _run(client, *cases["local"], args.tile, args.segmenter)  # warm-up
            for _ in range(args.repeats):
                for name, (src, out) in cases.items():
                    mark = log.stat().st_size
                    seconds, blocks = _run(client, src, out, args.tile, args.segmenter)
                    counts, _ = _requests(log, mark)
                    times[name].append(seconds)
                    if name == "s3":
                        requests = {"total": sum(counts.values()), **dict(counts)}
        mpx = args.size**2 / 1e6
        result = {
            "machine": machine(),
            "size": args.size,
            "tile": args.tile,
            "segmenter": args.segmenter,
            "blocks": blocks,
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            "runs": times,
            "mpx_per_s": {k: mpx / statistics.median(v) for k, v in times.items()},
            "s3_requests": requests,
            "s3_requests_per_block": {k: v / blocks for k, v in requests.items()},
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    s, r = result["seconds"], result["s3_requests_per_block"]
    print(f"{args.size}² uint16 TIFF, {args.segmenter}, tile {args.tile}: {blocks} blocks")
    print("| store | median s | Mpx/s | requests per block |")
    print("|---|---|---|---|")
    print(f"| local disk | {s['local']:.2f} | {result['mpx_per_s']['local']:.1f} | - |")
    detail = ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k != "total")
    print(
        f"| s3 (moto, 127.0.0.1) | {s['s3']:.2f} | {result['mpx_per_s']['s3']:.1f} | "
        f"{r['total']:.1f} ({detail}) |"
    )
    print(f"s3 / local time: {s['s3'] / s['local']:.2f}×")


if __name__ == "__main__":
    main()

"""Disk footprint of a run: the output store's peak size, sampled during the run, beside
its final size and the run's time; this tree and a baseline commit side by side.

Usage: python -m bench.footprint [--sizes 4096 16384 32768] [--baseline REV]
                                 [--repeats N] [--sample SECONDS] [--segmenter otsu]
                                 [--workdir DIR] [--out FILE]

For each size, one synthetic tiled uint16 TIFF; then, alternating, this tree and the
baseline (a ``git worktree`` of ``--baseline``, run from its own sources) each run
`pipeline.run_image` on a LocalCluster of 2 worker processes x 1 thread in a fresh
process, while a thread adds up the disk blocks of every file under the output
store every 0.1 s. Reported per run: seconds, Mpx/s, peak and final bytes on disk,
their ratio, and the peak's share in ``_segpipe/`` (scratch, markers); at the end, per
size, each tree's median seconds and its ratio to the first tree's. ``--sample 0``
times the runs without the sampler (which shares the client's process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "c27ec42^"
"""The commit before the filtered image left scratch."""


def disk_bytes(root: Path) -> tuple[int, int]:
    """Bytes on disk (allocated blocks) under ``root``, and those under ``_segpipe/``."""
    total = internal = 0
    for folder, _, names in os.walk(root):
        inside = "/_segpipe" in folder[len(str(root)) :]
        for name in names:
            try:
                size = os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:  # removed while walking
                continue
            total += size
            internal += size if inside else 0
    return total, internal


def measure(
    path: Path, out: Path, segmenter: str, tile: int, interval: float = 0.1
) -> dict[str, Any]:
    """One run of ``path`` into ``out`` with the disk sampled every ``interval`` seconds
    (in this process; 0: not sampled, the peak is then 0)."""
    import shutil

    import dask
    from distributed import Client, LocalCluster

    from segpipe.backends import worker_env_config
    from segpipe.image import ImagePlan
    from segpipe.io.readers import open_source
    from segpipe.pipeline import run_image
    from segpipe.segmenters import get_segmenter

    shutil.rmtree(out, ignore_errors=True)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, internal = disk_bytes(out)
            if total > peak[0]:
                peak[:] = [total, internal]
            time.sleep(interval)

    with (
        dask.config.set(worker_env_config()),
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        plan = ImagePlan(open_source(str(path)), str(out), (tile, tile), get_segmenter(segmenter))
        thread = threading.Thread(target=sample, daemon=True)
        if interval:
            thread.start()
        t0 = time.perf_counter()
        result = run_image(client, plan)
        seconds = time.perf_counter() - t0
        done.set()
        if interval:
            thread.join()
    final, _ = disk_bytes(out)
    px = 1
    for n in plan.spec.shape:
        px *= n
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": seconds,
        "mpx_per_s": px / 1e6 / seconds,
        "peak_bytes": peak[0],
        "peak_internal_bytes": peak[1],
        "final_bytes": final,
        "peak_over_final": peak[0] / max(final, 1),
        "objects": result.objects,
    }


def _run(source: Path, args: list[str]) -> dict[str, Any]:
    """`measure` in a fresh Python process importing segpipe from ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args[:-2], "--measure", *args[-2:]],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{source}: measurement failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _worktree(rev: str, where: Path) -> Path:
    if where.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(where), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--baseline", default=None, help="a commit to compare with")
    parser.add_argument("--segmenter", default="otsu")
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--sample", type=float, default=0.1, help="seconds between disk samples; 0: none"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segpipe-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "footprint.json")
    parser.add_argument("--measure", nargs=2, metavar=("TIFF", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        path, out = (Path(p) for p in args.measure)
        print(json.dumps(measure(path, out, args.segmenter, args.tile, args.sample)))
        return 0
    from bench.common import machine
    from segpipe import synthetic

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    trees = {"this tree": ROOT}
    if args.baseline:
        trees[f"baseline {args.baseline}"] = _worktree(args.baseline, args.workdir / "baseline")
    warm = args.workdir / "nuclei-512.tif"
    synthetic.write_tiff(warm, (512, 512), seed=1)
    for source in trees.values():  # compiles each tree's numba kernels before timing
        _run(source, ["--tile", "256", str(warm), str(args.workdir / "warm.zarr")])
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        path = args.workdir / f"nuclei-{size}.tif"
        if not path.exists():
            synthetic.write_tiff(path, (size, size), seed=0)
        for repeat in range(args.repeats):
            for name, source in trees.items():
                out = args.workdir / f"footprint-{size}.zarr"
                m = _run(source, ["--segmenter", args.segmenter, "--tile", str(args.tile),
                                  "--sample", str(args.sample),
                                  str(path), str(out)])  # fmt: skip
                row = {"size": size, "tree": name, "repeat": repeat,
                       "input_bytes": path.stat().st_size, **m}  # fmt: skip
                rows.append(row)
                print(
                    f"{size}² {name}: {m['seconds']:.1f} s ({m['mpx_per_s']:.1f} Mpx/s), "
                    f"peak {m['peak_bytes'] / 2**30:.2f} GiB "
                    f"({m['peak_internal_bytes'] / 2**30:.2f} in _segpipe), "
                    f"final {m['final_bytes'] / 2**30:.2f} GiB: peak/final "
                    f"{m['peak_over_final']:.2f}",
                    flush=True,
                )
    for size in args.sizes:
        medians = {
            name: statistics.median(
                r["seconds"] for r in rows if r["size"] == size and r["tree"] == name
            )
            for name in trees
        }
        first = medians["this tree"]
        print(
            f"{size}², median of {args.repeats}: "
            + "; ".join(f"{n} {m:.1f} s ({m / first:.3f}x this tree)" for n, m in medians.items())
        )
    args.out.write_text(json.dumps({"machine": machine(), "runs": rows}, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

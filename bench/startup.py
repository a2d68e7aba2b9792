"""Start-up of ``segpipe run`` on one small image, against the plain scikit-image script.

Usage: python -m bench.startup [--size 512] [--repeats 3] [--workdir DIR] [--write]

Each ``segpipe run`` is a new process with its own ``HOME`` (so its own
``~/.segpipe/prefect``) and no ``PREFECT_API_URL``, as on a laptop:

- ``new database``: the very first run (Prefect's local API creates its database);
- ``API stopped``: the API had exited (idle), its database is there;
- ``API running``: the API a run before left up is reused (the usual case);
- ``plain``: the script a user would write (read the TIFF, float32 Gaussian σ 2,
  Otsu, label, write the labels to Zarr), a new process too.

Printed: each case's wall (median of ``--repeats``), the "started in" figure the
CLI prints, and ratio segpipe / plain for the reused API (the collections issue
asks ≤ 10). The LocalCluster's start and close are timed apart (an image of
more than one block needs one). ``--write`` stores these figures under
``startup`` in ``segpipe/data/plan_costs.json``, which `segpipe plan` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine
from segpipe import synthetic
from segpipe.plan import COSTS_FILE

SEGPIPE = str(Path(sys.executable).parent / "segpipe")
COSTS = COSTS_FILE  # `segpipe plan` reads it from the package

PLAIN = """\
import shutil, sys
import numpy as np, tifffile, zarr
from skimage import filters, measure
image = tifffile.imread(sys.argv[1]).astype(np.float32)
smooth = filters.gaussian(image, sigma=2, preserve_range=True)
labels = measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)
shutil.rmtree(sys.argv[2], ignore_errors=True)
zarr.save_array(sys.argv[2], labels.astype(np.uint32))
"""


def _env(home: Path, idle: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SEGPIPE_"))}
    env.update(HOME=str(home), SEGPIPE_API_IDLE=str(idle))
    return env


def _segpipe(image: Path, out: Path, home: Path, idle: float) -> tuple[float, float]:
    """Wall seconds of one ``segpipe run`` and the start-up it printed."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [SEGPIPE, "run", "-i", str(image), "-o", str(out), "--full"],
        env=_env(home, idle),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    started = re.search(r"started in ([0-9.]+) s", done.stderr)
    return wall, float(started.group(1)) if started else float("nan")


def _plain(image: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN, str(image), str(out)], check=True)
    return time.perf_counter() - t0


def _api_exit(home: Path, timeout: float = 60) -> None:
    """Until the local API of ``home`` has exited (it is idle)."""
    state = home / ".segpipe" / "prefect" / "segpipe-api.json"
    deadline = time.monotonic() + timeout
    while state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _cluster_seconds() -> float:
    """Start and close of a LocalCluster as a run makes it (2 × 1 here)."""
    from segpipe.cluster import local_cluster

    t0 = time.perf_counter()
    cluster = local_cluster()
    cluster.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--write", action="store_true", help="store the figures for segpipe plan")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-startup-"))
    image = synthetic.write_tiff(work / "one.tif", (args.size, args.size), seed=1)
    print(machine())
    rows: dict[str, list[tuple[float, float]]] = {"new database": [], "API stopped": []}
    rows["API running"] = []
    plain = [_plain(image, work / "plain.zarr") for _ in range(args.repeats)]
    for k in range(args.repeats):
        home = work / f"home-{k}"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        idle = 2.0
        rows["new database"].append(_segpipe(image, work / "out.zarr", home, idle))
        _api_exit(home)
        rows["API stopped"].append(_segpipe(image, work / "out.zarr", home, 600))
        rows["API running"].append(_segpipe(image, work / "out.zarr", home, 600))
        rows["API running"].append(_segpipe(image, work / "out.zarr", home, 2.0))
        _api_exit(home)
    cluster = statistics.median(_cluster_seconds() for _ in range(args.repeats))
    base = statistics.median(plain)
    print(f"\n{args.size}² otsu, median of {args.repeats}; plain script {base:.2f} s")
    print(f"{'case':<14} {'wall s':>7} {'started in s':>13} {'× plain':>8}")
    medians = {}
    for case, runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        started = statistics.median(s for _, s in runs)
        medians[case] = (wall, started)
        print(f"{case:<14} {wall:7.2f} {started:13.2f} {wall / base:8.1f}")
    print(f"LocalCluster start + close: {cluster:.2f} s (images of more than one block)")
    if args.write:
        costs = json.loads(COSTS.read_text())
        running = medians["API running"][1]
        costs["startup"] = {
            "api_running_s": round(running, 2),
            "api_stopped_s": round(medians["API stopped"][1], 2),
            "api_new_database_s": round(medians["new database"][1], 2),
            "local_cluster_s": round(cluster, 2),
            "flow_and_exit_s": round(medians["API running"][0] - running, 2),
            "source": f"python -m bench.startup --size {args.size} --repeats {args.repeats}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}",
        }
        COSTS.write_text(json.dumps(costs, indent=2) + "\n")
        print(f"written: {COSTS} (startup)")


if __name__ == "__main__":
    main()

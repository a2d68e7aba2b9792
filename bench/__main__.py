"""The whole benchmark suite, one command: ``python -m bench`` (``make bench``).

Runs, one after another, each printing the machine, versions and medians:
1. `bench.throughput`: segpipe `otsu` end to end vs whole-image scikit-image
   (float32) and vs dask-image on the same LocalCluster, at 4096², 8192² and
   16384² (dask-image up to 8192²); time per stage and the workers' busy
   share; `watershed` and `unet` throughput;
2. `bench.memory`: peak RSS of the whole process tree of `segpipe run` at
   4096² and 16384², and the ratio;
3. `bench.deep`: CPU (or CUDA) inference throughput of the pipeline's
   segment stage with `unet` vs a plain torch loop over the same tiles;
4. `bench.sharding`: sharded vs unsharded outputs: end-to-end throughput,
   bytes on disk and the time to read one 256² region of the labels;
5. `bench.footprint`: the output store's peak and final size on disk and the
   time, at 4096², 16384² and 32768², beside the commit before the filtered
   image left scratch.

``--quick`` runs each at small sizes with one repeat (a smoke test of the
suite, not figures to quote).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import deep, footprint, memory, sharding, throughput

SEGMENTERS = ["--segmenters", "otsu", "watershed", "unet"]
QUICK_OUT = str(Path(tempfile.gettempdir()) / "segpipe-sharding-quick.json")  # not the figures
QUICK_FOOTPRINT = str(Path(tempfile.gettempdir()) / "segpipe-footprint-quick.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        plans = [
            (
                throughput.main,
                [*SEGMENTERS, "--sizes", "1024", "2048", "--repeats", "1"],
            ),
            (memory.main, ["--sizes", "1024", "2048"]),
            (deep.main, ["--size", "1024", "--repeats", "1"]),
            (
                sharding.main,
                ["--size", "2048", "--repeats", "1", "--regions", "20", "--out", QUICK_OUT],
            ),
            (footprint.main, ["--sizes", "1024", "--out", QUICK_FOOTPRINT]),
        ]
    else:
        r = str(args.repeats)
        plans = [
            (
                throughput.main,
                [*SEGMENTERS, "--sizes", "4096", "8192", "16384", "--repeats", r],
            ),
            (memory.main, ["--sizes", "4096", "16384"]),
            (deep.main, ["--repeats", r]),
            (sharding.main, ["--repeats", r]),
            (footprint.main, ["--baseline", footprint.BASELINE]),
        ]
    for fn, fn_args in plans:
        print(f"\n=== python -m {fn.__module__} {' '.join(fn_args)}", flush=True)
        code = fn(fn_args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Deep inference throughput: segpipe's segment stage with `unet` vs a plain torch loop.

Usage: python -m bench.deep [--size 2048] [--repeats 3] [--tile 256] [--batch 4]
                            [--block 1024] [--model PATH | --random [--depth 3] [--width 16]]
                            [--workdir DIR]

On the same synthetic image and the same model (the shipped U-Net, or
``--model``, or with ``--random`` a seeded, randomly initialised one: its
noisy classes make the instance step several times slower than a trained
model's), medians over ``--repeats`` of:
- segpipe's segment stage (`stages.segment.segment`: read each block + halo from
  Zarr, tiled inference, instances, writes, neighbour links) on the default
  LocalCluster (`segpipe.cluster.local_cluster`), the model already loaded by
  the workers (a warm-up pass runs first, untimed);
- a plain torch loop in this process (interleaved with the above), no Dask:
  the normalised whole image in memory, cut into tiles of the same edge and
  overlap, the same batch, the same memory format, crop-blended argmax; no
  I/O and no instances.
CUDA is used by both when this machine has it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine
from segpipe import synthetic
from segpipe.segmenters.deep import WEIGHTS


def _model(args: argparse.Namespace) -> Path:
    import torch

    from segpipe.deep import checkpoint
    from segpipe.deep.nets import NetSpec, build

    if args.model:
        return Path(args.model).absolute()
    shipped = WEIGHTS / "unet.pt"
    if shipped.is_file() and not args.random:
        return shipped
    spec = NetSpec(arch="unet", depth=args.depth, width=args.width)
    torch.manual_seed(0)
    path = args.workdir / f"unet-d{args.depth}-w{args.width}.pt"
    return checkpoint.save(path, build(spec).eval(), checkpoint.ModelMeta(spec=spec))


def _plain_loop(
    model: Path, image: np.ndarray, lo: float, hi: float, *, tile: int, batch: int
) -> tuple[float, int, str]:
    """Seconds for the whole image through a plain tiled torch loop; tiles; device."""
    import torch

    from segpipe.deep import checkpoint, infer

    loaded = checkpoint.load(model)
    spec = loaded.meta.spec
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = torch.channels_last
    net = loaded.net.to(device).to(memory_format=fmt)
    amp = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    m = spec.multiple
    overlap = 2 * infer.margin(spec)
    t0 = time.perf_counter()
    x = ((image.astype(np.float32) - np.float32(lo)) * np.float32(1 / (hi - lo))).astype(np.float32)
    x = np.pad(x, [(0, -n % m) for n in x.shape], mode="reflect")
    edges = [min(tile, n) for n in x.shape]
    starts = [infer.tile_starts(n, t, overlap) for n, t in zip(x.shape, edges, strict=True)]
    owned = [
        dict(zip(st, infer._owned(st, t, n), strict=True))
        for st, t, n in zip(starts, edges, x.shape, strict=True)
    ]
    positions = list(itertools.product(*starts))
    classes = np.zeros(x.shape, np.uint8)
    with torch.inference_mode():
        for i in range(0, len(positions), batch):
            group = positions[i : i + batch]
            stack = np.stack([x[r : r + edges[0], c : c + edges[1]] for r, c in group])
            xt = torch.from_numpy(stack[:, None]).to(device).contiguous(memory_format=fmt)
            if device == "cuda":
                with torch.autocast("cuda", dtype=amp):
                    logits = net(xt)
            else:
                logits = net(xt)
            labels = logits.float().softmax(1).argmax(1).to(torch.uint8).cpu().numpy()
            for (r, c), lab in zip(group, labels, strict=True):
                (r0, r1), (c0, c1) = owned[0][r], owned[1][c]
                classes[r0:r1, c0:c1] = lab[r0 - r : r1 - r, c0 - c : c1 - c]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, len(positions), device


def _pipeline_pass(client: Any, plan: Any, stats: Any) -> float:
    from segpipe import stages

    plan.markers("segment").clear()
    t0 = time.perf_counter()
    stages.segment.segment(client, plan, stats)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=256, help="network tile edge")
    parser.add_argument("--batch", type=int, default=4, help="tiles per forward call")
    parser.add_argument("--block", type=int, default=1024, help="pipeline block edge")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--model", type=str, default=None, help="default: the shipped unet")
    parser.add_argument(
        "--random", action="store_true", help="a seeded random U-Net of --depth, --width"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segpipe-bench-deep"))
    args = parser.parse_args(argv)

    import tifffile
    import torch
    from distributed import Client

    from segpipe import image as segpipe_image
    from segpipe import lifecycle, stages
    from segpipe.cluster import local_cluster
    from segpipe.deep import provenance
    from segpipe.io.readers import open_source
    from segpipe.segmenters import get_segmenter

    args.workdir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    print(machine())
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads here, CUDA: {gpu}")
    print(f"load average before: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    path = args.workdir / f"nuclei-{args.size}.tif"
    if not path.exists():
        synthetic.write_tiff(path, (args.size, args.size), tile=512, seed=1)
    model = _model(args)
    seg = get_segmenter("unet", model=str(model), tile=args.tile, batch=args.batch)
    out = args.workdir / "out.zarr"
    shutil.rmtree(out, ignore_errors=True)
    plan = segpipe_image.ImagePlan(open_source(path), str(out), (args.block, args.block), seg)
    mpx = args.size**2 / 1e6
    if cuda:  # one worker per GPU, advertising it, as a GPU cluster would
        from distributed import LocalCluster

        cluster = LocalCluster(
            n_workers=1, threads_per_worker=2, host="127.0.0.1", resources={"GPU": 1}
        )
    else:
        cluster = local_cluster()
    with cluster, Client(cluster) as client:
        threads = client.run(torch.get_num_threads)
        print(f"workers: {len(threads)}, torch threads per worker {list(threads.values())}")
        lifecycle.begin(plan)
        raw = stages.ingest.ingest(client, plan)
        stats = stages.statistics.statistics(client, plan, raw)
        params = seg.prepare(stats)
        image = tifffile.imread(path)
        lo, hi = params["lo"], params["hi"]
        _pipeline_pass(client, plan, stats)  # warm-up: each worker loads the model once
        _plain_loop(model, image[:512, :512], lo, hi, tile=args.tile, batch=1)
        # Interleaved, so a change in the machine's load hits both alike.
        pipe, loops = [], []
        for _ in range(args.repeats):
            pipe.append(_pipeline_pass(client, plan, stats))
            loops.append(_plain_loop(model, image, lo, hi, tile=args.tile, batch=args.batch))
        lifecycle.write_provenance(plan)
        table = provenance.read_table(plan.provenance)
    plain = [s for s, _, _ in loops]
    p_med, l_med = statistics.median(pipe), statistics.median(plain)
    net_seconds = sum(table["seconds"])
    print(
        f"\nimage {args.size}², block {args.block}, halo {seg.halo(2)[0]}, network tile "
        f"{seg.tile}, batch {args.batch}, blend {seg.opts.blend}, model {model.name}"
    )
    print(f"{'':34} {'seconds':>8} {'Mpx/s':>7} {'tiles':>6} device")
    print(
        f"{'segpipe segment stage (Dask)':34} {p_med:>8.2f} {mpx / p_med:>7.2f} "
        f"{sum(table['tiles']):>6} {','.join(sorted(set(table['device'])))}"
    )
    print(
        f"{'plain torch loop (no Dask, no I/O)':34} {l_med:>8.2f} {mpx / l_med:>7.2f} "
        f"{loops[0][1]:>6} {loops[0][2]}"
    )
    p_best, l_best = min(pipe), min(plain)
    print(
        f"pipeline / plain throughput: median {l_med / p_med:.2f}, best-of-{args.repeats} "
        f"{l_best / p_best:.2f} (target >= 0.85); best Mpx/s: segpipe {mpx / p_best:.2f}, "
        f"plain {mpx / l_best:.2f}; block task seconds, last pass, summed: {net_seconds:.2f}"
    )
    print(f"runs: segpipe {[round(s, 2) for s in pipe]}, plain {[round(s, 2) for s in plain]}")
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU check, one short script (`make test-gpu` runs it after the ``gpu`` tests):
`unet` throughput on the GPU against the CPU, and tiled inference on CUDA under
autocast against one float32 forward call of the whole image on the CPU.

Usage: python -m bench.gpu [--size 2048] [--repeats 3] [--tile 256] [--batch 8]
                           [--device cuda|cpu]

On the same synthetic image and the shipped U-Net: the segmenter's ``segment`` (tiled
inference, blending, classes and instances) on each device, medians over
``--repeats`` after a warm-up call; then the share of pixels whose class (nucleus or
background) agrees with the whole image's float32 argmax. ``--device cpu`` runs the
same script without a GPU (both sides on the CPU), to check the script itself.
Exits 2 when CUDA is asked for and there is none.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from bench.common import machine
from segpipe import synthetic
from segpipe.segmenters.deep import WEIGHTS


def _whole_cpu(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Nucleus where one float32 forward call of the whole normalised image says so."""
    import torch

    from segpipe.deep import checkpoint

    loaded = checkpoint.load(WEIGHTS / "unet.pt")
    net, multiple = loaded.net.eval(), loaded.meta.spec.multiple
    x = ((image.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    padded = np.pad(x, [(0, -n % multiple) for n in x.shape], mode="reflect")
    with torch.inference_mode():
        logits = net(torch.from_numpy(padded)[None, None])[0]
    nucleus = logits.argmax(0).numpy() != 0
    return nucleus[tuple(slice(0, n) for n in image.shape)]


def _timed(seg: Any, image: np.ndarray, params: dict[str, float], repeats: int) -> float:
    seg.segment(image, params)  # warm-up: the model loads, CUDA initialises
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seg.segment(image, params)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    import torch

    from segpipe.segmenters import get_segmenter

    print(machine())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (--device cpu checks the script)")
        return 2
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "none"
    print(f"torch {torch.__version__}, CUDA device: {name}")
    image = synthetic.render((slice(0, args.size), slice(0, args.size)), seed=5)[0]
    data = image.astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(image, [1, 99.8]))
    params = {"lo": lo, "hi": hi}
    mpx = args.size**2 / 1e6
    seconds = {}
    for device in ("cpu", args.device):
        seg = get_segmenter(
            "unet", model=str(WEIGHTS / "unet.pt"), tile=args.tile, batch=args.batch, device=device
        )
        seconds[device] = _timed(seg, data, params, args.repeats)
        print(f"unet on {device}: {seconds[device]:.2f} s, {mpx / seconds[device]:.2f} Mpx/s")
    print(f"{args.device} / cpu throughput: {seconds['cpu'] / seconds[args.device]:.1f}x")
    seg = get_segmenter("unet", model=str(WEIGHTS / "unet.pt"), tile=args.tile, device=args.device)
    tiled = seg.segment(data, params).semantic
    assert tiled is not None
    agree = float(((tiled != 0) == _whole_cpu(image, lo, hi)).mean())
    mode = "autocast" if args.device == "cuda" else "float32"
    print(f"tiled on {args.device} ({mode}) vs the whole image in float32 on the CPU: "
          f"{agree:.4%} of pixels agree")  # fmt: skip
    return 0 if agree >= 0.99 else 1


if __name__ == "__main__":
    raise SystemExit(main())

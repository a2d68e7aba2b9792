"""Tiled inference of one block: network tiles with overlap, batched forward calls, blended.

A block (with its halo) is padded to the network's multiple, cut into tiles
of ``tile`` pixels that overlap by twice the network's context, run ``batch``
tiles per forward call under ``torch.inference_mode()`` and put back
together: each pixel either comes from the one tile whose centre it is
nearest (``crop``) or is the Gaussian-weighted average of the softmax
probabilities of every tile that covers it (``gaussian``). A worker process
loads a model once per (file, mtime, device) and keeps it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from segpipe.deep import checkpoint
from segpipe.deep.nets import NetSpec
from segpipe.deep.postprocess import BOUNDARY
from segpipe.errors import ModelFileError, SegmenterError

log = logging.getLogger(__name__)

Blend = Literal["crop", "gaussian"]
Device = Literal["auto", "cpu", "cuda"]


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ≥ ``value``."""
    return -(-value // multiple) * multiple


def margin(spec: NetSpec) -> int:
    """Pixels per side a tile's output is not trusted: the context, rounded to the multiple."""
    return round_up(spec.context, spec.multiple)


@dataclass
class Runner:
    """A loaded model on its device, ready for batched forward calls."""

    net: Any  # torch.nn.Module or torch.jit.ScriptModule
    meta: checkpoint.ModelMeta
    path: Path
    device: str
    autocast: torch.dtype | None  # mixed precision on CUDA; None = float32
    min_edge: int = 0
    """The smallest tile edge the network takes (a bioimage.io package's min size)."""

    @property
    def spec(self) -> NetSpec:
        return self.meta.spec

    @property
    def margin(self) -> int:
        """Pixels per side of a tile's output not trusted (`margin` of the spec)."""
        return margin(self.spec)

    def forward(self, tiles: NDArray[np.float32]) -> NDArray[np.float32]:
        """Softmax probabilities ``(N, classes, *tile)`` of tiles ``(N, *tile)`` in one call."""
        x = torch.from_numpy(np.ascontiguousarray(tiles[:, None]))
        x = x.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=_memory_format(x.ndim))
        amp = (
            torch.autocast(device_type="cuda", dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            logits = self.net(x)
            if tuple(logits.shape) != (len(tiles), self.spec.classes, *tiles.shape[1:]):
                raise SegmenterError(
                    f"{self.path}: the network returned shape {tuple(logits.shape)} for input "
                    f"{tuple(x.shape)}; expected {(len(tiles), self.spec.classes)} + the "
                    "input's spatial shape (check classes= and depth=)."
                )
            probs = torch.softmax(logits.float(), dim=1)
        out: NDArray[np.float32] = probs.cpu().numpy()
        return out


def _memory_format(ndim: int) -> torch.memory_format:
    # channels_last speeds convolutions up on CPU (oneDNN) and on tensor cores alike.
    if ndim == 4:
        return torch.channels_last
    if ndim == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when this process sees a GPU, else ``cpu``.

    Raises
    ------
    SegmenterError
        If ``cuda`` is asked for and this process has no CUDA device.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SegmenterError(
            "device='cuda' but this worker has no CUDA device (torch "
            f"{torch.__version__}); use device=auto or run on a GPU worker."
        )
    if device not in ("cpu", "cuda"):
        raise SegmenterError(f"Expected device auto, cpu or cuda, got {device!r} instead.")
    return device


_CACHE: dict[tuple[str, int, str, NetSpec | None], Runner] = {}
_LOCK = threading.Lock()
_ANNOUNCED: set[str] = set()


def load_runner(
    path: str | Path,
    *,
    device: str = "auto",
    fallback: NetSpec | None = None,
    announce: bool = True,
) -> Runner:
    """The model at ``path`` on ``device``, loaded once per process and kept.

    Keyed by (path, mtime, device, fallback): a replaced file is loaded again.
    The first model a process puts on a device logs one line naming the device
    (unless ``announce`` is false: the client's check of the file is no worker).

    Raises
    ------
    InputNotFoundError, ModelFileError
        As `checkpoint.load`.
    SegmenterError
        If ``device`` is unavailable.
    """
    p = Path(path).expanduser().absolute()
    dev = resolve_device(device)
    try:
        mtime = p.stat().st_mtime_ns
    except FileNotFoundError:
        mtime = -1  # checkpoint.load names the missing file
    key = (str(p), mtime, dev, fallback)
    with _LOCK:  # a worker's threads share one copy of the weights
        runner = _CACHE.get(key)
        if runner is None:
            runner = _load(p, dev, fallback)
            _CACHE[key] = runner
        if announce and dev not in _ANNOUNCED:
            _ANNOUNCED.add(dev)
            _logger().info(
                "segpipe: inference on %s in this worker (model %s)", _describe(dev), p.name
            )
        return runner


def _load(p: Path, dev: str, fallback: NetSpec | None) -> Runner:
    loaded = checkpoint.load(p, fallback)
    net = loaded.net.to(dev)
    autocast: torch.dtype | None = None
    if dev == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not loaded.scripted:
        net = net.to(memory_format=_memory_format(loaded.meta.spec.ndim + 2))
    return Runner(net, loaded.meta, p, dev, autocast)


def _logger() -> logging.Logger:
    """The Dask worker's own logger inside a worker (its log is what the worker prints
    and the dashboard shows); this module's logger elsewhere."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return log
    return logging.getLogger("distributed.worker")


def _describe(device: str) -> str:
    if device == "cuda":
        i = torch.cuda.current_device()
        return f"cuda:{i} ({torch.cuda.get_device_name(i)})"
    return f"cpu ({torch.get_num_threads()} torch threads)"


def clear_cache() -> None:
    """Forget every loaded model (tests, and freeing GPU memory)."""
    with _LOCK:
        _CACHE.clear()


# -- tiling --------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` pixels covering ``length``, consecutive ones overlapping
    by at least ``overlap``; the last tile ends at ``length``.

    ``length``, ``tile`` and ``overlap`` multiples of the network's multiple give
    starts that are multiples of it too (the pooling grid stays aligned).
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    if step <= 0:
        raise SegmenterError(
            f"Expected a network tile larger than its overlap ({overlap} px), got {tile} instead."
        )
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _owned(starts: Sequence[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Where each tile's output is kept under ``crop``: split overlaps in the middle, so
    every kept pixel is at least half the overlap from the edge of its tile."""
    bounds = [0]
    for prev, nxt in itertools.pairwise(starts):
        bounds.append((nxt + prev + tile) // 2)
    bounds.append(length)
    return list(itertools.pairwise(bounds))


def _gaussian_window(shape: Sequence[int]) -> NDArray[np.float32]:
    """Weights peaking at the tile's centre, sigma = 1/8 of its edge (as nnU-Net)."""
    window = np.ones((), np.float32)
    for n in shape:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        w = np.exp(-0.5 * (x / (n / 8)) ** 2)
        window = np.multiply.outer(window, w.astype(np.float32))
    return np.maximum(window, np.float32(1e-6))


@dataclass(frozen=True)
class Prediction:
    """Classes, probabilities and how they were computed, for one block."""

    classes: NDArray[np.uint8]
    probabilities: NDArray[np.float32]  # (classes, *block)
    device: str
    tiles: int
    batch: int

    @property
    def boundary(self) -> NDArray[np.float32] | None:
        """Probability of the boundary class, when the model has one."""
        if self.probabilities.shape[0] <= BOUNDARY:
            return None
        out: NDArray[np.float32] = self.probabilities[BOUNDARY]
        return out


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict(
    image: NDArray[np.float32],
    runner: Runner,
    *,
    tile: int,
    batch: int,
    blend: Blend = "crop",
    origin: Sequence[int] | None = None,
) -> Prediction:
    """Classes of a normalised block by tiled, batched inference.

    Parameters
    ----------
    image : (M, N[, P]) ndarray of float32
        The block with its halo, normalised. A 3D block with a 2D network is
        run plane by plane.
    runner : Runner
        The model (`load_runner`).
    tile : int
        Network tile edge in pixels (rounded down to the network's multiple).
    batch : int
        Tiles per forward call.
    blend : {"crop", "gaussian"}
        How overlapping tiles are combined.
    origin : sequence of int, optional
        Position of ``image[0, 0]`` in the whole image: the block is padded in
        front so the network's pooling grid lines up with the whole image's.

    Returns
    -------
    Prediction
        ``classes`` (argmax, uint8) and ``probabilities`` of the block's shape.
    """
    spec = runner.spec
    m = spec.multiple
    if image.ndim not in (spec.ndim, spec.ndim + 1) or image.ndim < 2:
        raise SegmenterError(
            f"{runner.path}: a {spec.ndim}D network cannot segment a {image.ndim}D block."
        )
    planes = image.ndim - spec.ndim  # 1: a 2D network over the planes of a volume
    shape = image.shape[planes:]
    front = [0] * len(shape) if origin is None else [o % m for o in origin[planes:]]
    least = round_up(runner.min_edge, m)
    pads = [(f, max(round_up(n + f, m), least) - n - f) for n, f in zip(shape, front, strict=True)]
    # reflect, as the whole-image reference; a one-pixel axis cannot reflect
    mode: Literal["reflect", "edge"] = "reflect" if min(shape) > 1 else "edge"
    padded = np.asarray(np.pad(image, [(0, 0)] * planes + pads, mode=mode), np.float32)
    if planes == 0:
        padded = padded[None]
    full = padded.shape[1:]
    edge = max(m, tile // m * m)
    tiles = tuple(min(edge, n) for n in full)
    overlap = 2 * runner.margin
    starts = [tile_starts(n, t, overlap) for n, t in zip(full, tiles, strict=True)]
    items = [(z, s) for z in range(padded.shape[0]) for s in itertools.product(*starts)]
    probs = np.zeros((spec.classes, *padded.shape), np.float32)
    if blend == "crop":
        owned = [
            dict(zip(st, _owned(st, t, n), strict=True))
            for st, t, n in zip(starts, tiles, full, strict=True)
        ]
    else:
        window = _gaussian_window(tiles)
        weights = np.zeros(padded.shape, np.float32)
    for group in _batches(items, batch):
        stack = np.stack(
            [
                padded[(z, *(slice(s, s + t) for s, t in zip(st, tiles, strict=True)))]
                for z, st in group
            ]
        )
        out = runner.forward(stack)
        for (z, st), p in zip(group, out, strict=True):
            if blend == "crop":
                keep = [own[s] for own, s in zip(owned, st, strict=True)]
                dst = (slice(None), z, *(slice(a, b) for a, b in keep))
                src = (
                    slice(None),
                    *(slice(a - s, b - s) for (a, b), s in zip(keep, st, strict=True)),
                )
                probs[dst] = p[src]
            else:
                region = (z, *(slice(s, s + t) for s, t in zip(st, tiles, strict=True)))
                probs[(slice(None), *region)] += p * window
                weights[region] += window
    if blend == "gaussian":
        probs /= weights
    inner = tuple(slice(f, f + n) for (f, _), n in zip(pads, shape, strict=True))
    probs = probs[(slice(None), slice(None), *inner)]
    if planes == 0:
        probs = probs[:, 0]
    classes = np.argmax(probs, axis=0).astype(np.uint8)
    return Prediction(classes, np.ascontiguousarray(probs), runner.device, len(items), batch)


def check_model(runner: Runner) -> None:
    """Run the network once on a small input: a TorchScript file that does not map
    ``(N, 1, ...)`` to ``(N, classes, ...)`` is named before any block runs.

    Raises
    ------
    ModelFileError
        If the forward call fails or returns another shape.
    """
    spec = runner.spec
    if spec.in_channels != 1:
        raise ModelFileError(
            f"{runner.path}: the network takes {spec.in_channels} input channels; "
            "segpipe feeds it one (the image's selected channel)."
        )
    probe(
        runner,
        spec.ndim,
        spec.multiple * 2,
        lambda problem: ModelFileError(f"{runner.path}: {problem}."),
    )


def probe(runner: Any, ndim: int, edge: int, refuse: Callable[[str], ModelFileError]) -> None:
    """Run ``runner`` once on zeros of ``edge`` a side; a failure of the network is
    ``refuse(problem)`` (its first line), one the runner names is a `ModelFileError`."""
    try:
        runner.forward(np.zeros((1, *(edge,) * ndim), np.float32))
    except SegmenterError as err:
        raise ModelFileError(str(err)) from err
    except Exception as err:  # a TorchScript graph can raise anything
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise refuse(f"the network fails on a {ndim}D input of {edge} px ({first})") from err

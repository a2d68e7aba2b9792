"""bioimage.io model packages as deep segmenters' models (``--set model=PACKAGE``).

A package (a folder, its ``rdf.yaml``/``bioimageio.yaml``, or a ``.zip``; spec 0.5,
or 0.4 where bioimageio.spec converts it) is validated by ``bioimageio.spec`` and
read into a `PackageInfo`: its input and output axes, the tile sizes it accepts
(min and step per spatial axis), its output halo, and its pre- and postprocessing.
Everything segpipe cannot honour is refused in one line naming the file, before
any compute. Then:

- preprocessing runs on each block before tiling: ``scale_range`` and
  ``zero_mean_unit_variance`` from the whole image's statistics (`prepare`), as
  the package's own whole-image run computes them; the pointwise steps as they are;
- the network runs on tiles of sizes the package accepts (`PackageRunner`),
  overlapping by at least its halo; postprocessing is pointwise and runs per tile;
- its outputs become classes and instances (`interpret`): one channel is a
  foreground probability; a channel named like ``boundary`` parts touching objects
  (seeds are foreground without boundary, grown by a watershed on it); otherwise
  each channel is a class.

bioimageio.spec and bioimageio.core are optional: without them a package is
refused in one line saying how to install them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage as ndi

from segpipe.deep import checkpoint
from segpipe.deep.infer import Runner, probe, resolve_device
from segpipe.deep.nets import NetSpec
from segpipe.deep.postprocess import BOUNDARY, INTERIOR, instances_from_classes, nuclei
from segpipe.errors import InputNotFoundError, ModelFileError, SegmenterError
from segpipe.stats import ImageStats

__all__ = [
    "PackageInfo",
    "PackageRunner",
    "Step",
    "digest",
    "interpret",
    "is_package",
    "load_runner",
    "prepare",
    "preprocess",
    "read_package",
]

DESCRIPTION_FILES = ("rdf.yaml", "bioimageio.yaml")
WHOLE_IMAGE = frozenset({"scale_range", "zero_mean_unit_variance"})
"""Preprocessing computed from the whole image's statistics (never per tile)."""
POINTWISE = frozenset(
    {"scale_linear", "clip", "sigmoid", "binarize", "ensure_dtype", "fixed_zero_mean_unit_variance"}
)
"""Steps that map each value alone: the same per tile as on the whole image."""
POSTPROCESSING = POINTWISE | {"softmax"}  # softmax: across channels, within one pixel
SPACE = ("z", "y", "x")
DEFAULT_CONTEXT = 32
"""Overlap per side of tiles (and the least halo) when a package declares no output halo."""
_BOUNDARY_NAME = re.compile(r"bound|contour|edge", re.IGNORECASE)
_BACKGROUND_NAME = re.compile(r"^(background|bg|back)", re.IGNORECASE)


def is_package(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a bioimage.io package: a folder or zip holding an ``rdf.yaml`` or
    ``bioimageio.yaml``, or such a YAML file itself. A TorchScript file (also a zip) is not."""
    p = Path(path)
    if p.is_dir():
        return any((p / n).is_file() for n in DESCRIPTION_FILES) or any(p.glob("*.bioimageio.yaml"))
    if p.suffix.lower() in (".yaml", ".yml"):
        return True
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            return any(
                n in DESCRIPTION_FILES or n.endswith(".bioimageio.yaml") for n in z.namelist()
            )
    return False


@dataclass(frozen=True)
class Step:
    """One pre- or postprocessing step: its bioimage.io id and keyword arguments."""

    op: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PackageInfo:
    """What segpipe uses of a package, every axis in segpipe's order ``(Z, Y, X)``."""

    source: Path
    name: str
    ndim: int
    input_axes: tuple[str, ...]
    """The input tensor's axes by kind and id, e.g. ``("batch", "channel", "y", "x")``."""
    output_axes: tuple[str, ...]
    min_shape: tuple[int, ...]
    step: tuple[int, ...]
    """0 where the package takes one fixed size."""
    halo: tuple[int, ...]
    channels: tuple[str, ...]
    """Names of the output's channels (one: ``foreground`` unless named)."""
    pre: tuple[Step, ...]
    post: tuple[Step, ...]
    weights: str
    min_size: int = 0

    @property
    def min_edge(self) -> int:
        """The smallest square tile edge the package takes."""
        return max(self.min_shape)

    @property
    def multiple(self) -> int:
        """Tile edges are multiples of this (a power of two, as `NetSpec.multiple`)."""
        steps = [s for s in self.step if s]
        if not steps:  # one fixed size: the largest power of two dividing it, up to 64
            edge = self.min_edge
            return max(2, min(64, edge & -edge))
        return int(np.lcm.reduce(np.array([*steps, 2], dtype=np.int64)))

    @property
    def context(self) -> int:
        """Overlap per side of tiles: the declared halo, else `DEFAULT_CONTEXT`."""
        return max(self.halo) if max(self.halo) > 0 else DEFAULT_CONTEXT

    @property
    def layout(self) -> str:
        """How outputs become classes: ``foreground``, ``foreground+boundary``,
        ``segpipe`` (background, interior, boundary) or ``classes``."""
        n = len(self.channels)
        bound = [i for i, c in enumerate(self.channels) if _BOUNDARY_NAME.search(c)]
        if n == 1:
            return "foreground"
        if n == 2 and len(bound) == 1:
            return "foreground+boundary"
        if n == 3 and len(bound) == 1 and _background(self.channels) is not None:
            return "segpipe"
        return "classes"

    @property
    def classes(self) -> list[str]:
        """The output's semantic classes, background first."""
        layout = self.layout
        if layout == "foreground":
            return ["background", self.channels[0]]
        if layout == "foreground+boundary":
            fg = next(c for c in self.channels if not _BOUNDARY_NAME.search(c))
            return ["background", fg]
        if layout == "segpipe":
            return ["background", "nucleus"]
        bg = _background(self.channels) or 0
        return [self.channels[bg], *(c for i, c in enumerate(self.channels) if i != bg)]


def _background(channels: Sequence[str]) -> int | None:
    return next((i for i, c in enumerate(channels) if _BACKGROUND_NAME.search(c)), None)


# -- reading a package --------------------------------------------------------------


def _refuse(source: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{source}: bioimage.io package: {problem}")


def _load_description(source: Path) -> Any:
    from segpipe.deep.export import require

    require("a bioimage.io package", source)
    from bioimageio.spec import InvalidDescr, load_model_description

    try:
        descr = load_model_description(source, format_version="latest", perform_io_checks=True)
    except Exception as err:  # bioimageio.spec raises ValueError, OSError and its own
        lines = [ln.strip(" -") for ln in str(err).splitlines() if ln.strip(" -")]
        if len(lines) > 1 and lines[0].endswith(":"):  # "Invalid model description:" + items
            problem = f"fails bioimageio.spec's validation ({'; '.join(lines[1:4])})"
        else:
            problem = f"not readable ({lines[0] if lines else type(err).__name__})"
        raise _refuse(source, problem) from err
    if isinstance(descr, InvalidDescr) or getattr(descr, "type", None) != "model":
        errors = [e for d in descr.validation_summary.details for e in d.errors]
        problem = (
            f"{'.'.join(str(x) for x in errors[0].loc)}: {errors[0].msg}" if errors else "invalid"
        )
        raise _refuse(source, f"fails bioimageio.spec's validation ({problem})")
    return descr


def _axes(source: Path, tensor: Any, what: str) -> tuple[tuple[str, ...], list[Any], int]:
    """The tensor's axes as names, its spatial axes in segpipe's order, its channel count."""
    names: list[str] = []
    space: dict[str, Any] = {}
    channels = 1
    for axis in tensor.axes:
        kind = axis.type
        if kind == "batch":
            names.append("batch")
        elif kind == "channel":
            names.append("channel")
            channels = len(axis.channel_names)
        elif kind == "space" and str(axis.id) in SPACE:
            names.append(str(axis.id))
            space[str(axis.id)] = axis
        else:
            raise _refuse(
                source,
                f"{what} axis {axis.id!s} ({kind}) is not supported; segpipe reads batch, "
                "channel and space axes z, y, x",
            )
    order = [a for a in SPACE if a in space]
    if order not in (["y", "x"], ["z", "y", "x"]):
        raise _refuse(source, f"{what} has space axes {order}; segpipe needs y, x (and z)")
    return tuple(names), [space[a] for a in order], channels


def _steps(
    source: Path, steps: Sequence[Any], allowed: frozenset[str], what: str
) -> tuple[Step, ...]:
    out = []
    for s in steps:
        op = str(s.id)
        kwargs = s.kwargs.model_dump() if getattr(s, "kwargs", None) is not None else {}
        if op not in allowed:
            raise _refuse(
                source,
                f"{what} step {op!r} is not supported (segpipe runs {', '.join(sorted(allowed))})",
            )
        if op == "clip" and (
            kwargs.get("min_percentile") is not None or kwargs.get("max_percentile") is not None
        ):
            raise _refuse(source, f"{what} step clip at percentiles is not supported")
        if op == "softmax" and str(kwargs.get("axis", "channel")) != "channel":
            raise _refuse(source, f"{what} softmax along {kwargs['axis']} is not supported")
        for key in ("reference_tensor",):
            if kwargs.get(key) is not None:
                raise _refuse(source, f"{what} step {op} refers to another tensor")
        out.append(Step(op, kwargs))
    return tuple(out)


def read_package(path: str | os.PathLike[str]) -> tuple[PackageInfo, Any]:
    """Validate a package and read what segpipe needs of it.

    Parameters
    ----------
    path : str or path
        A folder, its ``rdf.yaml``/``bioimageio.yaml``, or a ``.zip``.

    Returns
    -------
    (PackageInfo, ModelDescr)

    Raises
    ------
    InputNotFoundError
        If nothing is at ``path``.
    ModelFileError
        One line naming the file and the first thing segpipe cannot honour.
    """
    source = Path(path).expanduser().absolute()
    if not source.exists():
        raise InputNotFoundError(f"{source}: model file not found.")
    descr = _load_description(source)
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise _refuse(
            source,
            f"{len(descr.inputs)} inputs and {len(descr.outputs)} outputs; segpipe runs "
            "models of one input and one output",
        )
    (inp,), (out,) = descr.inputs, descr.outputs
    in_names, in_space, in_channels = _axes(source, inp, "input")
    out_names, out_space, _ = _axes(source, out, "output")
    if in_channels != 1:
        raise _refuse(source, f"the input has {in_channels} channels; segpipe feeds one")
    if [a.id for a in in_space] != [a.id for a in out_space]:
        raise _refuse(source, "the output's space axes differ from the input's")
    mins, steps, halos = [], [], []
    for a_in, a_out in zip(in_space, out_space, strict=True):
        size = a_in.size
        if isinstance(size, int):
            mins.append(size)
            steps.append(0)
        elif hasattr(size, "min") and hasattr(size, "step"):
            mins.append(int(size.min))
            steps.append(int(size.step))
        else:
            raise _refuse(source, f"input axis {a_in.id} takes its size from another tensor")
        o = a_out.size
        same = (
            hasattr(o, "tensor_id")
            and str(o.tensor_id) == str(inp.id)
            and str(o.axis_id) == str(a_in.id)
            and int(getattr(o, "offset", 0)) == 0
            and getattr(a_out, "scale", 1.0) == getattr(a_in, "scale", 1.0)
        ) or (isinstance(o, int) and isinstance(size, int) and o == size)
        if not same:
            raise _refuse(source, f"output axis {a_out.id} is not the input's size")
        halos.append(int(getattr(a_out, "halo", 0) or 0))
    for m, s, a in zip(mins, steps, in_space, strict=True):
        if s and (s & (s - 1) or m % s):
            raise _refuse(
                source,
                f"input axis {a.id}: min {m}, step {s}; segpipe tiles need a power-of-two "
                "step that divides the min",
            )
    if 0 in steps and len(set(mins)) > 1:
        raise _refuse(source, f"fixed input size {mins} is not square; segpipe's tiles are")
    weights = descr.weights
    if weights.torchscript is not None:
        fmt = "torchscript"
    elif weights.pytorch_state_dict is not None:
        fmt = "pytorch_state_dict"
    else:
        have = [k for k, v in weights if v is not None]
        raise _refuse(
            source, f"weights {have}; segpipe runs torchscript or pytorch_state_dict weights"
        )
    channel_axis = next((a for a in out.axes if a.type == "channel"), None)
    channels = (
        tuple(str(c) for c in channel_axis.channel_names) if channel_axis is not None else ()
    ) or ("foreground",)
    pre = _steps(source, inp.preprocessing, WHOLE_IMAGE | POINTWISE, "preprocessing")
    stats_at = [i for i, s in enumerate(pre) if s.op in WHOLE_IMAGE]
    if any(i > 0 and any(s.op != "ensure_dtype" for s in pre[:i]) for i in stats_at):
        raise _refuse(
            source,
            "preprocessing computes statistics after another step; segpipe takes them of "
            "the raw image",
        )
    for i in stats_at:
        axes = pre[i].kwargs.get("axes")
        if axes is not None and not {str(a.id) for a in in_space} <= {str(a) for a in axes}:
            raise _refuse(
                source,
                f"{pre[i].op} over axes {[str(a) for a in axes]}: statistics per row or plane "
                "are not supported; segpipe takes them over the whole image",
            )
    post = _steps(source, out.postprocessing, POSTPROCESSING, "postprocessing")
    config = descr.config.model_dump() if descr.config is not None else {}
    own = config.get("segpipe") if isinstance(config, dict) else None
    min_size = int(own.get("min_size", 0)) if isinstance(own, dict) else 0
    info = PackageInfo(
        source=source,
        name=str(descr.name),
        ndim=len(in_space),
        input_axes=in_names,
        output_axes=out_names,
        min_shape=tuple(mins),
        step=tuple(steps),
        halo=tuple(halos),
        channels=channels,
        pre=pre,
        post=post,
        weights=fmt,
        min_size=min_size,
    )
    if info.multiple > 64:
        raise _refuse(source, f"tile step {info.multiple} is over 64")
    return info, descr


# -- statistics and pointwise steps -------------------------------------------------------


def _std(stats: ImageStats) -> float:
    """Standard deviation from the whole image's histogram (bin centres)."""
    c = stats.centers.astype(np.float64)
    n = stats.counts.astype(np.float64)
    if n.sum() == 0:
        return 0.0
    mean = stats.mean
    return float(np.sqrt((n * (c - mean) ** 2).sum() / n.sum()))


def prepare(info: PackageInfo, stats: ImageStats) -> dict[str, Any]:
    """The whole image's statistics each whole-image preprocessing step uses."""
    params: dict[str, Any] = {}
    for i, s in enumerate(info.pre):
        if s.op == "scale_range":
            lo = stats.percentile(float(s.kwargs.get("min_percentile", 0.0)))
            hi = stats.percentile(float(s.kwargs.get("max_percentile", 100.0)))
            params[f"pre{i}"] = (lo, hi)
        elif s.op == "zero_mean_unit_variance":
            params[f"pre{i}"] = (stats.mean, _std(stats))
    return params


def _pointwise(x: NDArray[np.float32], s: Step, channel_axis: int | None) -> NDArray[np.float32]:
    k = s.kwargs

    def shaped(value: Any) -> NDArray[np.float32]:
        arr = np.asarray(value, np.float32).reshape(-1)
        if arr.size == 1 or channel_axis is None:
            return arr[:1].reshape(())
        shape = [1] * x.ndim
        shape[channel_axis] = arr.size
        return arr.reshape(shape)

    if s.op == "scale_linear":
        return x * shaped(k.get("gain", 1.0)) + shaped(k.get("offset", 0.0))
    if s.op == "fixed_zero_mean_unit_variance":
        return (x - shaped(k["mean"])) / shaped(k["std"])
    if s.op == "clip":
        lo = -np.inf if k.get("min") is None else k["min"]
        hi = np.inf if k.get("max") is None else k["max"]
        return np.clip(x, lo, hi).astype(np.float32)
    if s.op == "sigmoid":
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if s.op == "binarize":
        return (x > shaped(k["threshold"])).astype(np.float32)
    if s.op == "softmax":
        axis = 0 if channel_axis is None else channel_axis
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    if s.op == "ensure_dtype":
        return x.astype(np.dtype(str(k["dtype"]))).astype(np.float32)
    raise SegmenterError(f"bioimage.io step {s.op!r} has no pointwise form")  # read_package refuses


def preprocess(
    block: NDArray[np.floating], info: PackageInfo, params: Mapping[str, Any]
) -> NDArray[np.float32]:
    """The package's preprocessing of a block, its statistics those of the whole image."""
    x = np.asarray(block, np.float32)
    for i, s in enumerate(info.pre):
        if s.op == "scale_range":
            lo, hi = params[f"pre{i}"]
            eps = float(s.kwargs.get("eps", 1e-6))
            x = ((x - np.float32(lo)) / np.float32(hi - lo + eps)).astype(np.float32)
        elif s.op == "zero_mean_unit_variance":
            mean, std = params[f"pre{i}"]
            eps = float(s.kwargs.get("eps", 1e-6))
            x = ((x - np.float32(mean)) / np.float32(std + eps)).astype(np.float32)
        else:
            x = _pointwise(x, s, None)
    return x


# -- the network ---------------------------------------------------------------------------


def _load_net(info: PackageInfo, descr: Any) -> Any:
    try:
        if info.weights == "torchscript":
            return torch.jit.load(descr.weights.torchscript.get_reader(), map_location="cpu").eval()
        from bioimageio.core.backends.pytorch_backend import load_torch_model

        # the architecture's code is imported (or the package's source file run), as
        # bioimageio.core does; the weights are read with torch.load(weights_only=True)
        net = load_torch_model(descr.weights.pytorch_state_dict, load_state=True, devices=["cpu"])
        return net.eval()
    except Exception as err:  # torch and bioimageio.core raise many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _refuse(info.source, f"{info.weights} weights do not load ({first})") from err


@dataclass
class PackageRunner(Runner):
    """A package's network on tiles: segpipe's axes in, the package's axes through the
    network, its postprocessing applied per tile; class scores ``(N, C, *tile)`` out."""

    info: PackageInfo | None = None
    context: int = DEFAULT_CONTEXT

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        """The network on ``(n, 1, *tile)`` in segpipe's axes (n = 1 when the package has
        no batch axis); its output in segpipe's axes ``(n, C, *tile)``."""
        info = self.info
        assert info is not None
        canon = ["batch", "channel", *SPACE[-info.ndim :]]
        for axis in reversed(canon):  # the axes the package lacks have length 1 here
            if axis not in info.input_axes:
                x = x.squeeze(canon.index(axis))
        present = [a for a in canon if a in info.input_axes]
        y = self.net(x.permute(*[present.index(a) for a in info.input_axes]))
        y = y[0] if isinstance(y, tuple | list) else y
        names = list(info.output_axes)
        for axis in ("batch", "channel"):
            if axis not in names:
                y, names = y.unsqueeze(-1), [*names, axis]
        return y.float().permute(*[names.index(a) for a in canon])

    def forward(self, tiles: NDArray[np.float32]) -> NDArray[np.float32]:
        info = self.info
        assert info is not None
        x = torch.from_numpy(np.ascontiguousarray(tiles[:, None])).to(self.device)
        amp = (
            torch.autocast(device_type="cuda", dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            if "batch" in info.input_axes:
                y = self._call(x)
            else:
                y = torch.cat([self._call(x[i : i + 1]) for i in range(len(x))])
        expect = (len(tiles), len(info.channels), *tiles.shape[1:])
        if tuple(y.shape) != expect:
            raise SegmenterError(
                f"{info.source}: the network returned shape {tuple(y.shape)} for "
                f"{len(tiles)} tiles of {tiles.shape[1:]}; expected {expect}."
            )
        out: NDArray[np.float32] = y.cpu().numpy()
        for s in info.post:
            out = _pointwise(out, s, 1)
        if out.shape[1] == 1:  # a foreground score: background is its complement
            out = np.concatenate([1.0 - out, out], axis=1)
        return np.ascontiguousarray(out, np.float32)

    @property
    def margin(self) -> int:
        return self.context


_CACHE: dict[tuple[str, int, str], PackageRunner] = {}
_LOCK = threading.Lock()


def _mtime(path: Path) -> int:
    if path.is_dir():
        return max((f.stat().st_mtime_ns for f in path.iterdir()), default=0)
    return path.stat().st_mtime_ns


def load_runner(path: str | os.PathLike[str], *, device: str = "auto") -> PackageRunner:
    """A package's network on ``device``, read once per process (and file version) and kept.

    Raises
    ------
    InputNotFoundError, ModelFileError
        As `read_package`, or when its weights do not load or run.
    SegmenterError
        If ``device`` is unavailable.
    """
    p = Path(path).expanduser().absolute()
    dev = resolve_device(device)
    if not p.exists():
        raise InputNotFoundError(f"{p}: model file not found.")
    key = (str(p), _mtime(p), dev)
    with _LOCK:
        runner = _CACHE.get(key)
        if runner is None:
            runner = _build(p, dev)
            _CACHE[key] = runner
        return runner


def _build(p: Path, dev: str) -> PackageRunner:
    info, descr = read_package(p)
    net = _load_net(info, descr).to(dev)
    multiple = info.multiple
    depth = max(1, int(np.log2(multiple)))
    if 2**depth != multiple:
        raise _refuse(p, f"tile step {multiple} is not a power of two")
    spec = NetSpec(
        arch="unet",
        ndim=2 if info.ndim == 2 else 3,
        in_channels=1,
        classes=max(2, len(info.channels)),
        depth=depth,
        width=1,  # unused: the package's network is its own
    )
    meta = checkpoint.ModelMeta(
        spec=spec, min_size=info.min_size, card={"classes": info.classes, "bioimageio": info.name}
    )
    autocast: torch.dtype | None = None
    if dev == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    context = -(-max(info.context, 1) // multiple) * multiple
    runner = PackageRunner(net, meta, p, dev, autocast, info.min_edge, info, context)
    edge = info.min_edge if 0 in info.step else max(info.min_edge, 2 * context + multiple)
    probe(runner, info.ndim, edge, lambda problem: _refuse(p, problem))
    return runner


# -- outputs to classes and instances ----------------------------------------------------------


def interpret(
    scores: NDArray[np.float32], info: PackageInfo, *, min_size: int = 0
) -> tuple[NDArray[np.uint8], NDArray[np.int32]]:
    """Semantic classes (`PackageInfo.classes`) and instances of a block's output scores.

    Parameters
    ----------
    scores : (C, M, N[, P]) ndarray of float32
        The postprocessed output (a single channel given as background and foreground).
    info : PackageInfo
        Names the channels.
    min_size : int
        Smallest seed kept as an instance, in pixels.
    """
    layout = info.layout
    if layout in ("foreground", "foreground+boundary"):
        if layout == "foreground":
            fg, bd = scores[1], None
        else:
            b = next(i for i, c in enumerate(info.channels) if _BOUNDARY_NAME.search(c))
            fg, bd = scores[1 - b], scores[b]
        classes = np.where(fg > 0.5, INTERIOR, 0).astype(np.uint8)
        if bd is not None:
            classes[(fg > 0.5) & (bd > 0.5)] = BOUNDARY
        return nuclei(classes), instances_from_classes(classes, bd, min_size=min_size)
    if layout == "segpipe":
        bg = _background(info.channels)
        b = next(i for i, c in enumerate(info.channels) if _BOUNDARY_NAME.search(c))
        lut = np.full(len(info.channels), INTERIOR, np.uint8)
        lut[bg], lut[b] = 0, BOUNDARY
        classes = lut[np.argmax(scores, axis=0)]
        return nuclei(classes), instances_from_classes(classes, scores[b], min_size=min_size)
    bg = _background(info.channels) or 0
    order = [bg, *(i for i in range(len(info.channels)) if i != bg)]
    lut = np.argsort(order).astype(np.uint8)
    semantic = lut[np.argmax(scores, axis=0)]
    instances = np.zeros(semantic.shape, np.int32)
    offset = 0
    for c in range(1, len(order)):
        labels, n = ndi.label(semantic == c)
        if n:
            if min_size:
                sizes = np.bincount(labels.ravel())
                labels[(sizes < min_size)[labels]] = 0
            instances[labels > 0] = labels[labels > 0] + offset
            offset += n
    return semantic, instances


def digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a package: its file, or every file of its folder in name order."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()

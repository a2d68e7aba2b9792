"""Deep segmenters (U-Net, SegNet, FCN): tiled inference of a torch model on each block.

The model file is checked when the segmenter is built (on the client, before
any compute); each worker then loads it once and keeps it
(`segpipe.deep.infer.load_runner`). Classes come from the model. A model of
segpipe's own layout (background, interior, boundary) writes two classes,
background and nucleus: the boundary class teaches the network where touching
nuclei part and seeds the instances, but a boundary pixel belongs to its nucleus.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator

from segpipe.errors import InputNotFoundError, ModelFileError, SegmenterError
from segpipe.segmenters.base import Options, Segmenter, SegmentResult
from segpipe.stats import ImageStats

WEIGHTS = Path(__file__).resolve().parents[1] / "deep" / "weights"


class DeepOptions(Options):
    model: str | None = None
    """Model file: a state_dict ``.pt`` (+ sidecar JSON), TorchScript, or a bioimage.io
    package (folder, ``rdf.yaml`` or ``.zip``); default the shipped weights
    ``segpipe/deep/weights/<arch>.pt``."""
    depth: int | None = Field(None, ge=1, le=6)
    """Architecture of a model file without sidecar: number of 2× downsamplings."""
    width: int | None = Field(None, ge=1)
    """Architecture of a model file without sidecar: channels of the first level."""
    in_channels: int | None = Field(None, ge=1)
    """Architecture of a model file without sidecar: input channels."""
    classes: int | None = Field(None, ge=2)
    """Architecture of a model file without sidecar: output classes."""
    ndim: Literal[2, 3] | None = None
    """Architecture of a model file without sidecar: 2 or 3 spatial axes."""
    tile: int | None = Field(None, ge=8)
    """Network tile edge in pixels (default 256 for 2D networks, 64 for 3D)."""
    batch: int = Field(4, ge=1)
    """Tiles per forward call."""
    blend: Literal["crop", "gaussian"] = "crop"
    """Overlapping tiles: keep each pixel from the tile it is most central in, or average
    the tiles' probabilities weighted by a Gaussian."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each worker runs the network; ``auto``: CUDA when the worker has a GPU."""
    min_size: int | None = Field(None, ge=0)
    """Smallest interior seed kept as an instance, in pixels (default: the model's)."""
    diameter: int = Field(32, ge=0)
    """Largest expected object diameter in pixels; the halo covers it, so objects cut by
    a block edge are seen whole by both blocks."""
    sigma: float = 0.0
    """No smoothing: the network and the statistics see the raw image."""

    @field_validator("sigma")
    @classmethod
    def _no_smoothing(cls, v: float) -> float:
        if v != 0:
            raise ValueError(
                "deep segmenters see the raw image (the model was trained on it); sigma must be 0"
            )
        return v


@dataclass(frozen=True)
class DeepResult(SegmentResult):
    """A segment result with how it was computed (recorded as the block's provenance)."""

    device: str = "cpu"
    tiles: int = 1
    batch: int = 1


_ARCH_OPTIONS = ("depth", "width", "in_channels", "classes", "ndim")


class DeepSegmenter(Segmenter):
    """Tiled inference of a torch segmentation network, then instances from its classes.

    Options: ``model`` (the shipped weights), ``tile`` (256; 64 in 3D), ``batch`` (4),
    ``blend`` ("crop"), ``device`` ("auto"), ``min_size`` (the model's), ``diameter``
    (32), and for a model file without sidecar ``depth``, ``width``, ``in_channels``,
    ``classes``, ``ndim``.
    """

    working = (48.0, 64.0)  # class scores of a block, beside the network's tiles

    options_model = DeepOptions
    stitch = "overlap"
    gpu = True
    produces = frozenset({"semantic", "instances"})
    wants_origin: ClassVar[bool] = True  # aligns the network's pooling grid to the image's

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        from segpipe.deep import infer
        from segpipe.deep.nets import NetSpec
        from segpipe.deep.package import is_package

        o = self.opts
        path = Path(o.model).expanduser() if o.model else WEIGHTS / f"{self.name}.pt"
        # Workers resolve relative paths in their own directory: keep it absolute.
        self.path = path.absolute()
        given = {k: getattr(o, k) for k in _ARCH_OPTIONS if getattr(o, k) is not None}
        self.fallback = NetSpec(arch=self.name, **given) if given else None  # type: ignore[arg-type]
        self.package = is_package(self.path)
        if self.package and given:
            raise SegmenterError(
                f"{self.path}: a bioimage.io package describes its network; "
                f"drop {', '.join(sorted(given))}."
            )
        # Load and run the model once here, on the client: a missing, corrupt or
        # mismatched file is named before any block is computed.
        try:
            runner = self._runner("cpu", announce=False)
        except InputNotFoundError as err:
            hint = "" if o.model else f"; the shipped {self.name} weights are missing: give model="
            raise ModelFileError(f"{err}{hint}") from err
        self.meta = runner.meta
        self.margin = runner.margin
        self.min_edge = runner.min_edge
        self.info = getattr(runner, "info", None)
        spec = self.meta.spec
        if self.package:
            return  # any deep segmenter runs a package; its loader ran it once
        if spec.arch != self.name:
            raise SegmenterError(
                f"{self.path}: the model is a {spec.arch}, not a {self.name}; "
                f"use --segmenter {spec.arch}."
            )
        infer.check_model(runner)
        tile = self.tile
        need = 2 * infer.margin(spec) + spec.multiple
        if tile < need:
            raise SegmenterError(
                f"segmenter {self.name!r}: tile {tile} is too small for this model (context "
                f"{infer.margin(spec)} px per side, multiple {spec.multiple}); use tile >= {need}."
            )

    def _runner(self, device: str, *, announce: bool = True) -> Any:
        from segpipe.deep import infer, package

        if self.package:
            return package.load_runner(self.path, device=device)
        return infer.load_runner(
            self.path, device=device, fallback=self.fallback, announce=announce
        )

    @property
    def opts(self) -> DeepOptions:
        assert isinstance(self.options, DeepOptions)
        return self.options

    @property
    def tile(self) -> int:
        """Network tile edge, a multiple of the network's."""
        spec = self.meta.spec
        if self.package and self.info is not None and 0 in self.info.step:
            return self.min_edge  # the package takes one size
        edge = self.opts.tile or (256 if spec.ndim == 2 else 64)
        least = max(self.min_edge, 2 * self.margin + spec.multiple if self.package else 0)
        m = spec.multiple
        return max(m, edge // m * m, -(-least // m) * m)

    @property
    def network_classes(self) -> list[str]:
        """Names of the network's output channels, background first."""
        from segpipe.deep.postprocess import CLASSES

        names = self.meta.card.get("classes")
        n = self.meta.spec.classes
        if isinstance(names, list) and len(names) == n:
            return [str(c) for c in names]
        if n == len(CLASSES):
            return list(CLASSES)
        return ["background", *(f"class{k}" for k in range(1, n))]

    @property
    def merges_boundary(self) -> bool:
        """Whether the network's classes are segpipe's (background, interior, boundary)."""
        from segpipe.deep.postprocess import CLASSES

        return self.network_classes == CLASSES

    @property
    def classes(self) -> list[str]:
        """The output's classes: background and nucleus for segpipe's 3-class layout."""
        from segpipe.deep.postprocess import OUTPUT_CLASSES

        if self.info is not None:
            return list(self.info.classes)
        return list(OUTPUT_CLASSES) if self.merges_boundary else self.network_classes

    @property
    def min_size(self) -> int:
        return self.opts.min_size if self.opts.min_size is not None else self.meta.min_size

    def halo(self, ndim: int) -> tuple[int, ...]:
        spec = self.meta.spec
        if ndim < spec.ndim:
            raise SegmenterError(
                f"{self.path}: a {spec.ndim}D network cannot segment a {ndim}D image."
            )
        h = -(-max(self.margin, self.opts.diameter) // spec.multiple) * spec.multiple
        # A 2D network on a volume runs plane by plane: no context across planes.
        return (0,) * (ndim - spec.ndim) + (h,) * spec.ndim

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        from segpipe.deep.postprocess import percentile_range

        if self.info is not None:
            from segpipe.deep.package import prepare

            return prepare(self.info, stats)
        lo, hi = percentile_range(stats, *self.meta.normalise)
        return {"lo": lo, "hi": hi}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        from segpipe.deep import infer
        from segpipe.deep.postprocess import instances_from_classes, normalise, nuclei

        o = self.opts
        runner = self._runner(o.device)
        if self.info is not None:
            from segpipe.deep import package

            image = package.preprocess(block, self.info, params)
        else:
            image = normalise(block, params["lo"], params["hi"])
        pred = infer.predict(
            image,
            runner,
            tile=self.tile,
            batch=o.batch,
            blend=o.blend,
            origin=params.get("origin"),
        )
        if self.info is not None:
            semantic, instances = package.interpret(
                pred.probabilities, self.info, min_size=self.min_size
            )
            return DeepResult(semantic, instances, pred.device, pred.tiles, pred.batch)
        instances = instances_from_classes(pred.classes, pred.boundary, min_size=self.min_size)
        semantic = nuclei(pred.classes) if self.merges_boundary else pred.classes
        return DeepResult(semantic, instances, pred.device, pred.tiles, pred.batch)

    def identity(self) -> dict[str, Any]:
        """The model file's SHA-256: new weights under the same path are another run."""
        import hashlib

        if self.package:
            from segpipe.deep import package

            return {"model_sha256": package.digest(self.path)}

        digest = hashlib.sha256()
        with self.path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {"model_sha256": digest.hexdigest()}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": str(self.path),
            "spec": self.meta.spec.model_dump(),
        }


class UNet(DeepSegmenter):
    """U-Net (2D or 3D): tiled inference, instances from the interior class."""

    name = "unet"


class SegNet(DeepSegmenter):
    """SegNet (2D): tiled inference, instances from the interior class."""

    name = "segnet"


class FCN(DeepSegmenter):
    """FCN-8s style (2D): tiled inference, instances from the interior class."""

    name = "fcn"

"""The segmenter contract: halo, outputs, global preparation and a pure block function."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from segpipe import kernels
from segpipe.errors import SegmenterError
from segpipe.stats import ImageStats

Stitch = Literal["faces", "overlap"]


@dataclass(frozen=True)
class SegmentResult:
    """What a segmenter returns for one block (shapes equal the block's).

    ``semantic`` holds a class per pixel (0 = background); ``instances`` holds
    block-local object ids (0 = background), any numbering. ``sequential``
    promises that they are exactly 1..max (as connected-component labelling
    gives them), so a block without halo needs no renumbering.
    """

    semantic: NDArray[np.uint8] | None
    instances: NDArray[np.integer] | None
    sequential: bool = field(default=False, kw_only=True)


class Options(BaseModel):
    """Base of every segmenter's options: unknown keys are errors, numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SmoothingOptions(Options):
    sigma: float | list[float] = 2.0
    """Gaussian smoothing before anything else, in pixels (0 = none); one value or one per axis."""

    @field_validator("sigma", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        # one message instead of one per member of the union
        for s in v if isinstance(v, list | tuple) else [v]:
            try:
                finite = math.isfinite(float(s))
            except (TypeError, ValueError):
                continue  # not a number: the type check says so
            if not finite:
                raise ValueError(f"expected a finite sigma >= 0 (0 = no smoothing), got {v!r}")
        return v

    @field_validator("sigma")
    @classmethod
    def _not_negative(cls, v: float | list[float]) -> float | list[float]:
        values = [v] if isinstance(v, int | float) else v
        if not values or any(s < 0 for s in values):
            raise ValueError(
                f"expected sigma >= 0 (0 = no smoothing), one value or one per axis, "
                f"got {v!r} instead"
            )
        return v


def gaussian_radius(
    sigma: float | Sequence[float], ndim: int, truncate: float = 4.0
) -> tuple[int, ...]:
    """Pixels of context a Gaussian of ``sigma`` reads per side (as scipy computes it).

    Raises
    ------
    SegmenterError
        If ``sigma`` has neither one value nor ``ndim``, or its radius is not a finite number.

    Examples
    --------
    >>> gaussian_radius(2.0, 2), gaussian_radius([0, 1.5, 1.5], 3)
    ((8, 8), (0, 6, 6))
    """
    sigmas = [float(sigma)] * ndim if isinstance(sigma, int | float) else [float(s) for s in sigma]
    if len(sigmas) != ndim:
        raise SegmenterError(
            f"Expected sigma as one value or {ndim} values, got {sigma!r} instead."
        )
    radii = [truncate * s + 0.5 if s > 0 else 0.0 for s in sigmas]
    if not all(math.isfinite(r) for r in radii):
        raise SegmenterError(f"Expected a finite sigma, got {sigma!r} instead.")
    return tuple(int(r) for r in radii)


CONTEXT_FLOOR = 32
"""Pixels of filter context per side every image accepts, however small (sigma 7.875)."""


def context_limit(shape: Sequence[int]) -> int:
    """The most context per side a filter may read on an image of ``shape``.

    A filter wider than the image sees only its edge pixels repeated (``mode="nearest"``)
    and costs its kernel width per pixel, with nothing to gain; images smaller than
    `CONTEXT_FLOOR` still take that much, so their usual options work.

    Examples
    --------
    >>> context_limit((600, 800)), context_limit((1, 1))
    (800, 32)
    """
    return max(max(shape, default=1), CONTEXT_FLOOR)


class Segmenter(ABC):
    """One segmentation method, registered by name.

    Subclasses declare ``name``, ``options_model``, what they ``produce`` and
    how their instances are stitched. The pipeline calls, in order:
    ``preprocess`` on every block + ``filter_halo`` (the result is what
    statistics and ``segment`` see), ``prepare(stats)`` once per image, and
    ``segment(block, params)`` on every block + ``halo``.
    """

    name: ClassVar[str]
    options_model: ClassVar[type[Options]]
    produces: ClassVar[frozenset[str]] = frozenset({"semantic", "instances"})
    stitch: ClassVar[Stitch] = "faces"
    gpu: ClassVar[bool] = False
    working: ClassVar[tuple[float, float]] = (16.0, 16.0)
    """Bytes a voxel of block + halo that ``segment`` holds beyond its float32 input, for
    planes and volumes (tracemalloc's peak over one call, rounded up; `working_bytes`)."""

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.options_model(**options)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
                for e in err.errors()
            )
            raise SegmenterError(f"segmenter {self.name!r}: {problems}") from err

    # -- filtering ---------------------------------------------------------
    def sigma(self) -> float | list[float]:
        return getattr(self.options, "sigma", 0.0)

    def filter_halo(self, ndim: int) -> tuple[int, ...]:
        """Context the ``preprocess`` filter needs per side."""
        return gaussian_radius(self.sigma(), ndim)

    def check_image(self, shape: Sequence[int]) -> None:
        """Refuse options that do not fit an image of ``shape`` (its spatial axes).

        The base checks ``sigma``: one value or one per axis, and a Gaussian radius
        within `context_limit`. Segmenters with filters of their own extend it.

        Raises
        ------
        SegmenterError
            Naming the option, what the image allows and what to use instead.
        """
        sigma = self.sigma()
        ndim = len(shape)
        if not isinstance(sigma, int | float) and len(sigma) != ndim:
            raise SegmenterError(
                f"sigma {sigma!r}: expected one value or {ndim}, one per axis of this {ndim}D image"
            )
        sigmas = [float(sigma)] * ndim if isinstance(sigma, int | float) else list(sigma)
        limit = context_limit(shape)
        # compared as floats: a huge sigma's radius overflows an int
        if any(4.0 * s + 0.5 >= limit + 1 for s in sigmas):
            raise SegmenterError(
                f"sigma {sigma!r} makes a Gaussian wider than this image allows ({limit} px "
                f"per side); use sigma <= {limit / 4:g} (0: no smoothing)"
            )

    def has_filter(self) -> bool:
        s = self.sigma()
        return any(v > 0 for v in ([s] if isinstance(s, int | float) else s))

    def preprocess(self, block: NDArray[np.float32]) -> NDArray[np.float32]:
        """Smooth a float32 block exactly as ``skimage.filters.gaussian`` would the whole image
        (``mode="nearest"``, truncate 4; the same bits, from `segpipe.kernels.gaussian`)."""
        if not self.has_filter():
            return block
        return kernels.gaussian(block, self.sigma())

    # -- segmentation ------------------------------------------------------
    def working_bytes(self, ndim: int) -> float:
        """Bytes a voxel of block + halo that ``segment`` holds beyond its float32 input:
        what ``tile: auto`` sizes blocks by (`segpipe.plan.auto_tile`)."""
        return self.working[0] if ndim == 2 else self.working[1]

    @abstractmethod
    def halo(self, ndim: int) -> tuple[int, ...]:
        """Context (pixels per side) ``segment`` needs beyond the block it owns."""

    @property
    def classes(self) -> list[str]:
        """Names of the semantic classes, background first."""
        return ["background", "foreground"]

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        """Turn whole-image statistics into the parameters ``segment`` uses."""
        return {}

    @abstractmethod
    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        """Segment one float32 block (with its halo); a pure function."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.model_dump()}

    def identity(self) -> dict[str, Any]:
        """What decides output pixels beyond the options (e.g. a model file's digest)."""
        return {}

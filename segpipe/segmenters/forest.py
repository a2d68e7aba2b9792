"""``forest``: a random forest trained from scribbles (`segpipe train --arch forest`), applied
block by block.

The model file is read and checked when the segmenter is built (on the client, before
any compute); each worker then loads it once (`segpipe.forest.model.load_cached`, which
also refuses a file replaced since). A block's features are computed with their context,
normalised by the whole image's percentiles, and classified by the compiled traversal;
classes are a pointwise function of exact features, instances connected regions of one
thing class, so tiled runs equal the whole image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.measure import label
from skimage.segmentation import watershed

from segpipe import features
from segpipe.deep.postprocess import normalise, percentile_range
from segpipe.errors import InputNotFoundError, ModelFileError, SegmenterError
from segpipe.forest import model as forest_model
from segpipe.forest.model import ForestModel
from segpipe.forest.predict import predict, predict_things
from segpipe.forest.train import normalised
from segpipe.segmenters.base import Options, Segmenter, SegmentResult
from segpipe.segmenters.tree import halo_for, label_things
from segpipe.stats import ImageStats

__all__ = ["Forest", "ForestOptions", "split_things"]

UNLABELLED = "unlabelled"
"""Name of class 0 in a forest's catalogue: scribbles use 0 for unmarked pixels, so no
pixel is ever classified 0."""


class ForestOptions(Options):
    model: str
    """The forest file (``.npz``) that ``segpipe train --arch forest`` writes."""
    diameter: int = Field(32, ge=0)
    """Largest extent of a thing object past a block's edge, in pixels: objects are exact
    when none reaches further (see `segpipe.segmenters.tree.halo_for`)."""
    split: Literal["components", "watershed"] = "components"
    """Instances: connected regions of one thing class (exact across blocks), or those
    regions split by a watershed on the thing probability (touching nuclei apart; blocks
    then stitched by overlap in the halo, which ``diameter`` must cover)."""
    min_distance: int = Field(5, ge=1)
    """Smallest distance between two seeds (``split: watershed``)."""


class Forest(Segmenter):
    """A random forest over the feature bank: each pixel gets the class the trees vote
    for; instances are connected regions of one thing class.

    Options: ``model`` (required), ``diameter`` (32), ``split`` ("components"),
    ``min_distance`` (5).
    """

    name = "forest"
    options_model = ForestOptions
    wants_core: ClassVar[bool] = True  # components are labelled on the block's core alone

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # Workers resolve relative paths in their own directory: keep it absolute.
        self.path = Path(self.opts.model).expanduser().absolute()
        try:
            model = forest_model.load(self.path)
        except InputNotFoundError as err:
            raise ModelFileError(
                f"{err} Train one with `segpipe train --arch forest --data IMAGES "
                "--annotations SCRIBBLES --out MODEL.npz`."
            ) from err
        self.digest = forest_model.sha256(self.path)
        top = max(c.id for c in model.meta.catalogue)
        names = {c.id: c.name for c in model.meta.catalogue}
        if UNLABELLED in names.values():
            raise ModelFileError(f"{self.path}: a class may not be named {UNLABELLED!r}.")
        self._names = [UNLABELLED] + [names.get(i, f"class{i}") for i in range(1, top + 1)]
        self.thing_classes = [c.name for c in model.meta.catalogue if c.thing]
        self.things = [c.id for c in model.meta.catalogue if c.thing]
        self._radius = max((f.radius() for f in model.bank if not isinstance(f, str)), default=0)
        self._ndim = model.meta.ndim
        self._features = list(model.meta.features)
        if self.opts.split == "watershed":
            # split objects are matched by overlap, not exact connected components
            self.stitch = "overlap"  # type: ignore[misc]

    @property
    def opts(self) -> ForestOptions:
        assert isinstance(self.options, ForestOptions)
        return self.options

    @property
    def model(self) -> ForestModel:
        """The forest, read once per process (and checked against the file's digest)."""
        return forest_model.load_cached(str(self.path), self.digest)

    @property
    def classes(self) -> list[str]:
        return list(self._names)

    def check_image(self, shape: Sequence[int]) -> None:
        super().check_image(shape)
        if len(shape) != self._ndim:
            raise SegmenterError(
                f"{self.path}: the forest was trained on {self._ndim}D images, this one is "
                f"{len(shape)}D"
            )
        for name in self._features:
            if features.is_statistic(name):
                continue
            # a context wider than the image is allowed (the model asks for it; an edge
            # repeated costs only its taps); load() bounds it
            f = features.parse_feature(name)
            if f.kind == "hessian" and f.index > len(shape):
                raise SegmenterError(f"{self.path}: feature {name!r} needs a 3D image")

    def working_bytes(self, ndim: int) -> float:
        """A float32 plane per feature, the trees' votes, and the labels."""
        return 4.0 * len(self._features) + 32.0

    def halo(self, ndim: int) -> tuple[int, ...]:
        return halo_for(self._radius, self.opts.diameter, ndim)

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        meta = self.model.meta
        constants = features.statistics(stats, self.model.statistics)
        params: dict[str, Any] = {"constants": constants}
        if meta.normalise is not None:
            lo, hi = percentile_range(stats, *meta.normalise)
            params.update(lo=lo, hi=hi)
            params["constants"] = normalised(constants, lo, hi)
        return params

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        model = self.model
        data = block if "lo" not in params else normalise(block, params["lo"], params["hi"])
        x = features.compute(data, model.bank, constants=params["constants"])
        if self.opts.split == "components":
            semantic = predict(model, x)
            things = label_things(semantic, self.things, params.get("core"))
            return SegmentResult(semantic, things, sequential=True)
        semantic, share = predict_things(model, x)
        return SegmentResult(semantic, split_things(semantic, share, self.things, self.opts))

    def identity(self) -> dict[str, Any]:
        """The model file's SHA-256: another forest under the same path is another run."""
        return {"model_sha256": self.digest}


def split_things(
    semantic: NDArray[np.uint8],
    share: NDArray[np.float32],
    things: Sequence[int],
    options: ForestOptions,
) -> NDArray[np.int32]:
    """Objects of each thing class: seeds at the peaks of the distance transform of the
    class's regions (at least ``min_distance`` apart), grown over the region by a watershed
    on the thing probability ``share`` (down from its highest); a region without a seed
    stays one object."""
    out = np.zeros(semantic.shape, np.int32)
    top = 0
    for k in things:
        mask = semantic == k
        if not mask.any():
            continue
        regions = label(mask, connectivity=mask.ndim)
        distance = ndi.distance_transform_edt(mask)
        peaks = peak_local_max(
            distance, min_distance=options.min_distance, labels=regions, exclude_border=False
        )
        seeds = np.zeros(semantic.shape, np.int32)
        seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        grown = watershed(-share, seeds, mask=mask)
        unseeded = mask & (grown == 0)
        if unseeded.any():
            rest = label(unseeded, connectivity=mask.ndim)
            grown[unseeded] = rest[unseeded] + len(peaks)
        out[mask] = grown[mask] + top
        top = int(out.max())
    return out

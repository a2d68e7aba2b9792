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
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from segpipe import features
from segpipe.deep.postprocess import normalise, percentile_range
from segpipe.errors import InputNotFoundError, ModelFileError, SegmenterError
from segpipe.forest import model as forest_model
from segpipe.forest.model import ForestModel
from segpipe.forest.predict import predict
from segpipe.forest.train import normalised
from segpipe.segmenters.base import Options, Segmenter, SegmentResult, context_limit
from segpipe.segmenters.tree import halo_for, label_things
from segpipe.stats import ImageStats

__all__ = ["Forest", "ForestOptions"]

UNLABELLED = "unlabelled"
"""Name of class 0 in a forest's catalogue: scribbles use 0 for unmarked pixels, so no
pixel is ever classified 0."""


class ForestOptions(Options):
    model: str
    """The forest file (``.npz``) that ``segpipe train --arch forest`` writes."""
    diameter: int = Field(32, ge=0)
    """Largest extent of a thing object past a block's edge, in pixels: objects are exact
    when none reaches further (see `segpipe.segmenters.tree.halo_for`)."""


class Forest(Segmenter):
    """A random forest over the feature bank: each pixel gets the class the trees vote
    for; instances are connected regions of one thing class.

    Options: ``model`` (required), ``diameter`` (32).
    """

    name = "forest"
    options_model = ForestOptions

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
            f = features.parse_feature(name)
            if f.kind == "hessian" and f.index > len(shape):
                raise SegmenterError(f"{self.path}: feature {name!r} needs a 3D image")
            if f.radius() > context_limit(shape):
                raise SegmenterError(
                    f"{self.path}: feature {name!r} reads {f.radius()} px per side, more "
                    f"than this image allows ({context_limit(shape)})"
                )

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
        semantic = predict(model, x)
        return SegmentResult(semantic, label_things(semantic, self.things), sequential=True)

    def identity(self) -> dict[str, Any]:
        """The model file's SHA-256: another forest under the same path is another run."""
        return {"model_sha256": self.digest}

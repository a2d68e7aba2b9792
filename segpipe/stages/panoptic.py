"""Stage panoptic: the panoptic pyramid above the levels the relabel pass wrote, and its
metadata (divisor and class catalogue in the attributes and NGFF ``properties``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.image import ImagePlan, ProgressFn, noop
from segpipe.io import attrs, omezarr, storage
from segpipe.panoptic import KEY, Catalogue, attrs_value, label_properties
from segpipe.stages.write import Relabelled, build_pyramid, pyramid, relabelled, written_levels

__all__ = ["PanopticResult", "finish_panoptic", "panoptic"]


@dataclass(frozen=True)
class PanopticResult:
    """What `write_panoptic` wrote: the divisor, the catalogue and the level count."""

    divisor: int
    catalogue: Catalogue
    levels: int
    unassigned: int  # thing-class pixels without an instance


def finish_panoptic(
    client: Any,
    plan: ImagePlan,
    divisor: int,
    catalogue: Catalogue,
    unassigned: int,
    progress: ProgressFn | None = None,
    start: int = 1,
) -> PanopticResult:
    """Build levels ``start``.. of ``labels/panoptic`` (those below written) and its
    metadata.

    The divisor and catalogue go to every level's attributes, the label group's
    attributes and its NGFF ``image-label`` properties; the image's ``labels`` list
    is written last, with ``panoptic`` beside the label images `write_levels` made.
    """

    levels_of = pyramid(plan)
    shapes = levels_of.shapes
    build_pyramid(
        client,
        plan,
        [(lambda k: plan.label(KEY, k), np.uint64, True)],
        shapes,
        stage=f"{KEY}-pyramid",
        progress=progress or noop,
        start=start,
    )
    value = attrs_value(divisor, catalogue)
    for k in range(len(shapes)):
        attrs.update(plan.label(KEY, k), {"segpipe": {KEY: value}})
    group_path = storage.join(plan.group, "labels", KEY)
    omezarr.write_label_group_metadata(
        group_path,
        pyramid=levels_of,
        name=KEY,
        properties=label_properties(divisor, catalogue),
        colors=[  # each class's instance-0 value in the class's semantic colour
            {**colour, "label-value": int(colour["label-value"]) * divisor}
            for colour in omezarr.rgba([c.id for c in catalogue.classes])
        ],
        pixel=plan.spec.pixel,
        extra={"segpipe": {KEY: value}},
    )
    labels = storage.join(plan.group, "labels")
    try:
        listed = [str(n) for n in attrs.read(labels).get("ome", {}).get("labels", [])]
    except FileNotFoundError:  # no list yet: this stage writes the first
        listed = []
    names = [n for n in listed if n != KEY] or ["instances", "semantic"]
    omezarr.write_labels_index(labels, [*names, KEY])
    return PanopticResult(divisor, catalogue, len(shapes), unassigned)


def panoptic(
    client: Any,
    plan: ImagePlan,
    count: int,
    catalogue: Catalogue,
    progress: ProgressFn | None = None,
    done: Relabelled | None = None,
) -> PanopticResult:
    """The panoptic stage after the relabel pass: the pyramid above the levels the pass
    wrote, and the metadata. ``done``: the pass's result when it ran in this process
    (default: read back from its markers)."""
    done = done or relabelled(plan, count)
    start = written_levels(plan) + 1
    return finish_panoptic(
        client, plan, done.divisor, catalogue, done.unassigned(), progress, start=start
    )

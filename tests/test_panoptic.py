"""Panoptic labels: the class catalogue, encode/decode, and labels/panoptic written on a cluster."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from segpipe import image as segpipe_image
from segpipe import pipeline, synthetic
from segpipe.errors import ConfigError
from segpipe.io.readers import open_source
from segpipe.panoptic import (
    Catalogue,
    catalogue_for,
    choose_divisor,
    decode,
    default_catalogue,
    encode,
    parse_catalogue,
    read_attrs,
)
from segpipe.segmenters import get_segmenter
from segpipe.segmenters.threshold import MultiOtsu

CLASSES = [
    {"id": 0, "name": "background", "thing": False},
    {"id": 1, "name": "cytoplasm", "thing": False},
    {"id": 2, "name": "nucleus", "thing": True},
]


# -- catalogue -------------------------------------------------------------------------


def test_default_catalogue_background_is_stuff_others_things() -> None:
    cat = catalogue_for(get_segmenter("multiotsu", classes=4))
    assert [c.name for c in cat.classes] == ["background", "class1", "class2", "class3"]
    assert cat.stuff == (0,) and cat.things == (1, 2, 3)
    assert catalogue_for(get_segmenter("otsu")).to_list() == [
        {"id": 0, "name": "background", "thing": False},
        {"id": 1, "name": "foreground", "thing": True},
    ]


def test_a_segmenter_declares_its_own_thing_classes() -> None:
    """How a model's classes plug in: names from ``classes``, things from ``thing_classes``."""

    class Model(MultiOtsu):
        thing_classes = ("nucleus",)

        @property
        def classes(self) -> list[str]:
            return ["background", "membrane", "nucleus"]

    cat = catalogue_for(Model())
    assert cat.things == (2,) and cat.stuff == (0, 1)
    assert cat.name(1) == "membrane"


def test_configured_classes_must_cover_the_segmenter_ids() -> None:
    seg = get_segmenter("multiotsu", classes=3)
    cat = catalogue_for(seg, CLASSES)
    assert cat.things == (2,) and cat.name(1) == "cytoplasm"
    with pytest.raises(ConfigError, match=r"writes class ids 0\.\.2"):
        catalogue_for(seg, CLASSES[:2])
    with pytest.raises(ConfigError, match="ids must be unique"):
        parse_catalogue([*CLASSES, {"id": 2, "name": "other", "thing": True}])
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_catalogue([*CLASSES, {"id": 3, "name": "nucleus", "thing": True}])
    with pytest.raises(ConfigError, match="colour"):
        parse_catalogue([{"id": 0, "name": "bg", "thing": False, "colour": "red"}])
    with pytest.raises(ConfigError, match="id"):
        parse_catalogue([{"id": 300, "name": "bg", "thing": False}])


# -- encode / decode ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_decode_inverts_encode_for_every_pixel(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (7, 33, 41) if seed % 2 else (97, 113)
    cat = parse_catalogue(
        [{"id": c, "name": f"c{c}", "thing": bool(c % 2)} for c in (0, 1, 2, 3, 255)]
    )
    semantic = rng.choice([0, 1, 2, 3, 255], size=shape).astype(np.uint8)
    count = int(rng.integers(1, 10**7))
    instances = rng.integers(0, count + 1, size=shape, dtype=np.uint32)
    divisor = choose_divisor(count)
    panoptic = encode(semantic, instances, divisor=divisor, catalogue=cat)
    assert panoptic.dtype == np.uint64
    sem, inst = decode(panoptic, divisor=divisor)
    thing = np.isin(semantic, [1, 3, 255])
    assert np.array_equal(sem, semantic)
    assert np.array_equal(inst, np.where(thing, instances, 0))
    assert not inst[~thing].any()  # stuff pixels: instance 0
    # the encoding itself, pixel by pixel, as the issue states it
    flat = [
        int(s) * divisor + (int(i) if s % 2 else 0)
        for s, i in zip(semantic.ravel()[:500], instances.ravel()[:500], strict=True)
    ]
    assert panoptic.ravel()[:500].tolist() == flat


def test_divisor_is_a_readable_power_of_ten_above_every_id() -> None:
    assert [choose_divisor(n) for n in (0, 999, 1000, 123456)] == [1000, 1000, 10000, 1000000]
    assert 255 * choose_divisor(2**40) + 2**40 < 2**64


def test_encode_refuses_unknown_classes_and_large_ids() -> None:
    cat = default_catalogue(["background", "cell"])
    with pytest.raises(ConfigError, match=r"classes \[2\]"):
        encode(np.array([0, 2]), np.array([0, 1]), divisor=10, catalogue=cat)
    with pytest.raises(ValueError, match="below the divisor 10"):
        encode(np.array([1, 1]), np.array([3, 10]), divisor=10, catalogue=cat)
    with pytest.raises(ValueError, match="divisor"):
        decode(np.array([1000], np.uint64))


# -- the stage on a cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, client: Any) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("panoptic")
    path = synthetic.write_tiff(tmp / "cells.tif", (600, 520), seed=4)
    seg = get_segmenter("multiotsu", classes=3, sigma=1.0)
    catalogue = catalogue_for(seg, CLASSES)
    plan = segpipe_image.ImagePlan(
        open_source(path), str(tmp / "out.zarr"), (128, 128), seg, catalogue=catalogue
    )
    result = pipeline.run_image(client, plan)
    divisor, _ = read_attrs(plan.label("panoptic"))
    group = zarr.open_group(str(Path(plan.group) / "labels" / "panoptic"), mode="r")
    levels = len(group.attrs["ome"]["multiscales"][0]["datasets"])
    pan = SimpleNamespace(divisor=divisor, levels=levels, unassigned=0)
    measured = SimpleNamespace(segments_path=Path(plan.group) / "tables" / "segments.parquet")
    return {"plan": plan, "result": result, "pan": pan, "measured": measured, "cat": catalogue}


def test_panoptic_array_decodes_to_the_pipeline_labels(written: dict[str, Any]) -> None:
    plan, pan = written["plan"], written["pan"]
    semantic = zarr.open_array(plan.label("semantic"))[:]
    instances = zarr.open_array(plan.label("instances"))[:]
    array = zarr.open_array(plan.label("panoptic"))
    assert array.dtype == np.uint64 and array.shape == semantic.shape
    assert array.chunks == (128, 128)
    assert {1, 2} <= set(np.unique(semantic))  # stuff and thing pixels both present
    sem, inst = decode(array)  # divisor read from the array's attributes
    thing = semantic == 2
    assert np.array_equal(sem, semantic)
    assert np.array_equal(inst, np.where(thing, instances, 0))
    assert not inst[~thing].any()
    # global ids stay unique: every nucleus instance keeps its own panoptic value
    values = array[:]
    assert len(np.unique(values[thing])) == len(np.unique(instances[thing]))
    assert pan.divisor == choose_divisor(written["result"].objects)
    assert pan.unassigned == 0


def test_metadata_records_divisor_and_catalogue(written: dict[str, Any]) -> None:
    plan, pan = written["plan"], written["pan"]
    group = Path(plan.group) / "labels" / "panoptic"
    for k in range(pan.levels):
        attrs = dict(zarr.open_array(str(group / str(k))).attrs)
        assert attrs["segpipe"]["panoptic"] == {"divisor": pan.divisor, "classes": CLASSES}
    ome = dict(zarr.open_group(str(group)).attrs)["ome"]
    assert ome["image-label"]["properties"] == [
        {"label-value": c["id"] * pan.divisor, "class": c["name"], "category": c["id"],
         "thing": c["thing"]}
        for c in CLASSES
    ]  # fmt: skip
    labels = dict(zarr.open_group(str(group.parent)).attrs)["ome"]["labels"]
    assert labels == ["instances", "semantic", "panoptic"]
    divisor, cat = read_attrs(group)
    assert divisor == pan.divisor and isinstance(cat, Catalogue) and cat.to_list() == CLASSES
    level0 = zarr.open_array(str(group / "0"))[:]
    for k in range(1, pan.levels):  # strided like the other labels
        assert np.array_equal(zarr.open_array(str(group / str(k)))[:], level0[:: 2**k, :: 2**k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

        nodes = list(Reader(parse_url(plan.group))())
    assert "panoptic" in {n.zarr.path.rstrip("/").split("/")[-1] for n in nodes[1:]}


def test_segment_areas_equal_panoptic_pixel_counts(written: dict[str, Any]) -> None:
    plan, pan = written["plan"], written["pan"]
    table = pq.read_table(written["measured"].segments_path).to_pydict()
    values, counts = np.unique(zarr.open_array(plan.label("panoptic"))[:], return_counts=True)
    assert table["id"] == values.tolist()
    assert table["area"] == counts.tolist()
    assert table["category"] == (values // pan.divisor).tolist()
    assert table["instance"] == (values % pan.divisor).tolist()
    names = {c["id"]: c["name"] for c in CLASSES}
    assert table["category_name"] == [names[c] for c in table["category"]]
    assert table["is_thing"] == [c == 2 for c in table["category"]]
    # one segment per stuff class, with instance 0
    assert [i for c, i in zip(table["category"], table["instance"], strict=True) if c < 2] == [
        0,
        0,
    ]

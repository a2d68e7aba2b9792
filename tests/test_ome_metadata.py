"""OME metadata end to end, on files written by tifffile, zarr and ome-zarr-py (not by
segpipe), checked with ome-zarr-models: physical pixel sizes (OME-XML, ImageJ and
TIFF resolution tags, NGFF scales, or the settings) on every output level and in the
objects table; NGFF 0.4 / Zarr v2 inputs and their levels; label metadata; the
store's root listing its images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

from segpipe import synthetic
from segpipe.io.readers import open_source
from tests.helpers import ngff_valid

LABELS = ("semantic", "instances", "panoptic")


def _cells(shape: tuple[int, ...] = (1100, 1000)) -> np.ndarray:
    return synthetic.render(tuple(slice(0, n) for n in shape), seed=5)[0]


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _scales(group: zarr.Group) -> tuple[list[list[float]], list[str | None]]:
    ms = group.attrs["ome"]["multiscales"][0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    return scales, [a.get("unit") for a in ms["axes"]]


def test_an_ome_tiff_pixel_size_reaches_every_level_and_the_tables(run_cli, tmp_path) -> None:
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(
        path, _cells(), ome=True, tile=(256, 256), metadata={"axes": "YX", "PhysicalSizeX": 0.325,
        "PhysicalSizeY": 0.325, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    )  # fmt: skip
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(path), "-o", str(out), "--tile", "256")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out / "cells"), mode="r")
    for node in [group, *(group[f"labels/{name}"] for name in LABELS)]:
        scales, units = _scales(node)
        assert len(scales) >= 3
        for k, scale in enumerate(scales):
            assert scale == pytest.approx([0.325 * 2**k] * 2), (node.path, k)
        assert units == ["micrometer", "micrometer"]
    Image.from_zarr(group)  # the format's own validator
    for name in LABELS:
        ImageLabel.from_zarr(group[f"labels/{name}"])
    table = pq.read_table(out / "cells" / "tables" / "objects.parquet")
    objects = _columns(table)
    assert len(objects["area"]) > 10
    assert np.allclose(objects["area_physical"], objects["area"] * 0.325**2)
    for k in range(2):
        assert np.allclose(objects[f"centroid_physical-{k}"], objects[f"centroid-{k}"] * 0.325)
    for k in range(4):
        assert np.allclose(objects[f"bbox_physical-{k}"], objects[f"bbox-{k}"] * 0.325)
    assert b'"unit": "micrometer"' in table.schema.metadata[b"segpipe"]


def test_a_given_pixel_size_overrides_and_none_is_stated_as_pixels(run_cli, tmp_path) -> None:
    plain = synthetic.write_tiff(tmp_path / "in" / "plain.tif", (300, 260), seed=2)
    out = tmp_path / "out.zarr"
    unsized = run_cli("-i", str(plain), "-o", str(out), "--tile", "128")
    assert unsized.exit_code == 0
    assert f"{plain}: no pixel size stated; scales and tables are in pixels" in " ".join(
        unsized.output.split()
    )
    scales, units = _scales(zarr.open_group(str(out / "plain"), mode="r"))
    assert scales[0] == [1.0, 1.0] and units == [None, None]  # no unit: not invented
    columns = pq.read_schema(out / "plain" / "tables" / "objects.parquet").names
    assert not [c for c in columns if "physical" in c]

    given = tmp_path / "given.zarr"
    result = run_cli("-i", str(plain), "-o", str(given), "--tile", "128", "--pixel-size", "0.5")
    assert result.exit_code == 0, result.output
    scales, units = _scales(zarr.open_group(str(given / "plain"), mode="r"))
    assert scales[:2] == [[0.5, 0.5], [1.0, 1.0]] and units == ["micrometer"] * 2
    assert "no pixel size stated" not in result.output
    bad = run_cli("-i", str(plain), "-o", str(tmp_path / "bad.zarr"), "--pixel-size", "1,2,3")
    assert bad.exit_code != 0
    assert "pixel_size [1.0, 2.0, 3.0] needs one positive size, or one per axis (2)" in " ".join(
        bad.output.split()
    )


def test_an_imagej_volume_keeps_its_z_spacing(run_cli, tmp_path) -> None:
    path = tmp_path / "stack.tif"
    volume = _cells((6, 300, 280))
    tifffile.imwrite(
        path, volume, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
        metadata={"spacing": 2.0, "unit": "micron", "axes": "ZYX"},
    )  # fmt: skip
    assert open_source(str(path)).pixel.sizes == (2.0, 0.5, 0.5)  # type: ignore[union-attr]
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(path), "-o", str(out), "--tile", "6,128,128")
    assert result.exit_code == 0, result.output
    scales, units = _scales(zarr.open_group(str(out / "stack"), mode="r"))
    assert scales[0] == pytest.approx([2.0, 0.5, 0.5]) and units == ["micrometer"] * 3
    objects = _columns(pq.read_table(out / "stack" / "tables" / "objects.parquet"))
    assert np.allclose(objects["area_physical"], objects["area"] * 2.0 * 0.5 * 0.5)


def test_an_ngff_input_scale_is_kept(run_cli, tmp_path) -> None:
    source = tmp_path / "in.zarr"
    root = zarr.open_group(str(source), mode="w")
    root.create_array("0", data=_cells((300, 260)), chunks=(128, 128))
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "y", "type": "space", "unit": "nanometer"},
                    {"name": "x", "type": "space", "unit": "nanometer"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [80, 60]},
                            {"type": "translation", "translation": [1000.0, -40.0]},
                        ],
                    }
                ],
            }
        ],
    }
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(source), "-o", str(out), "--tile", "128")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out / "in"), mode="r")
    scales, units = _scales(group)
    assert scales[:2] == [[80.0, 60.0], [160.0, 120.0]] and units == ["nanometer", "nanometer"]
    for level in group.attrs["ome"]["multiscales"][0]["datasets"]:
        assert level["coordinateTransformations"][1] == {
            "type": "translation",
            "translation": [1000.0, -40.0],
        }
    Image.from_zarr(group)
    objects = _columns(pq.read_table(out / "in" / "tables" / "objects.parquet"))
    assert np.allclose(objects["centroid_physical-0"], objects["centroid-0"] * 80 + 1000)
    assert np.allclose(objects["centroid_physical-1"], objects["centroid-1"] * 60 - 40)


@pytest.mark.parametrize(
    "unit, resolution, expected",
    [("CENTIMETER", 10000.0, 1.0), ("INCH", 25400.0 / 0.25, 0.25), ("NONE", 5.0, None)],
)
def test_tiff_resolution_tags(tmp_path: Path, unit: str, resolution: float, expected) -> None:
    path = tmp_path / "r.tif"
    tifffile.imwrite(
        path, np.zeros((32, 32), np.uint16), resolution=(resolution, resolution),
        resolutionunit=unit,
    )  # fmt: skip
    pixel = open_source(str(path)).pixel
    if expected is None:
        assert pixel is None
    else:
        assert pixel is not None and pixel.unit == "micrometer"
        assert pixel.sizes == pytest.approx((expected, expected))


def test_label_metadata_names_its_source_colours_and_properties(run_cli, tmp_path) -> None:
    """``source``, colours as the preview draws them, each instance's class and area
    (as in objects.parquet), the downsampling; ome-zarr-models validates each."""
    from segpipe.preview import colours

    path = synthetic.write_tiff(tmp_path / "img.tif", (300, 260), seed=3)
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(path), "-o", str(out), "--tile", "128").exit_code == 0
    group = zarr.open_group(str(out / "img"), mode="r")
    assert group.attrs["ome"]["multiscales"][0]["type"] == "nearest"
    for name in LABELS:
        node = group[f"labels/{name}"]
        ImageLabel.from_zarr(node)
        label = node.attrs["ome"]["image-label"]
        assert label["source"] == {"image": "../../"}
        assert node.attrs["ome"]["multiscales"][0]["type"] == "nearest"
    semantic = group["labels/semantic"].attrs["ome"]["image-label"]
    assert [c["label-value"] for c in semantic["colors"]] == [0, 1]
    assert semantic["colors"][0]["rgba"][3] == 0  # background: transparent
    assert semantic["colors"][1]["rgba"] == [*colours(np.array([1]))[0].tolist(), 255]
    instances = group["labels/instances"].attrs["ome"]["image-label"]
    objects = _columns(pq.read_table(out / "img" / "tables" / "objects.parquet"))
    assert [p["label-value"] for p in instances["properties"]] == objects["label"].tolist()
    assert [p["area"] for p in instances["properties"]] == objects["area"].tolist()
    assert {p["class"] for p in instances["properties"]} == {"foreground"}
    drawn = colours(objects["label"])
    assert [c["rgba"][:3] for c in instances["colors"]] == drawn.tolist()
    panoptic = group["labels/panoptic"].attrs["ome"]["image-label"]
    divisor = group["labels/panoptic"].attrs["segpipe"]["panoptic"]["divisor"]
    assert [c["label-value"] for c in panoptic["colors"]] == [0, divisor]
    assert panoptic["colors"][1]["rgba"] == semantic["colors"][1]["rgba"]
    ngff_valid(out / "img", "image")  # NGFF's own JSON schemas, strict
    for name in LABELS:
        ngff_valid(out / "img" / "labels" / name, "label")


def test_past_the_limit_label_values_are_described_in_the_table(
    run_cli, tmp_path, monkeypatch
) -> None:
    from segpipe.io import omezarr

    monkeypatch.setattr(omezarr, "LABEL_VALUES", 3)
    path = synthetic.write_tiff(tmp_path / "img.tif", (300, 260), seed=3)
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(path), "-o", str(out), "--tile", "128").exit_code == 0
    node = zarr.open_group(str(out / "img" / "labels" / "instances"), mode="r")
    assert "properties" not in node.attrs["ome"]["image-label"]
    assert node.attrs["segpipe"]["label-values"] == "more than 3: see tables/objects.parquet"
    ImageLabel.from_zarr(node)
    ngff_valid(out / "img" / "labels" / "instances", "label")


def test_the_store_root_lists_its_images_for_ome_zarr_tools(run_cli, tmp_path) -> None:
    from ome_zarr_models.v05.bioformats2raw import BioFormats2Raw

    folder = tmp_path / "plate"
    for i in range(3):
        synthetic.write_tiff(folder / f"field-{i}.tif", (96, 96), seed=i)
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(folder), "-o", str(out)).exit_code == 0
    root = zarr.open_group(str(out), mode="r")
    assert BioFormats2Raw.from_zarr(root).attributes.ome.bioformats2raw_layout == 3
    series = root["OME"].attrs["ome"]["series"]
    assert series == ["field-0", "field-1", "field-2"]
    ngff_valid(out, "bf2raw")
    for name in series:  # each listed path is an image
        Image.from_zarr(root[name])
        ngff_valid(out / name, "image")
    (folder / "field-1.tif").unlink()  # then pruned: no longer listed
    assert run_cli("-i", str(folder), "-o", str(out), "--resume", "--prune").exit_code == 0
    listed = zarr.open_group(str(out / "OME"), mode="r").attrs["ome"]["series"]
    assert listed == ["field-0", "field-2"]


def test_an_input_named_like_the_collection_group_is_refused(run_cli, tmp_path) -> None:
    path = synthetic.write_tiff(tmp_path / "OME.tif", (64, 64), seed=1)
    result = run_cli("-i", str(path), "-o", str(tmp_path / "out.zarr"))
    assert result.exit_code == 1
    assert "output name 'OME' is the group listing the store's images" in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize("level", [0, 1])
def test_an_ngff_0_4_zarr_v2_image_at_a_chosen_level(run_cli, tmp_path, level: int) -> None:
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image
    from skimage import filters, measure

    from tests.helpers import same_up_to_renumbering

    source = tmp_path / "in.zarr"
    group = zarr.open_group(str(source), mode="w", zarr_format=2)
    write_image(
        _cells((600, 520)), group, scale_factors=[2], fmt=FormatV04(), axes="yx",
        scale={"y": 0.5, "x": 0.5}, axes_units={"y": "micrometer", "x": "micrometer"},
    )  # fmt: skip
    assert (source / ".zattrs").exists() and not (source / "zarr.json").exists()
    out = tmp_path / "out.zarr"
    args = ["-i", str(source), "-o", str(out), "--tile", "128", "--level", str(level)]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    dataset = zarr.open_group(str(source), mode="r").attrs["multiscales"][0]["datasets"][level]
    pixels = zarr.open_array(str(source / dataset["path"]), mode="r")[:]
    labels = zarr.open_array(str(out / "in" / "labels" / "instances" / "0"), mode="r")[:]
    assert labels.shape == pixels.shape
    smooth = filters.gaussian(pixels.astype("float32"), sigma=2, preserve_range=True)
    reference = measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)
    assert same_up_to_renumbering(labels, reference)
    scales, units = _scales(zarr.open_group(str(out / "in"), mode="r"))
    written = next(t for t in dataset["coordinateTransformations"] if t["type"] == "scale")
    assert scales[0] == written["scale"] and units == ["micrometer"] * 2
    too_far = run_cli("-i", str(source), "-o", str(tmp_path / "x.zarr"), "--level", "2")
    assert too_far.exit_code != 0
    assert "level 2 asked; the image has 2 (0-1)" in " ".join(too_far.output.split())


def test_a_pyramidal_ome_tiff_at_a_chosen_level(run_cli, tmp_path) -> None:
    from skimage import filters, measure

    from tests.helpers import same_up_to_renumbering

    path = tmp_path / "slide.ome.tif"
    full = _cells((800, 720))
    with tifffile.TiffWriter(path) as tif:  # level 0 and two sub-resolutions (SubIFDs)
        options = {"tile": (128, 128), "compression": "zlib"}
        tif.write(
            full, subifds=2, metadata={"axes": "YX", "PhysicalSizeX": 0.25,
            "PhysicalSizeY": 0.25}, **options,
        )  # fmt: skip
        for k in (1, 2):
            tif.write(full[:: 2**k, :: 2**k], subfiletype=1, **options)
    assert len(tifffile.TiffFile(path).series[0].levels) == 3
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(path), "-o", str(out), "--tile", "128", "--level", "1")
    assert result.exit_code == 0, result.output
    pixels = tifffile.imread(path, level=1)
    labels = zarr.open_array(str(out / "slide" / "labels" / "instances" / "0"), mode="r")[:]
    smooth = filters.gaussian(pixels.astype("float32"), sigma=2, preserve_range=True)
    reference = measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)
    assert labels.shape == pixels.shape == (400, 360)
    assert same_up_to_renumbering(labels, reference)
    scales, units = _scales(zarr.open_group(str(out / "slide"), mode="r"))
    assert scales[0] == pytest.approx([0.5, 0.5]) and units == ["micrometer"] * 2
    too_far = run_cli("-i", str(path), "-o", str(tmp_path / "x.zarr"), "--level", "3")
    assert "level 3 asked; the image has 3 (0-2)" in " ".join(too_far.output.split())


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "µm"}, ((0.3, 0.0002), "micrometer")),
        ({"PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm"}, ((0.3, 0.2), "nanometer")),
        ({"PhysicalSizeXUnit": "furlong"}, None),  # a unit that is not known: no size
    ],
)
def test_ome_xml_units_per_axis(tmp_path: Path, meta: dict, expected) -> None:
    path = tmp_path / "u.ome.tif"
    tifffile.imwrite(
        path, np.zeros((32, 32), np.uint16), ome=True,
        metadata={"axes": "YX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, **meta},
    )  # fmt: skip
    pixel = open_source(str(path)).pixel
    if expected is None:
        assert pixel is None
    else:
        assert pixel is not None and pixel.unit == expected[1]
        assert pixel.sizes == pytest.approx(expected[0])

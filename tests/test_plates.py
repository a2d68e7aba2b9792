"""NGFF high-content screening plates, written by ome-zarr-py (not by segpipe): a plate
is a collection whose every field is segmented, and the output is a plate with the same
rows, columns, wells and fields, each field's labels under its image group; checked
with ome-zarr-models and against whole-image scikit-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from skimage import filters, measure

from segpipe import synthetic
from tests.helpers import ngff_valid, same_up_to_renumbering

WELLS = ["A/1", "B/3"]
FIELDS = ["0", "1"]


def _field(seed: int) -> np.ndarray:
    return synthetic.render((slice(0, 300), slice(0, 260)), seed=seed)[0]


def _write_plate(path: Path, version: str) -> dict[str, np.ndarray]:
    """A plate of 2 wells × 2 fields in NGFF ``version``; the pixels of each field."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    write_plate_metadata(root, ["A", "B"], ["1", "2", "3"], WELLS, fmt=fmt, name="screen 7")
    pixels = {}
    for w, well in enumerate(WELLS):
        group = root.require_group(well)
        write_well_metadata(group, [{"path": f} for f in FIELDS], fmt=fmt)
        for f in FIELDS:
            data = _field(seed=10 * w + int(f))
            write_image(data, group.require_group(f), scale_factors=[], fmt=fmt, axes="yx")
            pixels[f"{well}/{f}"] = data
    return pixels


def _reference(pixels: np.ndarray) -> np.ndarray:
    smooth = filters.gaussian(pixels.astype("float32"), sigma=2, preserve_range=True)
    return measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_a_plate_in_gives_a_plate_out_with_labels_in_every_field(
    run_cli, tmp_path, version: str
) -> None:
    source = tmp_path / "plate.zarr"
    pixels = _write_plate(source, version)
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(source), "-o", str(out), "--tile", "128")
    assert result.exit_code == 0, result.output

    root = zarr.open_group(str(out), mode="r")
    plate = HCS.from_zarr(root).ome_attributes.plate  # the format's own validator
    assert [r.name for r in plate.rows] == ["A", "B"]
    assert [c.name for c in plate.columns] == ["1", "2", "3"]
    assert [(w.path, w.rowIndex, w.columnIndex) for w in plate.wells] == [
        ("A/1", 0, 0),
        ("B/3", 1, 2),
    ]
    assert plate.name == "screen 7" and plate.field_count == 2
    ngff_valid(out, "plate")  # NGFF's own JSON schemas, strict
    for well in WELLS:
        listed = root[well].attrs["ome"]["well"]["images"]
        assert [i["path"] for i in listed] == FIELDS
        ngff_valid(out / well, "well")
        for f in FIELDS:
            group = root[f"{well}/{f}"]
            Image.from_zarr(group)
            ngff_valid(out / well / f, "image")
            for name in ("instances", "semantic", "panoptic"):
                ImageLabel.from_zarr(group[f"labels/{name}"])
                ngff_valid(out / well / f / "labels" / name, "label")
            labels = group["labels/instances/0"][:]
            assert same_up_to_renumbering(labels, _reference(pixels[f"{well}/{f}"]))
            assert group["labels/instances"].attrs["ome"]["image-label"]["source"] == {
                "image": "../../"
            }
            assert (out / well / f / "previews" / f"{well.replace('/', '_')}_{f}.png").is_file()

    again = run_cli("-i", str(source), "-o", str(out), "--tile", "128", "--resume")
    assert again.exit_code == 0, again.output
    assert again.output.count("unchanged") >= 4 or "4 unchanged" in again.output, again.output


def test_one_field_of_a_plate_keeps_its_place(run_cli, tmp_path) -> None:
    source = tmp_path / "plate.zarr"
    pixels = _write_plate(source, "0.5")
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(source / "B/3/1"), "-o", str(out), "--tile", "128")
    assert result.exit_code == 0, result.output
    plate = HCS.from_zarr(zarr.open_group(str(out), mode="r")).ome_attributes.plate
    assert [w.path for w in plate.wells] == ["B/3"]
    labels = zarr.open_array(str(out / "B/3/1/labels/instances/0"), mode="r")[:]
    assert same_up_to_renumbering(labels, _reference(pixels["B/3/1"]))


def test_overwrite_removes_the_plate_segpipe_wrote_and_nothing_else(run_cli, tmp_path) -> None:
    source = tmp_path / "plate.zarr"
    _write_plate(source, "0.5")
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(source), "-o", str(out), "--tile", "128").exit_code == 0
    (out / "notes.txt").write_text("mine")
    plain = synthetic.write_tiff(tmp_path / "in" / "plain.tif", (200, 180), seed=3)
    result = run_cli("-i", str(plain), "-o", str(out), "--tile", "128", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "A").exists() and not (out / "B").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "plain").is_dir()


def test_two_plates_into_one_output_is_one_line(run_cli, tmp_path) -> None:
    for name in ("p1.zarr", "p2.zarr"):
        _write_plate(tmp_path / "in" / name, "0.5")
    result = run_cli("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out.zarr"))
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "'A/1/0' is also that of" in message
    assert "segment each plate into its own output" in message


def test_a_well_the_plate_lists_but_lacks_is_named(run_cli, tmp_path) -> None:
    import shutil

    source = tmp_path / "plate.zarr"
    _write_plate(source, "0.5")
    shutil.rmtree(source / "B" / "3")
    result = run_cli("-i", str(source), "-o", str(tmp_path / "out.zarr"))
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert f"{source / 'B' / '3'}: well listed by plate {source} is not there" in message

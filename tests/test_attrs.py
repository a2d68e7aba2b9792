"""The store's metadata written as zarr.json files equals what zarr and ome-zarr write."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import zarr

from segpipe.blocks import Pyramid
from segpipe.io import attrs, omezarr
from segpipe.io.physical import PixelSize

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata


def _meta(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())


def _without_type(meta: dict) -> dict:
    """``meta`` less the multiscales ``type``, an NGFF field ome-zarr-py's writer leaves
    out (it keeps ``metadata``)."""
    for ms in meta["attributes"]["ome"]["multiscales"]:
        assert ms.pop("type") == "nearest"
    return meta


@pytest.mark.parametrize("stated", [False, True])
def test_image_and_label_metadata_equal_ome_zarr_writers(tmp_path: Path, stated: bool) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    props = [{"label-value": 0, "class": "background"}, {"label-value": 1, "class": "cell"}]
    for ndim in (2, 3):
        pixel = PixelSize((2.0, 0.5, 0.25)[-ndim:], "micrometer", "settings") if stated else None
        three = Pyramid.build((10, 1024, 1024)[-ndim:], (10, 256, 256)[-ndim:])
        two = Pyramid.build((10, 512, 512)[-ndim:], (10, 256, 256)[-ndim:])
        assert (len(three), len(two)) == (3, 2)
        omezarr.write_image_metadata(ours / f"img{ndim}", pyramid=three, name="a", pixel=pixel)
        group = zarr.open_group(str(theirs / f"img{ndim}"), mode="a", zarr_format=3)
        datasets = omezarr._datasets(three, pixel)
        write_multiscales_metadata(
            group,
            datasets,
            fmt=FormatV05(),
            axes=omezarr._axes(ndim, pixel),
            name="a",
            **attrs.DOWNSAMPLING,
        )
        assert _without_type(_meta(ours / f"img{ndim}")) == _meta(theirs / f"img{ndim}")

        label = f"labels{ndim}/semantic"
        omezarr.write_label_group_metadata(
            ours / label, pyramid=two, name="semantic", properties=props, pixel=pixel
        )
        group = zarr.open_group(str(theirs / label), mode="a", zarr_format=3)
        write_multiscales_metadata(
            group,
            omezarr._datasets(two, pixel),
            fmt=FormatV05(),
            axes=omezarr._axes(ndim, pixel),
            name="semantic",
            **attrs.DOWNSAMPLING,
        )
        parent = zarr.open_group(str(theirs / f"labels{ndim}"), mode="a", zarr_format=3)
        write_label_metadata(
            parent, "semantic", properties=props, fmt=FormatV05(), source={"image": "../../"}
        )
        assert _without_type(_meta(ours / label)) == _meta(theirs / label)


def test_update_keeps_other_attributes_and_zarr_reads_them(tmp_path: Path) -> None:
    array = zarr.create_array(str(tmp_path / "a"), shape=(4, 4), dtype="uint8")
    array.attrs["kept"] = 1
    attrs.update(tmp_path / "a", {"segpipe": {"x": [1, 2]}})
    reopened = zarr.open_array(str(tmp_path / "a"), mode="r")
    assert reopened.attrs.asdict() == {"kept": 1, "segpipe": {"x": [1, 2]}}
    assert reopened.shape == (4, 4)
    attrs.update(tmp_path / "g", {"a": True})  # no node yet: a group
    assert zarr.open_group(str(tmp_path / "g"), mode="r").attrs["a"] is True
    assert attrs.read(tmp_path / "g") == {"a": True}


def test_an_update_that_changes_nothing_writes_nothing(tmp_path: Path) -> None:
    """Setting attributes to what they are leaves the file alone (the same inode: no
    new file, no rename); a missing node is still created by an empty update, and an
    array created with attributes reads them back through zarr."""
    attrs.update(tmp_path / "g", {"a": {"b": [1, 2]}, "c": 1})
    before = (tmp_path / "g" / "zarr.json").stat()
    attrs.update(tmp_path / "g", {"a": {"b": [1, 2]}})
    after = (tmp_path / "g" / "zarr.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    attrs.update(tmp_path / "g", {"c": 2})
    assert (tmp_path / "g" / "zarr.json").stat().st_ino != before.st_ino
    assert attrs.read(tmp_path / "g") == {"a": {"b": [1, 2]}, "c": 2}
    attrs.update(tmp_path / "empty", {})
    assert zarr.open_group(str(tmp_path / "empty"), mode="r").attrs.asdict() == {}
    omezarr.create_array(
        tmp_path / "arr", shape=(4, 4), chunks=(4, 4), dtype="uint8", attributes={"k": [1]}
    )
    assert zarr.open_array(str(tmp_path / "arr"), mode="r").attrs.asdict() == {"k": [1]}


def test_zarr_v2_nodes_go_through_zarr(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "v2"), mode="w", zarr_format=2)
    attrs.update(tmp_path / "v2", {"b": 2})
    assert not (tmp_path / "v2" / "zarr.json").exists()
    assert zarr.open_group(str(tmp_path / "v2"), mode="r").attrs["b"] == 2
    assert attrs.read(tmp_path / "v2") == {"b": 2}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_change_sees_the_current_attributes_and_keeps_the_others(
    tmp_path: Path, zarr_format: int
) -> None:
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=zarr_format)
    group.attrs.update({"n": 1, "kept": "yes"})
    for _ in range(2):
        attrs.change(tmp_path / "g", lambda current: {"n": current["n"] + 1})
    reopened = zarr.open_group(str(tmp_path / "g"), mode="r")
    assert reopened.attrs.asdict() == {"n": 3, "kept": "yes"}


def test_arrays_are_created_and_read_as_zarr_creates_and_reads_them(tmp_path: Path) -> None:
    from segpipe.io import chunks

    for dtype in ("uint8", "uint16", "uint32", "uint64", "float32", "int16"):
        for labels, compress in ((False, True), (True, True), (False, False)):
            ours, theirs = tmp_path / "ours", tmp_path / "theirs"
            omezarr.create_array(
                ours,
                shape=(100, 70),
                chunks=(64, 64),
                dtype=dtype,
                labels=labels,
                compress=compress,
            )
            codec = None if not compress else omezarr.LABEL_CODEC if labels else omezarr.IMAGE_CODEC
            zarr.create_array(
                store=str(theirs),
                shape=(100, 70),
                chunks=(64, 64),
                dtype=dtype,
                compressors=codec,
                fill_value=0,
                zarr_format=3,
                dimension_names=["y", "x"],
                overwrite=True,
            )
            assert _meta(ours) == _meta(theirs), (dtype, labels, compress)
            opened = zarr.open_array(str(ours), mode="r")
            assert chunks.layout_of(ours, _meta(ours)) == chunks.layout(opened)
    sharded = zarr.create_array(
        store=str(tmp_path / "sharded"),
        shape=(64, 64),
        chunks=(16, 16),
        shards=(32, 32),
        dtype="uint16",
    )
    assert chunks.layout_of(tmp_path / "sharded", _meta(tmp_path / "sharded")) is None
    assert chunks.layout(sharded) is None

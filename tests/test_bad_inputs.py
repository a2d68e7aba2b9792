"""The bad-input catalogue through `segpipe run`, under `--on-error fail` and `skip`.

Each bad file must be named with its problem, the exit code must say the run
was not clean, nothing of a bad image may look complete, and under `skip`
every good image is still segmented.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from segpipe import synthetic

GOOD = ["good", "one-pixel", "constant", "big-endian", "other-shape", "zellkern-ä-核"]


def _patch_dims(path: Path, value: int) -> None:
    """Make a TIFF's ImageWidth/ImageLength/RowsPerStrip claim ``value`` pixels."""
    with tifffile.TiffFile(path) as tif:
        offsets = {t.code: t.valueoffset for t in tif.pages[0].tags.values()}
    with open(path, "r+b") as fh:
        for code in (256, 257, 278):
            fh.seek(offsets[code])
            fh.write(struct.pack("<I", value))


def _is_complete(group: Path) -> bool:
    if not (group / "zarr.json").exists():
        return False
    return bool(
        zarr.open_group(str(group), mode="r").attrs.asdict().get("segpipe", {}).get("complete")
    )


@pytest.fixture
def catalogue(tmp_path: Path) -> dict[str, Path]:
    """A collection holding good images and one of each kind of bad input."""
    d = tmp_path / "in"
    d.mkdir()
    image, _ = synthetic.render((slice(0, 300), slice(0, 280)), seed=3)
    files: dict[str, Path] = {}

    def tif(name: str, data: np.ndarray, **kw: object) -> None:
        files[name] = d / f"{name}.tif"
        tifffile.imwrite(files[name], data, **kw)

    tif("good", image, tile=(64, 64), compression="zlib")
    tif("one-pixel", np.array([[500]], np.uint16))
    tif("constant", np.full((90, 70), 7, np.uint16))
    tif("big-endian", image, byteorder=">")
    tif("other-shape", synthetic.render((slice(0, 128), slice(0, 333)), seed=4)[0])
    tif("zellkern-ä-核", image)
    # bad ones
    files["empty"] = d / "empty.tif"
    files["empty"].write_bytes(b"")
    tif("truncated", image, tile=(64, 64), compression="zlib")
    raw = files["truncated"].read_bytes()
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["corrupt"] = d / "corrupt.png"
    Image.fromarray((image // 256).astype(np.uint8)).save(files["corrupt"])
    raw = bytearray(files["corrupt"].read_bytes())
    raw[60:200] = b"\x00" * 140
    files["corrupt"].write_bytes(bytes(raw))
    tif("bomb", np.zeros((64, 64), np.uint8), compression="zlib")
    _patch_dims(files["bomb"], 10**6)
    files["zero-axis"] = d / "zero-axis.zarr"
    zarr.create_array(str(files["zero-axis"]), shape=(0, 64), chunks=(8, 8), dtype="uint16")
    tif("complex", np.ones((32, 32), np.complex64))
    tif("bool", np.ones((32, 32), bool))
    tif("rgb", np.zeros((40, 40, 3), np.uint8), photometric="rgb")
    nan = image.astype(np.float32)
    nan[150, 20] = np.nan
    tif("nan", nan)
    return files


STATIC_BAD = {  # found when the inputs are checked, before any compute
    "empty": "empty",
    "truncated": "truncated",
    "corrupt": "corrupt.png",
    "bomb": "decompression bomb",
    "zero-axis": "zero-length",
    "complex": "dtype",
    "bool": "dtype",
    "rgb": "channels",
}


def _text(result) -> str:  # type: ignore[no-untyped-def]
    return " ".join(result.output.split())


def test_fail_checks_every_input_and_computes_nothing(run_cli, catalogue, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    result = run_cli("--input", str(catalogue["good"].parent), "--output", str(out))
    assert result.exit_code == 1
    text = _text(result)
    for name, problem in STATIC_BAD.items():
        assert catalogue[name].name in text, name
        assert problem in text, (name, problem)
    assert f"{len(STATIC_BAD)} of {len(catalogue)} inputs are bad" in text
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("_"))


def test_skip_does_the_good_ones_and_reports_the_bad(run_cli, catalogue, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    result = run_cli(
        "--input",
        str(catalogue["good"].parent),
        "--output",
        str(out),
        "--on-error",
        "skip",
        "--tile",
        "64",
    )
    assert result.exit_code == 3, result.output
    text = _text(result)
    for name in [*STATIC_BAD, "nan"]:
        assert catalogue[name].name in text, name
    assert "NaN" in text
    for name in GOOD:
        assert _is_complete(out / name), name
    for name in [*STATIC_BAD, "nan"]:
        assert not _is_complete(out / name), name
    # a bad image found mid-run says why, and is not complete
    nan_attrs = zarr.open_group(str(out / "nan"), mode="r").attrs["segpipe"]
    assert "NaN" in nan_attrs["error"] and nan_attrs["complete"] is False
    # big-endian input gives exactly the little-endian result
    little = zarr.open_array(str(out / "good/labels/instances/0"))[:]
    big = zarr.open_array(str(out / "big-endian/labels/instances/0"))[:]
    assert little.max() > 10 and np.array_equal(little, big)
    # degenerate but valid images: no crash, sensible results
    assert zarr.open_array(str(out / "one-pixel/labels/instances/0"))[:].shape == (1, 1)
    assert zarr.open_array(str(out / "constant/labels/instances/0"))[:].max() == 0


def test_very_long_path(run_cli, tmp_path: Path) -> None:
    deep = tmp_path
    for i in range(4):
        deep = deep / (f"{i}-" + "x" * 200)
    path = synthetic.write_tiff(deep / ("y" * 200 + ".tif"), (200, 210), seed=1)
    out = deep / "out.zarr"
    result = run_cli("--input", str(path), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert _is_complete(out / ("y" * 200))


def test_name_that_would_escape_or_hit_our_folder(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "_segpipe.tif", (64, 64), seed=1)
    result = run_cli("--input", str(path), "--output", str(tmp_path / "o.zarr"))
    assert result.exit_code == 1
    assert "not a plain folder name" in _text(result)


@pytest.fixture
def small_disk(tmpfs) -> Path:  # type: ignore[no-untyped-def]
    """A 3 MB disk that fills up during the write."""
    return tmpfs("3m")  # type: ignore[no-any-return]


def test_disk_fills_up_during_the_write(run_cli, small_disk: Path, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "big.tif", (2048, 2048), seed=2)  # ~8 MB of data
    out = small_disk / "out.zarr"
    # past the free-space check (which refuses this run: tests/test_footprint.py), as a
    # disk that another writer fills meanwhile would be
    result = run_cli("--input", str(path), "--output", str(out), "--no-space-check")
    assert result.exit_code == 1
    text = _text(result)
    assert "No space left on device" in text and "--resume" in text
    assert not _is_complete(out / "big")


def test_read_only_output_folder(run_cli, small_disk: Path, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (64, 64), seed=2)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run_cli("--input", str(path), "--output", str(small_disk / "out.zarr"))
    assert result.exit_code == 1
    assert "not writable" in _text(result) and "out.zarr" in _text(result)


def test_mixed_channel_counts(run_cli, tmp_path: Path) -> None:
    """`--channel 2` suits the 3-channel image and not the 2-channel one."""
    d = tmp_path / "in"
    d.mkdir()
    nuclei, _ = synthetic.render((slice(0, 200), slice(0, 180)), seed=6)
    three = np.stack([nuclei // 4, nuclei // 2, nuclei], axis=0)
    tifffile.imwrite(d / "three.tif", three, metadata={"axes": "CYX"})
    tifffile.imwrite(d / "two.tif", three[:2], metadata={"axes": "CYX"})
    out = tmp_path / "out.zarr"
    args = ("--input", str(d), "--output", str(out), "--channel", "2")
    result = run_cli(*args, "--on-error", "skip")
    assert result.exit_code == 3, result.output
    text = _text(result)
    assert "two.tif" in text and "channel 2" in text
    assert _is_complete(out / "three") and not _is_complete(out / "two")
    assert np.array_equal(zarr.open_array(str(out / "three" / "0"))[:], nuclei)
    result = run_cli(*args, "--overwrite")  # default policy: refuse before any compute
    assert result.exit_code == 1 and "two.tif" in _text(result)


def test_missing_manifest_entry(run_cli, tmp_path: Path) -> None:
    synthetic.write_tiff(tmp_path / "here.tif", (120, 130), seed=1)
    manifest = tmp_path / "list.txt"
    manifest.write_text("here.tif\ngone.tif\n")
    out = tmp_path / "out.zarr"
    result = run_cli("--input", str(manifest), "--output", str(out))
    assert result.exit_code == 1 and "gone.tif" in _text(result) and "manifest" in _text(result)
    assert not out.exists()
    result = run_cli("--input", str(manifest), "--output", str(out), "--on-error", "skip")
    assert result.exit_code == 3
    assert "gone.tif" in _text(result) and "no such file" in _text(result)
    assert _is_complete(out / "here") and not (out / "gone").exists()

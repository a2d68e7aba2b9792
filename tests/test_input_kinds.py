"""Every listed input kind through `segpipe run`: segmented as scikit-image segments the
whole image, or refused before any compute in one line naming the file.

The reference is Otsu after the Gaussian, as scikit-image computes them on the float32
image the segmenter sees (the threshold taken on its float64 copy, where scikit-image's
float32 arithmetic overflows or underflows), labelled with full connectivity.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from scipy import ndimage as ndi
from skimage import filters
from skimage.measure import label

from segpipe import synthetic
from tests.helpers import same_up_to_renumbering

SIGMA = 2.0  # otsu's default


def _nuclei(shape: tuple[int, int] = (160, 144), seed: int = 3) -> np.ndarray:
    image, _ = synthetic.render((slice(0, shape[0]), slice(0, shape[1])), seed=seed)
    return image


def _expected(image: np.ndarray) -> np.ndarray:
    """Whole-image Otsu objects of ``image`` as the pipeline reads it (float32)."""
    smooth = ndi.gaussian_filter(image.astype(np.float32), SIGMA, mode="nearest", truncate=4.0)
    wide = smooth.astype(np.float64)
    mask = wide > filters.threshold_otsu(wide)
    assert 0.05 < mask.mean() < 0.95  # a real split, not one object over everything
    return label(mask, connectivity=2)


def _instances(out: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / name / "labels" / "instances" / "0"))[:])


def _complete(out: Path, name: str) -> bool:
    attrs = zarr.open_group(str(out / name), mode="r").attrs.asdict()
    return bool(attrs.get("segpipe", {}).get("complete"))


def _refused(result: Any, path: Path, *words: str) -> str:
    """Exit 1 with one line naming ``path`` and saying ``words``, no traceback."""
    text = result.output.strip()
    assert result.exit_code == 1, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    flat = " ".join(text.split())
    for word in (str(path), *words):
        assert word in flat, (word, flat)
    return flat


def _segmented(run_cli: Any, source: Path, out: Path, name: str, image: np.ndarray) -> None:
    result = run_cli("--input", str(source), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert _complete(out, name)
    expected = _expected(image)
    got = _instances(out, name)
    assert got.max() == expected.max() > 3
    assert same_up_to_renumbering(got, expected)


# -- Zarr v2 and NGFF 0.4 --------------------------------------------------------------


def test_zarr_v2_array(run_cli: Any, tmp_path: Path) -> None:
    image = _nuclei()
    path = tmp_path / "plain.zarr"
    z = zarr.open_array(
        path, mode="w", shape=image.shape, chunks=(64, 64), dtype="<u2", zarr_format=2
    )
    z[:] = image
    assert (path / ".zarray").is_file() and not (path / "zarr.json").exists()
    out = tmp_path / "out.zarr"
    _segmented(run_cli, path, out, "plain", image)
    np.testing.assert_array_equal(zarr.open_array(str(out / "plain" / "0"))[:], image)
    # unchanged since it completed: the next incremental run skips it
    result = run_cli("--input", str(path), "--output", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert "unchanged" in result.output


def test_ngff_04_ome_zarr_written_by_ome_zarr_py(run_cli: Any, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_image
    image = _nuclei((200, 176), seed=5)
    path = tmp_path / "cells.ome.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=2)
    write_image(image, root, axes="yx", fmt=FormatV04(), storage_options={"chunks": (64, 64)})
    multiscales = json.loads((path / ".zattrs").read_text())["multiscales"][0]
    assert multiscales["version"] == "0.4" and len(multiscales["datasets"]) > 1
    _segmented(run_cli, path, tmp_path / "out.zarr", "cells", image)


# -- dtypes and scales ---------------------------------------------------------------------


def test_float16_tiff(run_cli: Any, tmp_path: Path) -> None:
    image = (_nuclei() / 60000).astype(np.float16)
    path = tmp_path / "half.tif"
    tifffile.imwrite(path, image, tile=(64, 64))
    out = tmp_path / "out.zarr"
    _segmented(run_cli, path, out, "half", image)
    stored = zarr.open_array(str(out / "half" / "0"))
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored[:], image.astype(np.float32))
    assert (out / "half" / "tables" / "objects.parquet").is_file()


def test_images_at_extreme_scales(run_cli: Any, tmp_path: Path) -> None:
    """The same nuclei x2**47 in uint64, x1e-30 in float32, and 1e12 + them in float64
    (which the pipeline segments as float32, a few steps of 65536 apart)."""
    base = _nuclei()
    images = {
        "big": base.astype(np.uint64) * np.uint64(2**47),
        "tiny": (base * 1e-30).astype(np.float32),
        "offset": 1e12 + base.astype(np.float64) * 50,
    }
    d = tmp_path / "in"
    d.mkdir()
    for name, image in images.items():
        tifffile.imwrite(d / f"{name}.tif", image)
    out = tmp_path / "out.zarr"
    result = run_cli("--input", str(d), "--output", str(out))
    assert result.exit_code == 0, result.output
    for name, image in images.items():
        expected = _expected(image)
        got = _instances(out, name)
        assert got.max() == expected.max() > 3, name
        assert same_up_to_renumbering(got, expected), name


# -- TIFF series ---------------------------------------------------------------------------


def test_tiff_with_two_series(run_cli: Any, tmp_path: Path) -> None:
    first, second = _nuclei(seed=3), _nuclei((96, 200), seed=8).astype(np.float32)
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(first, tile=(64, 64), compression="zlib")
        tif.write(second)
    out = tmp_path / "out.zarr"
    text = _refused(run_cli("--input", str(path), "--output", str(out)), path, "--series N")
    assert "0: (160, 144) uint16" in text and "1: (96, 200) float32" in text
    assert not (out / "two").exists()
    text = _refused(
        run_cli("--input", str(path), "--output", str(out), "--series", "2"),
        path,
        "series 2 requested",
        "choose 0 to 1",
    )
    result = run_cli("--input", str(path), "--output", str(out), "--series", "1")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(zarr.open_array(str(out / "two" / "0"))[:], second)
    assert same_up_to_renumbering(_instances(out, "two"), _expected(second))


# -- names ------------------------------------------------------------------------------------


def test_tiff_named_zarr_json(run_cli: Any, tmp_path: Path) -> None:
    image = _nuclei()
    path = tmp_path / "zarr.json.tif"
    tifffile.imwrite(path, image)
    out = tmp_path / "out.zarr"
    _segmented(run_cli, path, out, "zarr.json.tif", image)
    assert json.loads((out / "zarr.json").read_text())["node_type"] == "group"

"""Tiled `otsu` through `segpipe run` equals scikit-image on the whole image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from skimage import filters, measure

from segpipe import synthetic
from tests.helpers import same_up_to_renumbering


def reference(image: np.ndarray) -> np.ndarray:
    """The whole-image pipeline the issue names, in one process."""
    smooth = filters.gaussian(image.astype(np.float32), sigma=2, preserve_range=True)
    return measure.label(smooth > filters.threshold_otsu(smooth), connectivity=image.ndim)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plane") / "plane.tif"
    return synthetic.write_tiff(path, (3001, 2503), tile=256, seed=11)


# 480 and 120 blocks are slow variants; 1000 (12 blocks, partial edge blocks) stays
@pytest.mark.parametrize(
    "tile",
    [pytest.param(128, marks=pytest.mark.slow), pytest.param(256, marks=pytest.mark.slow), 1000],
)
def test_otsu_2d_equals_whole_image(run_cli, plane: Path, tmp_path: Path, tile: int) -> None:
    out = tmp_path / "out.zarr"
    result = run_cli(
        "--input",
        str(plane),
        "--output",
        str(out),
        "--segmenter",
        "otsu",
        "--tile",
        str(tile),
        "--set",
        "sigma=2.0",
    )
    assert result.exit_code == 0, result.output
    labels = zarr.open_array(str(out / "plane" / "labels" / "instances" / "0"))[:]
    ref = reference(tifffile.imread(plane))
    assert ref.max() > 1000  # objects cross many tile borders
    assert labels.dtype == np.uint32
    assert same_up_to_renumbering(labels, ref)
    # global ids are consecutive from 1
    assert np.array_equal(np.unique(labels), np.arange(ref.max() + 1))


def test_otsu_3d_equals_whole_volume(run_cli, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    # Blobs in a volume, built from smoothed noise: objects of all sizes and shapes.
    from scipy import ndimage as ndi

    # 2 x 4 x 4 blocks of 64, the last ones partial: edges in every axis
    vol = ndi.gaussian_filter(rng.normal(size=(97, 231, 213)).astype(np.float32), 2)
    vol = ((vol - vol.min()) / (vol.max() - vol.min()) * 60000).astype(np.uint16)
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, vol, metadata={"axes": "ZYX"})
    out = tmp_path / "out.zarr"
    result = run_cli(
        "--input",
        str(path),
        "--output",
        str(out),
        "--segmenter",
        "otsu",
        "--tile",
        "64",
        "--set",
        "sigma=2.0",
    )
    assert result.exit_code == 0, result.output
    labels = zarr.open_array(str(out / "vol" / "labels" / "instances" / "0"))[:]
    ref = reference(vol)
    assert ref.max() > 20
    assert same_up_to_renumbering(labels, ref)

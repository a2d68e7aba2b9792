"""Watershed tiled at 256 agrees with one block over the whole image (PQ >= 0.98)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi
from skimage import filters
from skimage.feature import peak_local_max
from skimage.measure import label
from skimage.segmentation import watershed

from segpipe import synthetic
from tests.helpers import panoptic_quality


def whole_image_watershed(image: np.ndarray) -> np.ndarray:
    """The textbook recipe on the whole image, written independently of segpipe."""
    smooth = filters.gaussian(image.astype(np.float32), sigma=2, preserve_range=True)
    mask = smooth > filters.threshold_otsu(smooth)
    distance = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=5, labels=label(mask), exclude_border=False)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask)


def test_watershed_tiled_matches_whole(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "nuclei.tif", (1500, 1400), seed=21)
    tiled_out, whole_out = tmp_path / "tiled.zarr", tmp_path / "whole.zarr"
    for out, tile in ((tiled_out, "256"), (whole_out, "1500")):
        result = run_cli(
            "--input", str(path), "--output", str(out), "--segmenter", "watershed", "--tile", tile
        )
        assert result.exit_code == 0, result.output
    tiled = zarr.open_array(str(tiled_out / "nuclei/labels/instances/0"))[:]
    whole = zarr.open_array(str(whole_out / "nuclei/labels/instances/0"))[:]
    assert whole.max() > 1500  # a dense field: many touching nuclei, many cut by tiles
    assert panoptic_quality(tiled, whole) >= 0.98
    # and the single block is the textbook whole-image watershed
    assert panoptic_quality(whole, whole_image_watershed(tifffile.imread(path))) >= 0.999


@pytest.mark.slow  # tiled watershed equal to the whole image stays in the default suite
def test_watershed_splits_touching_nuclei(run_cli, tmp_path: Path) -> None:
    """Against ground truth: touching nuclei are separated, not merged."""
    image, truth = synthetic.render((slice(0, 768), slice(0, 768)), seed=4)
    path = tmp_path / "gt.tif"
    tifffile.imwrite(path, image)
    out = tmp_path / "out.zarr"
    result = run_cli(
        "--input", str(path), "--output", str(out), "--segmenter", "watershed", "--tile", "256"
    )
    assert result.exit_code == 0, result.output
    labels = zarr.open_array(str(out / "gt/labels/instances/0"))[:]
    merged = label(truth > 0)  # what plain connected components would give
    assert merged.max() < len(np.unique(truth)) - 1  # the field does have touching nuclei
    assert panoptic_quality(labels, truth) > panoptic_quality(merged, truth)
    assert panoptic_quality(labels, truth) >= 0.85

"""Seeded region growing: hand cases, tolerance, synthetic nuclei, and tiled vs one block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from numpy.typing import NDArray

from segpipe.errors import SegmenterError
from segpipe.io.readers import open_source
from segpipe.segmenters import get_segmenter
from segpipe.segmenters.region_growing import RegionGrowing, grow_regions
from segpipe.segmenters.threshold import otsu_threshold
from segpipe.synthetic import render, write_tiff
from tests.helpers import panoptic_quality, segment_whole, tiled_instances, whole_image_stats

# -- helpers -------------------------------------------------------------------


def row(*values: float) -> NDArray[np.float32]:
    return np.array([values], np.float32)


# -- hand-computed cases ---------------------------------------------------------


def test_tolerance_stops_growth_below_the_peak() -> None:
    image = row(0, 5, 7, 9, 6, 3, 0)
    # one seed (9); tolerance 3: pixels >= 6 join; without: everything >= floor 2
    labels, seeds = grow_regions(image, threshold=4, floor=2, h=1, tolerance=3)
    np.testing.assert_array_equal(seeds, row(0, 0, 0, 1, 0, 0, 0))
    np.testing.assert_array_equal(labels, row(0, 0, 1, 1, 1, 0, 0))
    labels, _ = grow_regions(image, threshold=4, floor=2, h=1)
    np.testing.assert_array_equal(labels, row(0, 1, 1, 1, 1, 1, 0))


def test_two_seeds_meet_where_the_brighter_flank_claims_the_valley() -> None:
    image = row(0, 9, 8, 4, 1, 5, 7, 0)
    # floor 2: the valley pixel (1) joins nobody
    labels, _ = grow_regions(image, threshold=6, floor=2, h=1)
    np.testing.assert_array_equal(labels, row(0, 1, 1, 1, 0, 2, 2, 0))
    # floor 0.5: flooding brightest first reaches 5 (region 2) before 4 (region 1),
    # so region 2 claims the valley
    labels, _ = grow_regions(image, threshold=6, floor=0.5, h=1)
    np.testing.assert_array_equal(labels, row(0, 1, 1, 1, 2, 2, 2, 0))


def test_only_the_part_connected_to_the_seed_is_kept() -> None:
    image = row(0, 9, 5, 8, 0)
    # 8 is only 3 above the valley: with h=4 it is no seed, so the flood from 9 takes it
    labels, _ = grow_regions(image, threshold=4, floor=2, h=4)
    np.testing.assert_array_equal(labels, row(0, 1, 1, 1, 0))
    # tolerance 2 (>= 7): 8 qualifies, but the valley (5) between it and the seed does not
    labels, _ = grow_regions(image, threshold=4, floor=2, h=4, tolerance=2)
    np.testing.assert_array_equal(labels, row(0, 1, 0, 0, 0))


def test_dim_maxima_seed_nothing() -> None:
    image = row(0, 3, 0, 9, 0)
    labels, seeds = grow_regions(image, threshold=4, floor=1, h=1)
    np.testing.assert_array_equal(seeds, row(0, 0, 0, 1, 0))
    np.testing.assert_array_equal(labels, row(0, 0, 0, 1, 0))  # 3 is above floor but unseeded
    empty, _ = grow_regions(image, threshold=10, floor=1, h=1)
    assert not empty.any()


def test_tolerance_sets_region_size() -> None:
    rows, cols = np.mgrid[:41, :41]
    bump = (100 * np.exp(-((rows - 20) ** 2 + (cols - 20) ** 2) / 200)).astype(np.float32)
    sizes = []
    for tolerance in [10.0, 30.0, 60.0, None]:
        labels, _ = grow_regions(bump, threshold=50, floor=20, h=5, tolerance=tolerance)
        assert labels.max() == 1
        limit = 20 if tolerance is None else max(bump.max() - tolerance, 20)
        # one smooth peak: the region is every pixel at or above the limit
        np.testing.assert_array_equal(labels == 1, bump >= limit)
        sizes.append(int((labels == 1).sum()))
    assert sizes == sorted(sizes) and sizes[0] * 4 < sizes[-1]


def test_prepare_defaults() -> None:
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.normal(100, 5, 900), rng.normal(300, 5, 100)])
    stats = whole_image_stats(image.astype(np.float32).reshape(20, 50))
    params = RegionGrowing(sigma=0).prepare(stats)
    otsu = otsu_threshold(stats)
    assert params["threshold"] == otsu == params["floor"]
    # h: 10 % of the threshold's height above the background (the 1st percentile)
    assert params["h"] == pytest.approx(0.1 * (otsu - stats.percentile(1)), rel=1e-5)
    fixed = RegionGrowing(threshold=150, floor=120, h=7).prepare(stats)
    assert (fixed["threshold"], fixed["floor"], fixed["h"]) == (150, 120, 7)


def test_constant_image_has_no_regions() -> None:
    image = np.full((16, 16), 7, np.float32)
    assert not segment_whole(RegionGrowing(), image).any()


@pytest.mark.parametrize(
    ("options", "field"), [({"tolerance": -1}, "tolerance"), ({"h": 0}, "h"), ({"size": 3}, "size")]
)
def test_bad_options_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(SegmenterError, match=field):
        get_segmenter("region-growing", **options)


# -- synthetic nuclei -------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_synthetic_nuclei(seed: int) -> None:
    # measured with the defaults: PQ 0.875, 0.876, 0.902 (the watershed segmenter: 0.87-0.90)
    image, truth = render((slice(0, 256), slice(0, 256)), seed=seed)
    assert panoptic_quality(truth, segment_whole(RegionGrowing(), image)) >= 0.85


def test_tolerance_shrinks_synthetic_nuclei() -> None:
    image, _ = render((slice(0, 256), slice(0, 256)), seed=0)
    area = [
        int((segment_whole(RegionGrowing(tolerance=t), image) > 0).sum())
        for t in (2000.0, 8000.0, None)
    ]
    assert area[0] * 2 < area[1] < area[2]


# -- through the pipeline -----------------------------------------------------------


@pytest.mark.integration
def test_tiles_agree_with_one_block(client: Client, tmp_path: Path) -> None:
    source = open_source(write_tiff(tmp_path / "nuclei.tif", (256, 256), seed=6))
    labels = tiled_instances(client, tmp_path, source, RegionGrowing(), (128, 256))
    assert labels[256].max() > 50
    assert panoptic_quality(labels[256], labels[128]) >= 0.98

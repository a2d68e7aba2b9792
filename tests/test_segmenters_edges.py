"""Edge-based segmentation: hand cases, levels, synthetic nuclei, and tiled vs one block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

from segpipe.errors import SegmenterError
from segpipe.io.readers import open_source
from segpipe.segmenters import get_segmenter
from segpipe.segmenters.edges import Edges, edge_watershed
from segpipe.segmenters.threshold import Otsu, otsu_threshold
from segpipe.synthetic import render, write_tiff
from tests.helpers import panoptic_quality, segment_whole, tiled_instances, whole_image_stats

# -- helpers -------------------------------------------------------------------


# -- hand-computed cases ---------------------------------------------------------

PROFILE = np.array([0, 0, 0, 4, 8, 10, 10, 10, 8, 4, 0, 0, 0], np.float32)


@pytest.mark.parametrize("operator", ["prewitt", "sobel"])
def test_object_ends_at_the_strongest_edge(operator: str) -> None:
    # identical rows make the gradient |central difference| along the row (up to a scale):
    # column      0  1  2  3  4  5  6  7  8  9 10 11 12
    # value       0  0  0  4  8 10 10 10  8  4  0  0  0
    # gradient    0  0  2  4  3  1  0  1  3  4  2  0  0
    # markers: background where < 2 (columns 0-2, 10-12), object where > 9 (columns 5-7).
    # Flooding the gradient upwards, the object takes column 4 (3) before the background
    # reaches it; column 3 (4) was already claimed from column 2 (2): the edge is the peak.
    image = np.tile(PROFILE, (3, 1))
    labels = edge_watershed(image, low=2, high=9, operator=operator)  # type: ignore[arg-type]
    expected = np.zeros_like(PROFILE, dtype=np.int32)
    expected[4:9] = 1
    np.testing.assert_array_equal(labels, np.tile(expected, (3, 1)))


def test_each_bright_core_is_one_object() -> None:
    image = np.zeros((9, 20), np.float32)
    image[2:7, 2:7] = 10  # bright: a core above high
    image[2:7, 12:17] = 10
    image[4, 9] = 6  # dim blob between them: above low, no core of its own
    labels = edge_watershed(image, low=2, high=9)
    assert labels.max() == 2
    assert len(np.unique(labels[2:7, 2:7])) == len(np.unique(labels[2:7, 12:17])) == 1
    assert labels[4, 4] != labels[4, 14]
    assert (labels[0] == 0).all() and (labels[:, 19] == 0).all()


def test_no_core_no_objects() -> None:
    image = np.full((8, 8), 5, np.float32)
    assert not edge_watershed(image, low=2, high=9).any()


def test_levels_from_contrast_or_values() -> None:
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.normal(100, 5, 900), rng.normal(300, 5, 100)])
    stats = whole_image_stats(image.astype(np.float32).reshape(20, 50))
    background, otsu = stats.percentile(1), otsu_threshold(stats)
    params = Edges().prepare(stats)
    assert params["low"] == pytest.approx(background + 0.5 * (otsu - background), rel=1e-6)
    assert params["high"] == pytest.approx(background + 1.75 * (otsu - background), rel=1e-6)
    assert Edges(low=0, high=1).prepare(stats) == {
        "low": pytest.approx(background),
        "high": pytest.approx(otsu),
    }
    fixed = Edges(levels="intensity", low=120, high=250).prepare(stats)
    assert (fixed["low"], fixed["high"]) == (120, 250)


def test_constant_image_has_no_objects() -> None:
    assert not segment_whole(Edges(), np.full((16, 16), 7, np.float32)).any()


def test_halo_is_diameter_plus_the_gradient() -> None:
    assert Edges(diameter=30).halo(2) == (31, 31)
    assert Edges().halo(3) == (41, 41, 41)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"low": 2.0, "high": 1.0}, "high"),
        ({"operator": "canny"}, "operator"),
        ({"diameter": 1}, "diameter"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(SegmenterError, match=field):
        get_segmenter("edges", **options)


# -- synthetic nuclei -------------------------------------------------------------


@pytest.mark.parametrize(("seed", "operator"), [(0, "prewitt"), (1, "prewitt"), (2, "sobel")])
def test_finds_synthetic_nuclei(seed: int, operator: str) -> None:
    # measured with the defaults (prewitt): PQ 0.682, 0.732, 0.707 (sobel within 0.005);
    # global Otsu 0.625, 0.578, 0.635. One global marker level cannot separate every
    # touching pair of bright nuclei, which caps PQ here.
    image, truth = render((slice(0, 256), slice(0, 256)), seed=seed)
    pq = panoptic_quality(truth, segment_whole(Edges(operator=operator), image))
    assert pq >= 0.66
    assert pq > panoptic_quality(truth, segment_whole(Otsu(), image))


# -- through the pipeline -----------------------------------------------------------


@pytest.mark.integration
def test_tiles_agree_with_one_block(client: Client, tmp_path: Path) -> None:
    source = open_source(write_tiff(tmp_path / "nuclei.tif", (256, 256), seed=6))
    labels = tiled_instances(client, tmp_path, source, Edges(), (128, 256))
    assert labels[256].max() > 50
    assert panoptic_quality(labels[256], labels[128]) >= 0.98

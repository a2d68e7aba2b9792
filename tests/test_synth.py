"""The varied synthetic nuclei (`segpipe.deep.synth`): deterministic, truthful labels, the
sizes, packing and noise each style asks for, held-out sets apart from training."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label, regionprops

from segpipe.deep import synth
from segpipe.deep.data import TRAIN_SEED_MIN

# One plain style: round nuclei of one size, no clusters, no clutter, bright and clean.
PLAIN = synth.Style(
    radius=(8.0, 8.0),
    coverage=0.2,
    clustered=0.0,
    overlap=0.0,
    elongation=1.0,
    roughness=0.0,
    texture=0.0,
    nucleoli=0.0,
    spread=0.0,
    dim=0.0,
    uneven=0.0,
    background=0.1,
    gradient=0.0,
    blobs=0.0,
    debris=0.0,
    blur=0.0,
    noise="gaussian",
    photons=1000.0,
    read_noise=0.0,
)


def _inner(labels: np.ndarray) -> list[object]:
    """Regions that touch no image edge."""
    rows, cols = labels.shape
    return [
        r
        for r in regionprops(labels.astype(np.int64))
        if r.bbox[0] > 0 and r.bbox[1] > 0 and r.bbox[2] < rows and r.bbox[3] < cols
    ]


def test_same_seed_same_image() -> None:
    a = synth.nuclei((96, 128), seed=5)
    b = synth.nuclei((96, 128), seed=5)
    c = synth.nuclei((96, 128), seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == a[1].shape == (96, 128)
    assert a[0].dtype == np.uint16 and a[1].dtype == np.uint32


def test_labels_are_numbered_one_to_k() -> None:
    _, labels = synth.nuclei((256, 256), seed=3)
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, len(ids)))
    assert len(ids) > 5


def test_plain_nuclei_have_the_radius_asked_for() -> None:
    image, labels = synth.nuclei((256, 256), seed=1, style=PLAIN)
    regions = _inner(labels)
    assert len(regions) >= 10
    # a digital disc of radius 8 covers about pi 8² = 201 pixels
    radii = [np.sqrt(r.area / np.pi) for r in regions]
    assert min(radii) >= 7.5 and max(radii) <= 8.5, radii
    # with no overlap allowed, centres are at least two radii apart
    centres = np.array([r.centroid for r in regions])
    gaps = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    assert gaps[np.triu_indices(len(centres), 1)].min() >= 15.5
    # nuclei are brighter than the background everywhere (no noise, no blur)
    assert image[labels > 0].min() > image[labels == 0].max()


def test_clusters_touch() -> None:
    style = replace(PLAIN, clustered=1.0, overlap=0.25, coverage=0.4)
    _, labels = synth.nuclei((256, 256), seed=2, style=style)
    # touching nuclei: fewer connected foreground blobs than nuclei
    blobs = label(labels > 0, connectivity=1).max()
    assert blobs < 0.7 * labels.max(), (blobs, labels.max())
    # each nucleus is still (nearly always) one piece
    pieces = [ndi.label(labels == i)[1] for i in range(1, int(labels.max()) + 1)]
    assert np.mean(np.array(pieces) == 1) >= 0.95


def test_training_sizes_span_four_times() -> None:
    rng = np.random.default_rng(0)
    styles = [synth.sample_style(rng) for _ in range(300)]
    lows = [s.radius[0] for s in styles]
    highs = [s.radius[1] for s in styles]
    assert min(lows) >= 5.0 and max(highs) <= 20.0 + 1e-9
    assert max(highs) / min(lows) >= 3.8  # 5-20 px: a 4× range over the set
    assert all(h >= lo for lo, h in zip(lows, highs, strict=True))
    assert {s.noise for s in styles} == {"poisson", "gaussian", "mixed"}


def test_held_out_sets_differ_from_training_and_its_seeds() -> None:
    large = synth.held_out_set("large", 2, (256, 256))
    radii = [np.sqrt(r.area / np.pi) for _, lab in large for r in _inner(lab)]
    assert radii and np.median(radii) > synth.TRAIN.radius[1]
    assert synth.HELD_OUT["noisy"].photons[1] < synth.TRAIN.photons[0]
    assert synth.HELD_OUT["noisy"].read_noise[0] >= synth.TRAIN.read_noise[1]
    assert synth.HELD_OUT["low-contrast"].background[0] > synth.TRAIN.background[1]
    assert synth.HELD_OUT_SEED0 + 1000 * len(synth.HELD_OUT) < TRAIN_SEED_MIN
    with pytest.raises(ValueError, match="held-out set"):
        synth.held_out_set("tiny", 1)


def test_fewer_photons_more_noise() -> None:
    """Same layout (same seed), shot noise only: the background's spread relative to the
    nuclei's contrast grows as photons fall."""

    def snr(photons: float) -> float:
        style = replace(PLAIN, noise="poisson", photons=photons)
        image, labels = synth.nuclei((128, 128), seed=4, style=style)
        x = image.astype(np.float64)
        fg, bg = x[labels > 0], x[labels == 0]
        return float((fg.mean() - bg.mean()) / bg.std())

    assert snr(3.0) < snr(30.0) < snr(3000.0)


def test_debris_is_not_a_nucleus() -> None:
    style = replace(PLAIN, coverage=0.0, debris=5.0)
    image, labels = synth.nuclei((128, 128), seed=7, style=style)
    assert labels.max() == 0
    assert image.max() > image.min() + 100  # the specks are there, unlabelled


def test_bad_shape() -> None:
    with pytest.raises(ValueError, match="2D shape"):
        synth.nuclei((8, 8, 8), seed=0)

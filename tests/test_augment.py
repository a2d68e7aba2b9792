"""Training-time augmentation (`segpipe.deep.augment`) against numpy's exact array moves,
scikit-image's warps and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.transform import AffineTransform
from skimage.transform import rotate as sk_rotate
from skimage.transform import warp as sk_warp

from segpipe.deep import augment


def _pair(shape: tuple[int, ...] = (24, 24), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(rng.normal(size=shape), 2).astype(np.float32)
    labels = ndi.label(image > 0.05)[0].astype(np.int32)
    return image, labels


@pytest.mark.parametrize("axes", [[0], [1], [0, 1]])
def test_flips_preserve_labels_exactly(axes: list[int]) -> None:
    image, labels = _pair()
    out, out_labels = augment.flip(image, labels, axes=axes)
    assert np.array_equal(out_labels, np.flip(labels, axes))
    assert np.array_equal(out, np.flip(image, axes))
    # the same ids, each with the same number of pixels
    assert np.array_equal(np.bincount(out_labels.ravel()), np.bincount(labels.ravel()))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_quarter_turns_by_warp_equal_numpy(k: int) -> None:
    image, labels = _pair()
    out, out_labels = augment.warp(image, labels, angle=k * np.pi / 2)
    assert np.array_equal(out_labels, np.rot90(labels, k))
    assert np.allclose(out, np.rot90(image, k), atol=1e-6)
    r_image, r_labels = augment.rot90(image, labels, k=k)
    assert np.array_equal(r_labels, np.rot90(labels, k)) and np.array_equal(r_image, out)


def test_identity_and_zero_elastic_field() -> None:
    image, labels = _pair((20, 30))
    field = augment.elastic_field((20, 30), np.random.default_rng(1), alpha=0.0, sigma=4.0)
    assert field.shape == (2, 20, 30) and not field.any()
    out, out_labels = augment.warp(image, labels, displacement=field)
    assert np.array_equal(out, image) and np.array_equal(out_labels, labels)


def test_elastic_field_reaches_alpha() -> None:
    field = augment.elastic_field((40, 40), np.random.default_rng(2), alpha=3.0, sigma=5.0)
    assert np.isclose(np.sqrt((field**2).sum(axis=0)).max(), 3.0, rtol=1e-5)


def test_zoom_of_a_ramp_by_hand() -> None:
    """Linear interpolation is exact on a linear ramp: zoom 2 about the centre of rows
    0..3 reads rows 1.5 + (i - 1.5) / 2."""
    image = np.repeat(np.arange(4, dtype=np.float32)[:, None], 4, axis=1)
    out, _ = augment.warp(image, np.zeros((4, 4), np.int32), zoom=2.0)
    assert np.allclose(out[:, 0], [0.75, 1.25, 1.75, 2.25])


def test_rotation_matches_scikit_image() -> None:
    image, labels = _pair((41, 41), seed=3)
    out, _ = augment.warp(image, labels, angle=np.deg2rad(30))
    expected = sk_rotate(image.astype(np.float64), 30, order=1, preserve_range=True)
    inner = (slice(10, 31), slice(10, 31))  # away from the edges the two modes fill differently
    assert np.allclose(out[inner], expected[inner], atol=1e-5)


def test_zoom_rotation_and_shift_match_scikit_image() -> None:
    image, labels = _pair((48, 48), seed=4)
    zoom, angle, center = 1.5, np.deg2rad(-20), (25.0, 22.5)
    out, _ = augment.warp(image, labels, shape=(20, 20), center=center, zoom=zoom, angle=angle)
    # scikit-image maps output (col, row) to input (col, row): centre, turn, scale, shift
    c, s = np.cos(angle), np.sin(angle)
    to_origin = AffineTransform(translation=(-9.5, -9.5))
    turn = AffineTransform(matrix=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) / [zoom, zoom, 1])
    back = AffineTransform(translation=(center[1], center[0]))
    expected = sk_warp(
        image.astype(np.float64),
        inverse_map=to_origin + turn + back,
        output_shape=(20, 20),
        order=1,
        preserve_range=True,
    )
    assert np.allclose(out, expected, atol=1e-5)


def test_labels_are_never_blended() -> None:
    image, labels = _pair((64, 64), seed=5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        out, out_labels = augment.random_augment(image, labels, rng, shape=(32, 32))
        assert out.shape == out_labels.shape == (32, 32) and out.dtype == np.float32
        assert out_labels.dtype == labels.dtype
        assert set(np.unique(out_labels)) <= set(np.unique(labels))


def test_random_augment_is_deterministic() -> None:
    image, labels = _pair((64, 64), seed=6)
    a = augment.random_augment(image, labels, np.random.default_rng(9), shape=(32, 32))
    b = augment.random_augment(image, labels, np.random.default_rng(9), shape=(32, 32))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_volumes_turn_in_their_last_two_axes() -> None:
    image, labels = _pair((6, 16, 16), seed=7)
    out, out_labels = augment.warp(image, labels, angle=np.pi / 2)
    assert np.array_equal(out_labels, np.rot90(labels, 1, axes=(1, 2)))
    out, out_labels = augment.random_augment(
        image, labels, np.random.default_rng(0), shape=(4, 8, 8)
    )
    assert out.shape == (4, 8, 8) and set(np.unique(out_labels)) <= set(np.unique(labels))


def test_intensity_by_hand() -> None:
    x = np.array([-0.25, 0.0, 0.25, 1.0, 2.0], np.float32)
    assert np.array_equal(augment.intensity(x), x)
    out = augment.intensity(x, scale=2.0, offset=0.1, gamma=2.0)
    assert np.allclose(out, [2 * -0.0625 + 0.1, 0.1, 2 * 0.0625 + 0.1, 2.1, 8.1])


def test_mismatched_pair_is_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        augment.flip(np.zeros((3, 3)), np.zeros((3, 4), int), axes=[0])
    with pytest.raises(ValueError, match="zoom > 0"):
        augment.warp(np.zeros((3, 3)), np.zeros((3, 3), int), zoom=0)

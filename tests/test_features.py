"""The feature bank against scikit-image/SciPy on the whole image, and blocks with their
halo against the whole image, bit for bit, in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage import filters
from skimage.feature import multiscale_basic_features

from segpipe import features
from segpipe.blocks import BlockGrid
from segpipe.synthetic import render
from tests.helpers import whole_image_stats

MANY = [
    "intensity",
    "gaussian_1",
    "gaussian_2.5",
    "sobel_0",
    "sobel_1",
    "prewitt_0.5",
    "log_1.5",
    "dog_1",
    "hessian1_1",
    "hessian2_2",
    "mean_2",
    "std_1.5",
]


def _image(shape: tuple[int, ...], seed: int = 0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), 2.0)  # structure at several scales
    return (smooth * 3000 + rng.random(shape) * 300).astype(np.float32)


def _tiled(
    image: NDArray[np.float32],
    bank: list[features.Feature | str],
    tile: int,
    halo: tuple[int, ...],
    constants: dict[str, float] | None = None,
) -> NDArray[np.float32]:
    """Each block's features computed on block + halo (as the pipeline reads it), cropped."""
    out = np.full((len(bank), *image.shape), np.nan, np.float32)
    for block in BlockGrid.build(image.shape, tile=tile, halo=halo):
        got = features.compute(image[block.read], bank, constants=constants)
        out[(slice(None), *block.core)] = got[(slice(None), *block.core_in_read)]
    return out


# -- the whole image against independent references ----------------------------------------


@pytest.mark.parametrize("shape", [(96, 130), (20, 34, 27)])
def test_default_bank_is_multiscale_basic_features_bit_for_bit(shape: tuple[int, ...]) -> None:
    image = _image(shape) / np.float32(4000)  # scikit-image wants floats in [0, 1]
    names = features.default_features(len(shape))
    got = features.compute(image, features.parse_features(names, ndim=len(shape)))
    ref = np.moveaxis(multiscale_basic_features(image), -1, 0)
    assert got.shape == ref.shape == (6 * (2 + len(shape)), *shape)
    for name, a, b in zip(names, got, ref, strict=True):
        assert np.array_equal(a, b), name


@pytest.mark.parametrize("ndim", [2, 3])
def test_each_kind_equals_its_reference(ndim: int) -> None:
    image = _image((70, 90) if ndim == 2 else (18, 30, 26), seed=ndim)
    wide = image.astype(np.float64)
    names = [n for n in MANY if not n.startswith("hessian")]
    got = dict(
        zip(names, features.compute(image, features.parse_features(names, ndim=ndim)), strict=True)
    )
    g1 = filters.gaussian(image, 1, preserve_range=True, mode="nearest")
    exact = {
        "intensity": image,
        "gaussian_1": g1,
        "gaussian_2.5": filters.gaussian(image, 2.5, preserve_range=True, mode="nearest"),
        "sobel_0": filters.sobel(image),
        "sobel_1": filters.sobel(g1),
        "prewitt_0.5": filters.prewitt(
            filters.gaussian(image, 0.5, preserve_range=True, mode="nearest")
        ),
        "log_1.5": ndi.gaussian_laplace(image, 1.5, mode="nearest"),
        "dog_1": filters.difference_of_gaussians(image, 1, 2),
    }
    for name, ref in exact.items():
        assert ref.dtype == np.float32 and np.array_equal(got[name], ref), name
    # local statistics over a 5^n box (half-width ceil(2) and ceil(1.5)): float64 references
    mean = ndi.uniform_filter(wide, 5, mode="nearest")
    std = np.sqrt(ndi.uniform_filter(wide**2, 5, mode="nearest") - mean**2)
    np.testing.assert_allclose(got["mean_2"], mean, rtol=1e-6)
    np.testing.assert_allclose(got["std_1.5"], std, rtol=1e-4, atol=1e-3)
    one = tuple(s // 2 for s in image.shape)
    box = image[tuple(slice(c - 2, c + 3) for c in one)].astype(np.float64)
    assert got["std_1.5"][one] == pytest.approx(box.std(), rel=1e-5)


def test_hessian_eigenvalues_are_those_of_the_second_differences() -> None:
    image = _image((40, 50))
    g = filters.gaussian(image, 2, preserve_range=True, mode="nearest").astype(np.float64)
    d0, d1 = np.gradient(g)
    h00, h01, h11 = np.gradient(d0, axis=0), np.gradient(d0, axis=1), np.gradient(d1, axis=1)
    matrices = np.stack([np.stack([h00, h01], -1), np.stack([h01, h11], -1)], -2)
    ref = np.linalg.eigvalsh(matrices)[..., ::-1]  # largest first
    got = features.compute(image, features.parse_features(["hessian1_2", "hessian2_2"], ndim=2))
    np.testing.assert_allclose(np.moveaxis(got, 0, -1), ref, rtol=1e-3, atol=1e-2)


# -- blocks with their halo against the whole image ------------------------------------------


@pytest.mark.parametrize("tile", [7, 16, 33, 200])
def test_tiled_equals_whole_image_in_2d(tile: int) -> None:
    image = _image((75, 101), seed=tile)
    bank: list[features.Feature | str] = [*features.parse_features(MANY, ndim=2), "otsu"]
    constants = features.statistics(whole_image_stats(image), ["otsu"])
    whole = features.compute(image, bank, constants=constants)
    halo = features.halo([f for f in bank if not isinstance(f, str)], 2)
    assert halo == (10, 10)  # hessian2_2: Gaussian radius 8 + two central differences
    assert np.array_equal(_tiled(image, bank, tile, halo, constants), whole)


@pytest.mark.parametrize("tile", [(5, 9, 8), (16, 16, 16)])
def test_tiled_equals_whole_image_in_3d(tile: tuple[int, int, int]) -> None:
    image = _image((21, 26, 30), seed=3)
    bank: list[features.Feature | str] = list(
        features.parse_features([*MANY, "hessian3_1"], ndim=3)
    )
    whole = features.compute(image, bank)
    halo = features.halo([f for f in bank if not isinstance(f, str)], 3)
    assert np.array_equal(_tiled(image, bank, tile, halo), whole)  # type: ignore[arg-type]


def test_default_bank_tiled_equals_whole_on_nuclei() -> None:
    image = render((slice(0, 300), slice(0, 340)), seed=4)[0].astype(np.float32)
    bank: list[features.Feature | str] = list(
        features.parse_features(features.default_features(2), ndim=2)
    )
    halo = features.halo([f for f in bank if not isinstance(f, str)], 2)
    assert halo == (66, 66)
    assert np.array_equal(_tiled(image, bank, 128, halo), features.compute(image, bank))


@pytest.mark.parametrize("name", [n for n in MANY if n != "intensity"])
def test_halo_is_needed_whole(name: str) -> None:
    """One pixel of context less and some block differs: the declared radius is tight."""
    image = _image((60, 64), seed=7)
    bank: list[features.Feature | str] = list(features.parse_features([name], ndim=2))
    (r, _) = features.halo([f for f in bank if not isinstance(f, str)], 2)
    whole = features.compute(image, bank)
    assert np.array_equal(_tiled(image, bank, 16, (r, r)), whole)
    assert not np.array_equal(_tiled(image, bank, 16, (r - 1, r - 1)), whole)


# -- names and statistics -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gauss_2", "unknown feature 'gauss_2'"),
        ("gaussian", "expected gaussian_SIGMA"),
        ("hessian_2", "name the eigenvalue"),
        ("hessian3_2", "a 2D Hessian has eigenvalues hessian1 to hessian2"),
        ("sobel2_1", "unknown feature"),
        ("log_0", "expected a scale > 0"),
        ("intensity_2", "unknown feature"),
        ("gaussian_-1", "unknown feature"),
    ],
)
def test_bad_names_are_refused_naming_them(name: str, message: str) -> None:
    with pytest.raises(features.FeatureError, match=message):
        features.parse_feature(name, ndim=2)


def test_a_repeated_feature_is_refused() -> None:
    with pytest.raises(features.FeatureError, match="listed twice"):
        features.parse_features(["gaussian_2", "gaussian_2.0"])


def test_names_are_canonical() -> None:
    parsed = features.parse_features(["gaussian_2.0", "hessian2_0.50", "intensity"])
    assert [f.name for f in parsed] == ["gaussian_2", "hessian2_0.5", "intensity"]


def test_statistics_equal_scikit_image_on_the_whole_image() -> None:
    image = render((slice(0, 200), slice(0, 230)), seed=2)[0].astype(np.float32)
    got = features.statistics(
        whole_image_stats(image), ["otsu", "li", "image_mean", "image_max", "p50"]
    )
    assert got["otsu"] == filters.threshold_otsu(image)
    assert got["li"] == pytest.approx(filters.threshold_li(image), rel=0.02)
    assert got["image_mean"] == pytest.approx(float(image.mean(dtype=np.float64)), rel=1e-9)
    assert got["image_max"] == float(image.max())
    assert got["p50"] == pytest.approx(float(np.percentile(image, 50)), rel=0.01)
    with pytest.raises(features.FeatureError, match="unknown feature 'median'"):
        features.statistics(whole_image_stats(image), ["median"])

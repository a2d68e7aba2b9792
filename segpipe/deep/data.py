"""Training data: image/annotation pairs from folders, or synthetic nuclei, as random patches.

Annotations become the three classes the networks learn (background,
interior, boundary). Images are normalised by their whole-image percentiles
(`segpipe.deep.postprocess`), exactly as inference will normalise them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from skimage.segmentation import find_boundaries

from segpipe import synthetic
from segpipe.deep import synth
from segpipe.deep.augment import Augmentation, random_augment
from segpipe.deep.postprocess import (
    BACKGROUND,
    BOUNDARY,
    CLASSES,
    INTERIOR,
    image_stats,
    normalise,
    percentile_range,
)
from segpipe.errors import InputNotFoundError, InputReadError, UnsupportedImageError
from segpipe.io.readers import SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, image_name

Batch = tuple[NDArray[np.float32], NDArray[np.int64]]

# Synthetic training images come from seeds at or above this; validation and tests use
# seeds below it, so no held-out image is ever seen in training.
TRAIN_SEED_MIN = 2**20
TRAIN_SEED_MAX = 2**31 - 1
# Each synthetic sample is cut from a canvas this many times the patch (at least 256 px a
# side in 2D): its percentiles stand in for those of the whole image inference would see.
CANVAS_MIN = {2: 256, 3: 48}
Generator = Literal["nuclei", "render"]
"""``nuclei``: `segpipe.deep.synth.nuclei` (varied, 2D); ``render``: `segpipe.synthetic.render`."""


class TrainingDataError(UnsupportedImageError):
    """A training image or annotation is missing, unpaired or unusable (the file is named)."""


class MissingPartnerError(TrainingDataError, InputNotFoundError):
    """An image without its annotation, or an annotation without its image."""


# -- annotations to classes ----------------------------------------------------------------


def classes_from_labels(labels: NDArray[np.integer]) -> NDArray[np.uint8]:
    """Background/interior/boundary classes from an instance (label) mask.

    A boundary pixel belongs to an object and touches (face connectivity)
    background or another object, so touching nuclei stay apart.

    Parameters
    ----------
    labels : (M, N[, P]) ndarray of int
        Object ids, 0 = background.

    Returns
    -------
    (M, N[, P]) ndarray of uint8
        0 background, 1 interior, 2 boundary.

    Examples
    --------
    >>> labels = np.zeros((5, 5), int); labels[1:4, 1:4] = 1
    >>> classes_from_labels(labels)[2]
    array([0, 2, 1, 2, 0], dtype=uint8)
    """
    labels = np.asarray(labels)
    out = np.full(labels.shape, BACKGROUND, np.uint8)
    out[labels != 0] = INTERIOR
    out[find_boundaries(labels, connectivity=1, mode="inner", background=0)] = BOUNDARY
    return out


def classes_from_onehot(stack: NDArray[Any], *, source: str = "annotation") -> NDArray[np.uint8]:
    """Classes from a one-hot stack with one channel per class, channel axis first.

    Parameters
    ----------
    stack : (3, M, N[, P]) ndarray
        Channel ``c`` is 1 where a pixel is of class ``c`` (0 background,
        1 interior, 2 boundary), else 0; bool, integer or float.
    source : str
        Named in errors.

    Raises
    ------
    TrainingDataError
        If there is not one channel per class, or a pixel is not of exactly one class.
    """
    stack = np.asarray(stack)
    if stack.shape[0] != len(CLASSES):
        raise TrainingDataError(
            f"{source}: a one-hot annotation needs {len(CLASSES)} channels "
            f"({', '.join(CLASSES)}) first, got shape {stack.shape}."
        )
    if stack.dtype.kind not in "biuf":
        raise TrainingDataError(f"{source}: unsupported one-hot dtype {stack.dtype}.")
    hot = stack.astype(np.float32)
    valid = np.isin(hot, (0.0, 1.0)).all(axis=0) & (hot.sum(axis=0) == 1)
    if not valid.all():
        raise TrainingDataError(
            f"{source}: not one-hot: {int(np.count_nonzero(~valid))} pixel(s) are not 1 in "
            "exactly one channel and 0 in the others."
        )
    return np.argmax(hot, axis=0).astype(np.uint8)


# -- reading folders -----------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(SUFFIXES)


def _read_array(path: Path) -> NDArray[Any]:
    """The whole stored array of a TIFF or Zarr (array, or an OME-Zarr image's level 0)."""
    name = str(path).lower().rstrip("/")
    try:
        if name.endswith(TIFF_SUFFIXES):
            import tifffile

            return np.asarray(tifffile.imread(path))
        if path.is_dir() or name.endswith(ZARR_SUFFIXES):
            import zarr

            node: Any = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Group):
                # an OME-Zarr image: its first (finest) multiscale level
                attrs: Any = dict(node.attrs.asdict())
                multiscales = attrs.get("ome", attrs).get("multiscales") or [{}]
                datasets = multiscales[0].get("datasets") or [{"path": "0"}]
                node = node[str(datasets[0]["path"])]
            return np.asarray(node[...])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputReadError(f"{path}: cannot read ({type(err).__name__}: {err}).") from err
    raise TrainingDataError(
        f"{path}: unsupported training file; expected TIFF ({', '.join(TIFF_SUFFIXES)}) "
        f"or Zarr ({', '.join(ZARR_SUFFIXES)})."
    )


def _drop_leading_ones(array: NDArray[Any], ndim: int) -> NDArray[Any]:
    while array.ndim > ndim and array.shape[0] == 1:
        array = array[0]
    return array


def paired_files(
    images: str | os.PathLike[str], annotations: str | os.PathLike[str], what: str
) -> tuple[dict[str, Path], dict[str, Path]]:
    """The files of two folders by stem, every image with its ``what`` (annotation,
    scribbles) and the reverse.

    Raises
    ------
    MissingPartnerError
        Naming the first file without a partner.
    """
    image_files = _listing(Path(images), "image")
    partner_files = _listing(Path(annotations), "annotation")
    for stem, path in image_files.items():
        if stem not in partner_files:
            raise MissingPartnerError(
                f"{path}: no {what} named {stem!r} in {annotations} (pairs match by name)."
            )
    for stem, path in partner_files.items():
        if stem not in image_files:
            raise MissingPartnerError(
                f"{path}: {what} without an image named {stem!r} in {images}."
            )
    return image_files, partner_files


def _listing(directory: Path, what: str) -> dict[str, Path]:
    if not directory.is_dir():
        raise InputNotFoundError(f"{directory}: {what} folder not found.")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not _is_image_file(path):
            continue
        stem = image_name(path)
        if stem in found:
            raise TrainingDataError(
                f"{path}: two {what} files share the name {stem!r} ({found[stem].name}); "
                "pairs are matched by name, so keep one."
            )
        found[stem] = path
    if not found:
        raise InputNotFoundError(f"{directory}: no {what} files (TIFF or Zarr) in this folder.")
    return found


def _image(path: Path, ndim: int) -> NDArray[np.float32]:
    data = _drop_leading_ones(_read_array(path), ndim)
    if data.dtype.kind not in "uif":
        raise TrainingDataError(
            f"{path}: unsupported image dtype {data.dtype}; expected integers or floats."
        )
    if data.ndim != ndim:
        raise TrainingDataError(
            f"{path}: expected a single-channel {ndim}D image, got shape {data.shape}."
        )
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise TrainingDataError(f"{path}: image holds NaN or infinite values.")
    return data.astype(np.float32)


def _annotation(path: Path, image_shape: tuple[int, ...], image_path: Path) -> NDArray[np.uint8]:
    ndim = len(image_shape)
    data = _drop_leading_ones(_read_array(path), ndim + 1)
    if data.ndim == ndim + 1 and data.shape[1:] == image_shape:
        return classes_from_onehot(data, source=str(path))
    data = _drop_leading_ones(data, ndim)
    if data.shape != image_shape:
        raise TrainingDataError(
            f"{path}: annotation shape {data.shape} does not match image {image_path.name} "
            f"{image_shape}; expected a label mask of {image_shape} or a one-hot stack "
            f"of {(len(CLASSES), *image_shape)}."
        )
    if data.dtype.kind not in "biu":
        raise TrainingDataError(
            f"{path}: a label mask must hold integer object ids, got dtype {data.dtype} "
            "(floats are refused: ids must be exact)."
        )
    return classes_from_labels(data)


@dataclass(frozen=True)
class Pair:
    """One training image (normalised float32) and its classes (uint8), same shape."""

    name: str
    image: NDArray[np.float32]
    classes: NDArray[np.uint8]


def read_pairs(
    images: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    *,
    ndim: int = 2,
    percentiles: tuple[float, float] = (1.0, 99.8),
) -> list[Pair]:
    """Load every image of a folder with its annotation (matched by file name stem).

    Parameters
    ----------
    images, annotations : str or PathLike
        Folders of TIFF or Zarr files; ``a.tif`` pairs with ``a.tif``, ``a.zarr``,
        ``a.ome.tif`` and so on. An annotation is an instance mask (integer ids)
        or a one-hot stack ``(3, *image.shape)`` (background, interior, boundary).
    ndim : int
        2 for planes, 3 for volumes.
    percentiles : tuple of float
        Low and high percentiles of each whole image mapped to 0 and 1.

    Raises
    ------
    MissingPartnerError
        An image without annotation or the reverse (the file is named).
    TrainingDataError
        Shape mismatch, wrong dtype, not one-hot (the file is named).
    """
    image_files, annotation_files = paired_files(images, annotations, "annotation")
    pairs = []
    for stem, path in image_files.items():
        raw = _image(path, ndim)
        classes = _annotation(annotation_files[stem], raw.shape, path)
        lo, hi = percentile_range(image_stats(raw), *percentiles)
        pairs.append(Pair(stem, normalise(raw, lo, hi), classes))
    present = np.zeros(len(CLASSES), bool)
    for pair in pairs:
        present[np.unique(pair.classes)] = True
    if not present.all():
        missing = ", ".join(repr(c) for c, seen in zip(CLASSES, present, strict=True) if not seen)
        raise TrainingDataError(
            f"{annotations}: no annotation holds {missing}; every class must appear "
            "somewhere (are the masks empty?)"
        )
    return pairs


# -- patches -------------------------------------------------------------------------------


def _augment(
    image: NDArray[np.float32], classes: NDArray[np.uint8], rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """Random flips along every axis (and a transpose of rows and columns)."""
    for axis in range(image.ndim):
        if rng.random() < 0.5:
            image, classes = np.flip(image, axis), np.flip(classes, axis)
    if image.shape[-1] == image.shape[-2] and rng.random() < 0.5:
        image, classes = np.swapaxes(image, -1, -2), np.swapaxes(classes, -1, -2)
    return image, classes


def _crop(
    image: NDArray[np.float32],
    classes: NDArray[np.uint8],
    patch: Sequence[int],
    rng: np.random.Generator,
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """A random ``patch`` of the pair; images smaller than it are mirrored to fit."""
    short = [max(p - n, 0) for p, n in zip(patch, image.shape, strict=True)]
    if any(short):
        pad = [(0, s) for s in short]
        image, classes = np.pad(image, pad, mode="symmetric"), np.pad(classes, pad, "symmetric")
    starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(image.shape, patch, strict=True)]
    region = tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
    return image[region], classes[region]


def _stack(samples: Sequence[tuple[NDArray[np.float32], NDArray[np.uint8]]]) -> Batch:
    x = np.stack([np.ascontiguousarray(s[0]) for s in samples])[:, None]
    y = np.stack([np.ascontiguousarray(s[1]) for s in samples]).astype(np.int64)
    return x.astype(np.float32), y


class Source(Protocol):
    """Where training patches come from."""

    def batch(self, rng: np.random.Generator, patch: Sequence[int], size: int) -> Batch:
        """``size`` random patches: images ``(size, 1, *patch)`` and classes ``(size, *patch)``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the data are, for the model card."""
        ...


@dataclass(frozen=True)
class FolderSource:
    """Random crops of image/annotation pairs, each pair equally likely."""

    pairs: tuple[Pair, ...]
    images: str
    annotations: str
    augment: Augmentation | None = None
    """Random zoom, turns, elastic and intensity changes (`segpipe.deep.augment`); None:
    random crops, flips and transposes only."""

    def batch(self, rng: np.random.Generator, patch: Sequence[int], size: int) -> Batch:
        samples = []
        for _ in range(size):
            pair = self.pairs[int(rng.integers(len(self.pairs)))]
            if self.augment is None:
                samples.append(_augment(*_crop(pair.image, pair.classes, patch, rng), rng))
            else:
                x, classes = random_augment(
                    pair.image, pair.classes, rng, shape=patch, options=self.augment
                )
                samples.append((x, classes.astype(np.uint8, copy=False)))
        return _stack(samples)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "folder",
            "images": self.images,
            "annotations": self.annotations,
            "pairs": [p.name for p in self.pairs],
            "pixels": int(sum(p.image.size for p in self.pairs)),
            "augmentation": None if self.augment is None else asdict(self.augment),
        }


@dataclass(frozen=True)
class SyntheticSource:
    """Fresh synthetic nuclei every step (training seeds only).

    With the ``nuclei`` generator each image is drawn in a new `segpipe.deep.synth.Style`
    from ``ranges`` and gives two patches; with ``render``, one patch per image.
    """

    ndim: int = 2
    density: float = 0.7
    noise: float = 0.05
    percentiles: tuple[float, float] = (1.0, 99.8)
    generator: Generator = "render"
    augment: Augmentation | None = None
    """Random zoom, turns, elastic and intensity changes; None: crops and flips only."""
    ranges: synth.StyleRanges = field(default_factory=lambda: synth.TRAIN)

    def _image(
        self, rng: np.random.Generator, patch: Sequence[int]
    ) -> tuple[NDArray[np.float32], NDArray[np.uint32]]:
        """A new normalised canvas and its instances."""
        canvas = [max(2 * p, CANVAS_MIN[self.ndim]) for p in patch]
        seed = int(rng.integers(TRAIN_SEED_MIN, TRAIN_SEED_MAX))
        if self.generator == "nuclei":
            raw, labels = synth.nuclei(canvas, seed=seed, ranges=self.ranges)
        else:
            # anywhere in a large plane: the noise and the nuclei both depend on the offset
            origin = [int(rng.integers(0, 1 << 14)) for _ in canvas]
            region = tuple(slice(o, o + n) for o, n in zip(origin, canvas, strict=True))
            raw, labels = synthetic.render(
                region, seed=seed, density=self.density, noise=self.noise
            )
        lo, hi = percentile_range(image_stats(raw), *self.percentiles)
        return normalise(raw, lo, hi), labels

    def sample(
        self, rng: np.random.Generator, patch: Sequence[int]
    ) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
        """One normalised patch and its classes from a new random image."""
        return self._samples(rng, patch, 1)[0]

    def _samples(
        self, rng: np.random.Generator, patch: Sequence[int], count: int
    ) -> list[tuple[NDArray[np.float32], NDArray[np.uint8]]]:
        image, labels = self._image(rng, patch)
        if self.augment is None:
            return [
                _augment(*_crop(image, classes_from_labels(labels), patch, rng), rng)
                for _ in range(count)
            ]
        out = []
        for _ in range(count):
            x, lab = random_augment(image, labels, rng, shape=patch, options=self.augment)
            # classes after the warp: a boundary one pixel wide at the network's scale
            out.append((x, classes_from_labels(lab)))
        return out

    def batch(self, rng: np.random.Generator, patch: Sequence[int], size: int) -> Batch:
        per_image = 2 if self.generator == "nuclei" else 1
        samples: list[tuple[NDArray[np.float32], NDArray[np.uint8]]] = []
        while len(samples) < size:
            samples += self._samples(rng, patch, min(per_image, size - len(samples)))
        return _stack(samples)

    def describe(self) -> dict[str, Any]:
        seeds = f"random in [{TRAIN_SEED_MIN}, {TRAIN_SEED_MAX}), a new image per patch"
        out: dict[str, Any] = {"kind": "synthetic"}
        if self.generator == "nuclei":
            out |= {
                "generator": "segpipe.deep.synth.nuclei",
                "ndim": self.ndim,
                "ranges": asdict(self.ranges),
                "seeds": seeds.replace("per patch", "per two patches"),
            }
        else:
            out |= {
                "generator": "segpipe.synthetic.render",
                "ndim": self.ndim,
                "density": self.density,
                "noise": self.noise,
                "seeds": seeds,
            }
        if self.augment is not None:
            out["augmentation"] = asdict(self.augment)
        return out


def class_frequencies(
    source: Source, rng: np.random.Generator, patch: Sequence[int]
) -> list[float]:
    """Fraction of pixels of each class in 32 random patches."""
    _, y = source.batch(rng, patch, 32)
    counts = np.bincount(y.ravel(), minlength=len(CLASSES)).astype(np.float64)
    return (counts / counts.sum()).tolist()

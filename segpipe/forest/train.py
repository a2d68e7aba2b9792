"""Train a random forest on the feature bank from sparse scribbles, with its model card.

Training images are read whole (or rendered: ``data="synthetic"``), normalised by their
whole-image percentiles as the pipeline's statistics give them, and their features
computed by `segpipe.features.compute`, the code blocks run; only the scribbled pixels
(annotation > 0) are kept. scikit-learn's ``RandomForestClassifier`` (bootstrap,
out-of-bag scores) is fitted on them and written as node arrays (`segpipe.forest.model`).
The card records the data, options, out-of-bag scores, held-out scores on synthetic
images when trained on synthetic ones, the most used features, versions and the command.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from segpipe import features, synthetic
from segpipe.deep.data import (
    TRAIN_SEED_MIN,
    TrainingDataError,
    _drop_leading_ones,
    _image,
    _read_array,
    paired_files,
)
from segpipe.deep.postprocess import image_stats, normalise, percentile_range
from segpipe.errors import ConfigError
from segpipe.forest import model as forest_model
from segpipe.forest.model import ClassEntry, ForestMeta, ForestModel
from segpipe.forest.predict import predict
from segpipe.forest.scribbles import strokes

__all__ = [
    "DEFAULT_CLASSES",
    "VAL_SEED0",
    "ForestTrainConfig",
    "ForestTrainResult",
    "Scribbled",
    "card_markdown",
    "classify_image",
    "command_line",
    "feature_stack",
    "normalised",
    "parse_classes",
    "read_scribbled",
    "synthetic_scribbled",
    "train_forest",
]

DEFAULT_CLASSES = [
    ClassEntry(id=1, name="background", thing=False),
    ClassEntry(id=2, name="foreground", thing=True),
]
VAL_SEED0 = 10_000
"""Held-out synthetic image ``i`` has seed ``VAL_SEED0 + i``; training ones are drawn at or
above ``TRAIN_SEED_MIN``, so none is ever trained on."""


class ForestTrainConfig(BaseModel):
    """What ``segpipe train --arch forest`` does."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    data: str = "synthetic"
    """A folder of TIFF/Zarr images, or ``synthetic`` (nuclei with drawn scribbles)."""
    annotations: str | None = None
    """A folder of scribbles paired by file name: 0 unlabelled, k > 0 class k."""
    out: str = "forest.npz"
    classes: list[ClassEntry] = Field(default_factory=lambda: list(DEFAULT_CLASSES))
    """The catalogue; ids from 1 (0 marks unlabelled pixels)."""
    features: list[str] = Field(default_factory=lambda: features.default_features(2))
    """Feature names (and statistics) of the bank, in column order."""
    trees: int = Field(100, ge=1, le=2000)
    max_depth: int | None = Field(12, ge=1, le=64)
    min_samples_leaf: int = Field(1, ge=1)
    normalise: tuple[float, float] | None = (1.0, 99.8)
    """Percentiles of each whole image mapped to 0 and 1; None: raw intensities."""
    seed: int = Field(0, ge=0)
    ndim: int = Field(2, ge=2, le=3)
    images: int = Field(2, ge=1)
    """Synthetic training images (``data="synthetic"``)."""
    size: int = Field(512, ge=32)
    """Edge of each synthetic training image."""
    fraction: float = Field(0.02, gt=0, le=1)
    """Share of each synthetic image scribbled."""
    val_images: int = Field(2, ge=0)
    """Held-out synthetic images scored at the end (``data="synthetic"`` only)."""
    val_size: int = Field(512, ge=32)
    jobs: int = Field(1, ge=1)
    """Threads fitting trees (the model is the same for any number)."""

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[ClassEntry]) -> list[ClassEntry]:
        if len(v) < 2:
            raise ValueError("expected at least two classes")
        for attr in ("id", "name"):
            values = [getattr(c, attr) for c in v]
            if len(set(values)) != len(values):
                raise ValueError(f"class {attr}s must be unique, got {values}")
        return sorted(v, key=lambda c: c.id)

    @field_validator("normalise")
    @classmethod
    def _percentiles(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"expected percentiles 0 <= low < high <= 100, got {v}")
        return v


@dataclass(frozen=True)
class Scribbled:
    """A training image (float32, as read), its scribbles and, for synthetic ones, truth."""

    name: str
    image: NDArray[np.float32]
    scribbles: NDArray[np.uint8]
    truth: NDArray[np.uint8] | None = None


@dataclass(frozen=True)
class ForestTrainResult:
    model: ForestModel
    path: Path
    card_path: Path


def parse_classes(text: str) -> list[ClassEntry]:
    """The catalogue from ``--classes``: YAML or JSON as run.yaml's ``classes:``
    (``[{id, name, thing}]``, ids from 1), class names (ids 1, 2, ...; the first stuff,
    the others things), or a YAML file holding either (or a run.yaml with ``classes:``).

    Raises
    ------
    ConfigError
        Saying what is wrong.

    Examples
    --------
    >>> [(c.id, c.name, c.thing) for c in parse_classes("[background, nucleus, debris]")]
    [(1, 'background', False), (2, 'nucleus', True), (3, 'debris', True)]
    """
    import yaml
    from pydantic import TypeAdapter, ValidationError

    source = "--classes"
    path = Path(text).expanduser()
    try:
        if path.is_file():
            source = f"--classes {path}"
            value = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            value = yaml.safe_load(text)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source}: not readable as YAML ({err}).") from err
    if isinstance(value, dict) and "classes" in value:
        value = value["classes"]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = [{"id": i + 1, "name": n, "thing": i > 0} for i, n in enumerate(value)]
    if not isinstance(value, list):
        raise ConfigError(
            f"{source}: expected a list such as [{{id: 1, name: background, thing: false}}, "
            f"{{id: 2, name: nucleus, thing: true}}] or [background, nucleus], got {value!r}."
        )
    try:
        entries = TypeAdapter(list[ClassEntry]).validate_python(value)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise ConfigError(
            f"{source}: {where}: {e['msg']} (ids from 1: 0 marks unlabelled pixels)."
        ) from err
    return entries


# -- data ----------------------------------------------------------------------------------


def truth_classes(labels: NDArray[np.integer]) -> NDArray[np.uint8]:
    """Classes 1 (background) and 2 (nucleus) of a synthetic label image."""
    out: NDArray[np.uint8] = np.where(labels > 0, 2, 1).astype(np.uint8)
    return out


def synthetic_scribbled(
    n: int, shape: Sequence[int], *, seed: int, fraction: float, seed0: int | None = None
) -> list[Scribbled]:
    """``n`` synthetic nuclei images with strokes over ``fraction`` of each (1 background,
    2 nucleus); seeds from ``seed0`` (default: drawn from ``seed`` above every held-out
    seed)."""
    rng = np.random.default_rng(seed)
    first = int(rng.integers(TRAIN_SEED_MIN, 2**31 - n)) if seed0 is None else seed0
    out = []
    for i in range(n):
        image, labels = synthetic.render(tuple(slice(0, s) for s in shape), seed=first + i)
        truth = truth_classes(labels)
        marks = strokes(truth, fraction=fraction, seed=seed * 1000 + i)
        out.append(Scribbled(f"synthetic-{first + i}", image.astype(np.float32), marks, truth))
    return out


def read_scribbled(
    images: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    *,
    ndim: int,
    classes: Sequence[ClassEntry],
) -> list[Scribbled]:
    """Every image of a folder with its scribbles (matched by name).

    Raises
    ------
    MissingPartnerError
        An image without scribbles or the reverse (the file is named).
    TrainingDataError
        A shape mismatch, floats, a value outside the catalogue, or no scribble at all.
    """
    image_files, scribble_files = paired_files(images, annotations, "scribbles")
    known = {c.id for c in classes}
    out = []
    for stem, path in image_files.items():
        image = _image(path, ndim)
        spath = scribble_files[stem]
        marks = _drop_leading_ones(_read_array(spath), ndim)
        if marks.shape != image.shape:
            raise TrainingDataError(
                f"{spath}: scribbles of shape {marks.shape} do not match image {path.name} "
                f"{image.shape}."
            )
        if marks.dtype.kind not in "biu":
            raise TrainingDataError(
                f"{spath}: scribbles must hold integer class ids (0 unlabelled), got "
                f"dtype {marks.dtype}."
            )
        values = {int(v) for v in np.unique(marks)} - {0}
        if not values <= known:
            raise TrainingDataError(
                f"{spath}: values {sorted(values - known)} are not classes of the catalogue "
                f"({', '.join(f'{c.id} {c.name}' for c in classes)}); give --classes."
            )
        out.append(Scribbled(stem, image, marks.astype(np.uint8)))
    return out


# -- training ------------------------------------------------------------------------------


def _bank(config: ForestTrainConfig) -> list[features.Feature | str]:
    try:
        bank: list[features.Feature | str] = []
        plain = [n for n in config.features if not features.is_statistic(n)]
        parsed = iter(features.parse_features(plain, ndim=config.ndim))
        for name in config.features:
            bank.append(name if features.is_statistic(name) else next(parsed))
        return bank
    except features.FeatureError as err:
        raise ConfigError(f"--features: {err}.") from err


def feature_stack(
    image: NDArray[np.float32],
    bank: Sequence[features.Feature | str],
    normalise_to: tuple[float, float] | None,
) -> NDArray[np.float32]:
    """The features of a whole image as a run computes them block by block: statistics
    from the same histogram, the same normalisation, the same feature code."""
    stats = image_stats(image)
    names = [f for f in bank if isinstance(f, str)]
    constants = features.statistics(stats, names)
    data = image
    if normalise_to is not None:
        lo, hi = percentile_range(stats, *normalise_to)
        data = normalise(image, lo, hi)
        constants = normalised(constants, lo, hi)
    return features.compute(data, bank, constants=constants)


def normalised(constants: dict[str, float], lo: float, hi: float) -> dict[str, float]:
    """Statistics mapped as the image is (`segpipe.deep.postprocess.normalise`)."""
    return {k: float(normalise(np.asarray(v, np.float32), lo, hi)) for k, v in constants.items()}


def classify_image(model: ForestModel, image: NDArray[Any]) -> NDArray[np.uint8]:
    """Classes of a whole in-memory image (what a run gives, in one block)."""
    x = feature_stack(np.asarray(image, np.float32), model.bank, model.meta.normalise)
    return predict(model, x)


def command_line(config: ForestTrainConfig) -> str:
    """The ``segpipe train`` command that reproduces ``config``."""
    args = ["segpipe", "train", "--arch", "forest", "--ndim", str(config.ndim)]
    args += ["--data", config.data]
    if config.annotations is not None:
        args += ["--annotations", config.annotations]
    args += ["--classes", json.dumps([c.model_dump() for c in config.classes])]
    args += ["--features", ",".join(config.features), "--trees", str(config.trees)]
    args += ["--max-depth", str(config.max_depth or 0), "--seed", str(config.seed)]
    if config.normalise is not None:
        args += ["--normalise", ",".join(f"{p:g}" for p in config.normalise)]
    else:
        args += ["--normalise", "none"]
    args += ["--val-images", str(config.val_images), "--val-size", str(config.val_size)]
    args += ["--out", config.out]
    return shlex.join(args)


def _iou(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def train_forest(config: ForestTrainConfig, *, command: str | None = None) -> ForestTrainResult:
    """Fit a forest on the scribbled pixels and write it with its model card.

    Raises
    ------
    ConfigError
        Inconsistent options (annotations without images, a bad feature name).
    TrainingDataError, InputNotFoundError, InputReadError
        Bad or unpaired training files (named), or a class without any scribble.
    """
    from sklearn.ensemble import RandomForestClassifier

    t0 = time.perf_counter()
    bank = _bank(config)
    if config.data == "synthetic":
        if config.annotations is not None:
            raise ConfigError("--annotations goes with a folder of images, not --data synthetic.")
        if config.ndim != 2:
            raise ConfigError("--data synthetic trains planes: use --ndim 2, or give folders.")
        shape = (config.size,) * config.ndim
        data = synthetic_scribbled(config.images, shape, seed=config.seed, fraction=config.fraction)
        described: dict[str, Any] = {
            "synthetic": {
                "images": config.images,
                "shape": list(shape),
                "names": [d.name for d in data],
                "scribbled": config.fraction,
                "generator": "segpipe.synthetic.render, segpipe.forest.scribbles.strokes",
            }
        }
    else:
        if config.annotations is None:
            raise ConfigError("--data IMAGES needs --annotations SCRIBBLES (paired by name).")
        data = read_scribbled(
            config.data, config.annotations, ndim=config.ndim, classes=config.classes
        )
        described = {
            "images": os.path.abspath(config.data),
            "annotations": os.path.abspath(config.annotations),
            "names": [d.name for d in data],
        }
    xs, ys = [], []
    for d in data:
        stack = feature_stack(d.image, bank, config.normalise)
        marked = d.scribbles > 0
        xs.append(stack[:, marked].T)
        ys.append(d.scribbles[marked])
    x = np.ascontiguousarray(np.concatenate(xs), np.float32)
    y = np.concatenate(ys)
    counts = {int(k): int(v) for k, v in zip(*np.unique(y, return_counts=True), strict=True)}
    missing = [c for c in config.classes if c.id not in counts]
    if missing:
        raise TrainingDataError(
            "no scribbled pixels of class "
            + ", ".join(f"{c.id} ({c.name})" for c in missing)
            + "; every class of the catalogue needs some (or leave it out of --classes)."
        )
    total = sum(int(d.scribbles.size) for d in data)
    classifier = RandomForestClassifier(
        n_estimators=config.trees,
        max_depth=config.max_depth,
        min_samples_leaf=config.min_samples_leaf,
        bootstrap=True,
        oob_score=True,
        random_state=config.seed,
        n_jobs=config.jobs,
    )
    classifier.fit(x, y)
    ids = [int(c) for c in classifier.classes_]
    card: dict[str, Any] = {
        "command": command or command_line(config),
        "config": config.model_dump(mode="json"),
        "data": described,
        "scribbled_pixels": {str(k): v for k, v in counts.items()},
        "scribbled_fraction": len(y) / total,
        "oob": _oob_scores(classifier, y, config.classes),
        "importance": _importance(classifier, config.features),
        "trees": config.trees,
        "nodes": int(sum(e.tree_.node_count for e in classifier.estimators_)),
        "max_depth_reached": int(max(e.tree_.max_depth for e in classifier.estimators_)),
        "scikit-learn": version("scikit-learn"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    meta = ForestMeta(
        features=list(config.features),
        classes=ids,
        catalogue=list(config.classes),
        ndim=config.ndim,
        normalise=config.normalise,
        card=card,
    )
    model = forest_model.from_sklearn(classifier, meta)
    if config.data == "synthetic" and config.val_images:
        card["validation"] = _validate(model, config)
    card["seconds"] = round(time.perf_counter() - t0, 2)
    card["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    model = ForestModel(**model.arrays(), meta=meta.model_copy(update={"card": card}))
    out = Path(config.out).expanduser().absolute()
    path = forest_model.save(out, model)
    card_file = forest_model.card_path(out)
    tmp = card_file.with_name(card_file.name + ".tmp")
    tmp.write_text(card_markdown(out.name, model.meta), encoding="utf-8")
    tmp.replace(card_file)
    return ForestTrainResult(model, path, card_file)


def _oob_scores(classifier: Any, y: NDArray[Any], classes: Sequence[ClassEntry]) -> dict[str, Any]:
    decision = np.asarray(classifier.oob_decision_function_)
    seen = ~np.isnan(decision).any(axis=1) & (decision.sum(axis=1) > 0)
    pred = classifier.classes_[np.argmax(np.nan_to_num(decision), axis=1)]
    y, pred = y[seen], pred[seen]
    per_class = {}
    for c in classes:
        truth, got = y == c.id, pred == c.id
        tp = int(np.count_nonzero(truth & got))
        per_class[c.name] = {
            "recall": tp / max(int(truth.sum()), 1),
            "precision": tp / max(int(got.sum()), 1),
            "iou": _iou(truth, got),
        }
    return {
        "accuracy": float(np.mean(y == pred)) if len(y) else None,
        "pixels": int(seen.sum()),
        "classes": per_class,
    }


def _importance(classifier: Any, names: Sequence[str]) -> list[list[Any]]:
    order = np.argsort(classifier.feature_importances_)[::-1][:10]
    return [[names[i], round(float(classifier.feature_importances_[i]), 4)] for i in order]


def _validate(model: ForestModel, config: ForestTrainConfig) -> dict[str, Any]:
    shape = (config.val_size,) * config.ndim
    ious, accuracy = [], []
    for i in range(config.val_images):
        image, labels = synthetic.render(tuple(slice(0, s) for s in shape), seed=VAL_SEED0 + i)
        truth = truth_classes(labels)
        got = classify_image(model, image)
        ious.append(_iou(got == 2, truth == 2))
        accuracy.append(float(np.mean(got == truth)))
    return {
        "images": config.val_images,
        "shape": list(shape),
        "seeds": [VAL_SEED0, VAL_SEED0 + config.val_images - 1],
        "foreground_iou": ious,
        "accuracy": accuracy,
    }


# -- the model card ------------------------------------------------------------------------


def card_markdown(name: str, meta: ForestMeta) -> str:
    """The human-readable model card."""
    card = meta.card
    cfg = card["config"]
    classes = ", ".join(
        f"{c.id} {c.name} ({'thing' if c.thing else 'stuff'})" for c in meta.catalogue
    )
    norm = (
        f"each whole image mapped from its {meta.normalise[0]:g}–{meta.normalise[1]:g} "
        "percentiles to 0–1"
        if meta.normalise
        else "raw intensities"
    )
    oob = card["oob"]
    lines = [
        f"# {name}: random forest pixel classifier ({meta.ndim}D)",
        "",
        f"Classes: {classes}. Instances are connected regions of one thing class.",
        "",
        "## Training",
        "",
        f"- command: `{card['command']}`",
        f"- data: {json.dumps(card['data'])}",
        f"- scribbled pixels per class: {json.dumps(card['scribbled_pixels'])} "
        f"({card['scribbled_fraction']:.2%} of all pixels)",
        f"- features ({len(meta.features)}): {', '.join(meta.features)}",
        f"- input: {norm}",
        f"- scikit-learn RandomForestClassifier: {cfg['trees']} trees, max depth "
        f"{cfg['max_depth']}, min samples per leaf {cfg['min_samples_leaf']}, bootstrap, "
        f"seed {cfg['seed']}; {card['nodes']} nodes, deepest leaf at {card['max_depth_reached']}",
        f"- time: {card['seconds']:.1f} s; scikit-learn {card['scikit-learn']}, numpy "
        f"{card['numpy']}, Python {card['python']}; finished {card['finished']}",
        "",
        "## Out-of-bag scores",
        "",
        "Each scribbled pixel classified by the trees that did not see it in training "
        f"({oob['pixels']} pixels): accuracy "
        + ("–" if oob["accuracy"] is None else f"{oob['accuracy']:.4f}")
        + ".",
        "",
        "| class | recall | precision | IoU |",
        "|---|---|---|---|",
    ]
    for cname, s in oob["classes"].items():
        lines.append(f"| {cname} | {s['recall']:.4f} | {s['precision']:.4f} | {s['iou']:.4f} |")
    val = card.get("validation")
    if val:
        lines += [
            "",
            "## Held-out images",
            "",
            f"{val['images']} synthetic images of {'×'.join(map(str, val['shape']))} px "
            f"(seeds {val['seeds'][0]}–{val['seeds'][1]}, never trained on), every pixel "
            "scored against the ground truth:",
            "",
            "| image | foreground IoU | accuracy |",
            "|---|---|---|",
        ]
        for i, (iou, acc) in enumerate(zip(val["foreground_iou"], val["accuracy"], strict=True)):
            lines.append(f"| {val['seeds'][0] + i} | {iou:.4f} | {acc:.4f} |")
    lines += [
        "",
        "## Most used features",
        "",
        ", ".join(f"{n} ({v:.3f})" for n, v in card["importance"]),
        "",
        "## Use",
        "",
        f"`segpipe run -s forest --set model={name}`; images like those it was trained on.",
        "",
    ]
    return "\n".join(lines)

"""A trained forest as plain arrays in an ``.npz`` (no pickle), with what it needs to run.

The file holds the trees' node arrays (feature, threshold, children, class fractions per
node; trees concatenated, ``roots`` giving each tree's first node) and ``meta``, UTF-8
JSON as bytes: the feature names in column order, the catalogue, the input
normalisation and the model card. It is read with ``np.load(allow_pickle=False)`` and
every index is checked before use, so a crafted file can neither run code nor send the
traversal out of its arrays or into a loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segpipe import features
from segpipe.errors import ModelFileError
from segpipe.io.models import model_file

__all__ = [
    "FORMAT",
    "MAX_RADIUS",
    "ClassEntry",
    "ForestMeta",
    "ForestModel",
    "card_path",
    "from_sklearn",
    "load",
    "load_cached",
    "save",
    "sha256",
]

FORMAT = "segpipe-forest/1"
MAX_RADIUS = 1024
"""Widest feature context a model may ask for, per side (σ 256)."""
ARRAYS = {
    "feature": np.int32,
    "threshold": np.float64,
    "left": np.int32,
    "right": np.int32,
    "value": np.float64,
    "roots": np.int64,
}


class ClassEntry(BaseModel):
    """One class of the model's catalogue (ids from 1: 0 marks unlabelled pixels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: int = Field(ge=1, le=255)
    name: str = Field(min_length=1)
    thing: bool


class ForestMeta(BaseModel):
    """The JSON part of a forest file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: str = FORMAT
    features: list[str]
    """Column order of the feature matrix: feature names and statistics."""
    classes: list[int]
    """Class ids of the trees' outputs, in order (scikit-learn's ``classes_``)."""
    catalogue: list[ClassEntry]
    """Every class: id, name, thing or stuff."""
    ndim: int = Field(ge=2, le=3)
    """Axes of the images it was trained on."""
    normalise: tuple[float, float] | None = (1.0, 99.8)
    """Percentiles of the whole image mapped to 0 and 1 before the features; None: raw."""
    card: dict[str, Any] = Field(default_factory=dict)
    """Model card: data, options, scores, versions, command."""


@dataclass(frozen=True)
class ForestModel:
    """A forest's trees as node arrays, and its `ForestMeta`.

    ``feature[i]``/``threshold[i]`` split node ``i`` (``x <= threshold`` goes ``left``);
    a leaf has ``left == right == -1``; ``value[i]`` holds the class fractions of node
    ``i``; tree ``t`` is nodes ``roots[t]:roots[t + 1]``, its root first.
    """

    feature: NDArray[np.int32]
    threshold: NDArray[np.float64]
    left: NDArray[np.int32]
    right: NDArray[np.int32]
    value: NDArray[np.float64]
    roots: NDArray[np.int64]
    meta: ForestMeta
    path: Path | None = field(default=None, compare=False)

    @property
    def n_trees(self) -> int:
        return len(self.roots) - 1

    @property
    def bank(self) -> list[features.Feature | str]:
        """The feature columns as `segpipe.features.compute` takes them."""
        return [
            name if features.is_statistic(name) else features.parse_feature(name, ndim=3)
            for name in self.meta.features
        ]

    @property
    def statistics(self) -> list[str]:
        """Names of the whole-image statistics among the features."""
        return [n for n in self.meta.features if features.is_statistic(n)]

    def proba_table(self) -> NDArray[np.float64]:
        """Each node's class fractions divided by their sum, as scikit-learn's trees
        normalise a leaf's ``value`` in ``predict_proba`` (a sum of 0 divides by 1)."""
        total = self.value.sum(axis=1)[:, np.newaxis]
        total[total == 0.0] = 1.0
        out: NDArray[np.float64] = self.value / total
        return out

    def arrays(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ARRAYS}


def card_path(path: str | os.PathLike[str]) -> Path:
    """The Markdown model card beside a model: ``forest.npz`` → ``forest.md``."""
    return Path(path).with_suffix(".md")


def from_sklearn(classifier: Any, meta: ForestMeta) -> ForestModel:
    """The node arrays of a fitted scikit-learn ``RandomForestClassifier``."""
    trees = [e.tree_ for e in classifier.estimators_]
    sizes = [t.node_count for t in trees]
    roots = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parts: dict[str, list[NDArray[Any]]] = {k: [] for k in ARRAYS if k != "roots"}
    for t, start in zip(trees, roots[:-1], strict=True):
        inner = t.children_left >= 0
        parts["feature"].append(np.where(inner, t.feature, -1))
        parts["threshold"].append(np.where(inner, t.threshold, 0.0))
        parts["left"].append(np.where(inner, t.children_left + start, -1))
        parts["right"].append(np.where(inner, t.children_right + start, -1))
        parts["value"].append(t.value[:, 0, :])
    arrays: dict[str, Any] = {
        k: np.ascontiguousarray(np.concatenate(v), ARRAYS[k]) for k, v in parts.items()
    }
    model = ForestModel(**arrays, roots=roots, meta=meta)
    _check(model, Path("<in memory>"))
    return model


def save(path: str | os.PathLike[str], model: ForestModel) -> Path:
    """Write ``model`` to ``path`` (``.npz``) atomically; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    meta = json.dumps(model.meta.model_dump(mode="json"), sort_keys=True).encode()
    with tmp.open("wb") as f:
        arrays: dict[str, Any] = {"meta": np.frombuffer(meta, np.uint8), **model.arrays()}
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(p)
    return p


def sha256(path: str | os.PathLike[str]) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(path: str | os.PathLike[str]) -> ForestModel:
    """Read and check a forest file, never executing anything from it.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    ModelFileError
        If it is empty, not an ``.npz``, holds pickled objects (refused, not loaded),
        lacks an array, or its arrays or metadata are inconsistent. Naming the file.
    """
    p = model_file(path, "forest model")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: forest model file is empty (0 bytes).")
    try:
        with np.load(p, allow_pickle=False) as data:
            loaded = {k: data[k] for k in ("meta", *ARRAYS) if k in data.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ModelFileError(
                f"{p}: refused: the file holds pickled objects (code could run on load); "
                "a forest file holds plain arrays only."
            ) from err
        raise ModelFileError(f"{p}: not a readable forest file ({err}).") from err
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as err:
        raise ModelFileError(f"{p}: not a readable forest file ({err}).") from err
    missing = [k for k in ("meta", *ARRAYS) if k not in loaded]
    if missing:
        raise ModelFileError(
            f"{p}: not a segpipe forest (no {', '.join(missing)}); train one with "
            "`segpipe train --arch forest`."
        )
    meta_bytes = loaded.pop("meta")
    if meta_bytes.dtype != np.uint8 or meta_bytes.ndim != 1:
        raise ModelFileError(f"{p}: meta: expected UTF-8 JSON bytes, got {meta_bytes.dtype}.")
    try:
        meta = ForestMeta.model_validate(json.loads(meta_bytes.tobytes().decode()))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{p}: meta is not JSON ({err}).") from err
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise ModelFileError(f"{p}: meta.{where}: {e['msg']}.") from err
    arrays: dict[str, Any] = {}
    for name, dtype in ARRAYS.items():
        a = loaded[name]
        if a.dtype != np.dtype(dtype):
            raise ModelFileError(f"{p}: {name}: expected {np.dtype(dtype)}, got {a.dtype}.")
        arrays[name] = np.ascontiguousarray(a)
    model = ForestModel(**arrays, meta=meta, path=p)
    _check(model, p)
    return model


def _check(model: ForestModel, p: Path) -> None:
    """Refuse arrays that do not describe trees the traversal can walk safely."""
    meta = model.meta
    if meta.format != FORMAT:
        raise ModelFileError(f"{p}: format {meta.format!r}; this segpipe reads {FORMAT!r}.")
    try:
        bank = features.parse_features([n for n in meta.features if not features.is_statistic(n)])
    except features.FeatureError as err:
        raise ModelFileError(f"{p}: meta.features: {err}.") from err
    wide = [f.name for f in bank if f.radius() > MAX_RADIUS]
    if wide:
        raise ModelFileError(
            f"{p}: meta.features: {wide[0]} reads more than {MAX_RADIUS} px per side."
        )
    ids = [c.id for c in meta.catalogue]
    if len(set(ids)) != len(ids) or len({c.name for c in meta.catalogue}) != len(ids):
        raise ModelFileError(f"{p}: meta.catalogue: class ids and names must be unique.")
    if not meta.classes or not set(meta.classes) <= set(ids):
        raise ModelFileError(f"{p}: meta.classes {meta.classes} are not all in the catalogue.")
    n = len(model.feature)
    roots = model.roots
    value = model.value
    if any(len(getattr(model, k)) != n for k in ("threshold", "left", "right")) or (
        value.ndim != 2 or value.shape != (n, len(meta.classes))
    ):
        raise ModelFileError(
            f"{p}: node arrays of different lengths, or value not (nodes, classes)."
        )
    if roots.ndim != 1 or len(roots) < 2 or roots[0] != 0 or roots[-1] != n:
        raise ModelFileError(f"{p}: roots must run from 0 to the number of nodes ({n}).")
    if np.any(np.diff(roots) < 1):
        raise ModelFileError(f"{p}: roots must increase (each tree holds a node).")
    tree_end = np.repeat(roots[1:], np.diff(roots))
    node = np.arange(n)
    leaf = model.left == -1
    inner = ~leaf
    if np.any(leaf & (model.right != -1)):
        raise ModelFileError(f"{p}: a leaf (left = -1) must have right = -1.")
    # children after their parent and inside its tree: every walk ends at a leaf
    for child in (model.left, model.right):
        if np.any(inner & ((child <= node) | (child >= tree_end))):
            raise ModelFileError(f"{p}: a node's child lies outside its tree or before it.")
    if np.any(inner & ((model.feature < 0) | (model.feature >= len(meta.features)))):
        raise ModelFileError(f"{p}: a split reads a feature the model does not list.")
    if not np.all(np.isfinite(model.threshold)) or not np.all(np.isfinite(value)):
        raise ModelFileError(f"{p}: thresholds and values must be finite.")
    if np.any(value < 0):
        raise ModelFileError(f"{p}: class fractions must be >= 0.")


@lru_cache(maxsize=4)
def load_cached(path: str, digest: str) -> ForestModel:
    """`load` once per process (each worker keeps the model); refuses a file whose
    SHA-256 is no longer ``digest`` (replaced after the run was planned)."""
    now = sha256(path)
    if now != digest:
        raise ModelFileError(
            f"{path}: the model file changed since the run began (SHA-256 {now[:12]}, "
            f"expected {digest[:12]}); start the run again."
        )
    return load(path)

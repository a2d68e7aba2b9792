"""Panoptic labels: the class catalogue, ``class * divisor + instance`` encoding, and the
stage that writes ``OUT/<name>/labels/panoptic``.

Every pixel gets a class and, when its class is a *thing*, the global instance id
it belongs to; pixels of *stuff* classes have instance 0 (as in COCO panoptic).
The divisor and the catalogue are stored in the arrays' attributes (``segpipe``
key) and in the NGFF ``image-label`` properties of ``labels/panoptic``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from segpipe.errors import ConfigError, InputReadError, UnsupportedImageError

if TYPE_CHECKING:
    from segpipe.segmenters.base import Segmenter

KEY = "panoptic"  # under the arrays' and label group's ``segpipe`` attributes
MAX_CLASS = 255  # semantic labels are uint8
MIN_DIVISOR = 1000


class ClassSpec(BaseModel):
    """One class of the catalogue, as written in ``run.yaml``'s ``classes:`` list.

    Attributes
    ----------
    id : int
        The value of the class in ``labels/semantic`` (0-255).
    name : str
        A readable name (``background``, ``nucleus``).
    thing : bool
        True for countable objects that get instances; False for *stuff*
        (regions without instances, e.g. background), as in COCO panoptic.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0, le=MAX_CLASS)
    name: str = Field(min_length=1)
    thing: bool


_CLASS_LIST = TypeAdapter(list[ClassSpec])


@dataclass(frozen=True)
class Catalogue:
    """The classes of one image: ids unique, names unique, sorted by id.

    Build it with `parse_catalogue` (from config or attributes) or
    `catalogue_for` (from a segmenter).
    """

    classes: tuple[ClassSpec, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.classes)

    @property
    def things(self) -> tuple[int, ...]:
        """Ids of the thing classes."""
        return tuple(c.id for c in self.classes if c.thing)

    @property
    def stuff(self) -> tuple[int, ...]:
        """Ids of the stuff classes."""
        return tuple(c.id for c in self.classes if not c.thing)

    def get(self, class_id: int) -> ClassSpec | None:
        """The class with id ``class_id``, or None."""
        return next((c for c in self.classes if c.id == class_id), None)

    def name(self, class_id: int) -> str:
        """Name of ``class_id``; ``class<id>`` for an id the catalogue lacks."""
        spec = self.get(class_id)
        return spec.name if spec is not None else f"class{class_id}"

    def thing_lut(self) -> NDArray[np.bool_]:
        """(256,) bool array: ``lut[c]`` is True when class ``c`` is a thing."""
        lut = np.zeros(MAX_CLASS + 1, dtype=bool)
        lut[list(self.things)] = True
        return lut

    def known_lut(self) -> NDArray[np.bool_]:
        """(256,) bool array: ``lut[c]`` is True when class ``c`` is in the catalogue."""
        lut = np.zeros(MAX_CLASS + 1, dtype=bool)
        lut[list(self.ids)] = True
        return lut

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-able ``[{id, name, thing}, ...]``."""
        return [c.model_dump() for c in self.classes]


def parse_catalogue(value: object, *, source: str = "classes") -> Catalogue:
    """Validate ``[{id, name, thing}, ...]`` into a `Catalogue`.

    Parameters
    ----------
    value : list of dict or of ClassSpec
        The classes.
    source : str
        What to name in errors (a config key or a file).

    Raises
    ------
    ConfigError
        If an entry is malformed, or ids or names repeat, or the list is empty.
    """
    if isinstance(value, Catalogue):
        return value
    try:
        specs = _CLASS_LIST.validate_python(value)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'classes'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{source}: {problems}") from err
    if not specs:
        raise ConfigError(f"{source}: Expected at least one class, got an empty list instead.")
    for attr in ("id", "name"):
        values = [getattr(c, attr) for c in specs]
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ConfigError(f"{source}: class {attr}s must be unique; repeated: {repeated}.")
    return Catalogue(tuple(sorted(specs, key=lambda c: c.id)))


def default_catalogue(names: Sequence[str], *, things: Iterable[str] | None = None) -> Catalogue:
    """Classes ``0..n-1`` named ``names``; by default class 0 is stuff, the others things.

    Parameters
    ----------
    names : sequence of str
        Class names in id order, background first.
    things : iterable of str, optional
        Names of the thing classes, overriding the default.

    Examples
    --------
    >>> default_catalogue(["background", "nucleus"]).things
    (1,)
    """
    if len(names) > MAX_CLASS + 1:
        raise ConfigError(f"Expected at most {MAX_CLASS + 1} classes, got {len(names)} instead.")
    chosen = set(things) if things is not None else set(names[1:])
    unknown = chosen - set(names)
    if unknown:
        raise ConfigError(f"thing classes {sorted(unknown)} are not among the classes {names}.")
    return parse_catalogue(
        [{"id": i, "name": n, "thing": n in chosen} for i, n in enumerate(names)],
        source="segmenter classes",
    )


def catalogue_for(segmenter: Segmenter, classes: object = None) -> Catalogue:
    """The catalogue of a run: the configured ``classes``, or the segmenter's own.

    Parameters
    ----------
    segmenter : Segmenter
        Its ``classes`` (names, background first) are the semantic values it
        writes. A segmenter that knows which of its classes are things (a deep
        model trained on thing and stuff classes) declares their names in a
        ``thing_classes`` attribute; without it, class 0 is stuff and the rest
        things.
    classes : list of {id, name, thing}, optional
        The ``classes:`` key of the run config; it must define exactly the ids
        the segmenter produces (it may rename them and choose thing or stuff).

    Raises
    ------
    ConfigError
        If ``classes`` is invalid or does not match the segmenter's class ids.
    """
    names = list(segmenter.classes)
    if classes is None:
        things = getattr(segmenter, "thing_classes", None)
        return default_catalogue(names, things=None if things is None else list(things))
    catalogue = parse_catalogue(classes)
    expected = set(range(len(names)))
    if set(catalogue.ids) != expected:
        raise ConfigError(
            f"classes: segmenter {segmenter.name!r} writes class ids 0..{len(names) - 1} "
            f"({', '.join(names)}); the catalogue defines {list(catalogue.ids)}. "
            "Define each of those ids once."
        )
    return catalogue


# -- encoding ------------------------------------------------------------------


def choose_divisor(count: int) -> int:
    """The divisor for an image with instance ids ``1..count``.

    The smallest power of ten, at least 1000, above ``count``: values stay
    readable (class 2, instance 17 → 2000017 with divisor 10**6).

    Raises
    ------
    UnsupportedImageError
        If ``255 * divisor + count`` would not fit in uint64.
    """
    divisor = MIN_DIVISOR
    while divisor <= count:
        divisor *= 10
    if MAX_CLASS * divisor + divisor - 1 >= 2**64:
        raise UnsupportedImageError(
            f"{count} instances: too many for a uint64 panoptic encoding with 256 classes."
        )
    return divisor


def _check_divisor(divisor: object) -> int:
    if isinstance(divisor, bool) or not isinstance(divisor, int | np.integer) or divisor < 1:
        raise ValueError(f"divisor: Expected a positive int, got {divisor!r} instead.")
    return int(divisor)


def encode(
    semantic: NDArray[np.integer],
    instances: NDArray[np.integer],
    *,
    divisor: int,
    catalogue: Catalogue,
) -> NDArray[np.uint64]:
    """Panoptic ids ``class * divisor + instance``; stuff pixels get instance 0.

    Parameters
    ----------
    semantic : (M, N[, P]) ndarray of int
        Class per pixel; every value must be in ``catalogue``.
    instances : (M, N[, P]) ndarray of int
        Instance id per pixel (0 = none), each below ``divisor``.
    divisor : int
        Greater than every instance id.
    catalogue : Catalogue
        Which classes are things.

    Returns
    -------
    (M, N[, P]) ndarray of uint64

    Raises
    ------
    ValueError
        If shapes differ, a value is negative, or an instance id is ``>= divisor``.
    ConfigError
        If a class is not in the catalogue.

    Examples
    --------
    >>> cat = default_catalogue(["background", "cell"])
    >>> encode(np.array([[0, 1]]), np.array([[4, 7]]), divisor=1000, catalogue=cat)
    array([[   0, 1007]], dtype=uint64)
    """
    divisor = _check_divisor(divisor)
    semantic, instances = np.asarray(semantic), np.asarray(instances)
    if semantic.shape != instances.shape:
        raise ValueError(
            f"Expected semantic and instances of the same shape, got {semantic.shape} and "
            f"{instances.shape} instead."
        )
    for name, arr in (("semantic", semantic), ("instances", instances)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name}: Expected an integer array, got {arr.dtype} instead.")
        if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
            raise ValueError(f"{name}: Expected non-negative values, got {arr.min()} instead.")
    if semantic.size == 0:
        return np.zeros(semantic.shape, np.uint64)
    top = int(semantic.max())
    known = catalogue.known_lut()
    if top > MAX_CLASS or not known[semantic].all():
        present = np.unique(semantic)
        missing = [int(c) for c in present if c > MAX_CLASS or not known[c]]
        raise ConfigError(
            f"classes {missing} are in the semantic labels but not in the class catalogue "
            f"(ids {list(catalogue.ids)}); add them to `classes`."
        )
    if int(instances.max()) >= divisor:
        raise ValueError(
            f"instances: Expected ids below the divisor {divisor}, got {int(instances.max())}."
        )
    thing = catalogue.thing_lut()[semantic]
    out = semantic.astype(np.uint64) * np.uint64(divisor)
    out += np.where(thing, instances, 0).astype(np.uint64)
    return out


def instance_dtype(divisor: int) -> np.dtype[np.unsignedinteger]:
    """dtype of decoded instances: uint32 while every id below ``divisor`` fits."""
    return np.dtype(np.uint32 if divisor <= 2**32 else np.uint64)


def decode(
    panoptic: NDArray[np.integer] | zarr.Array[Any] | str | Path, *, divisor: int | None = None
) -> tuple[NDArray[np.uint8], NDArray[np.unsignedinteger]]:
    """Split panoptic ids into ``(semantic, instances)``.

    Parameters
    ----------
    panoptic : ndarray, zarr.Array, str or Path
        Panoptic ids; a Zarr array (or its path, e.g.
        ``OUT.zarr/cells/labels/panoptic/0``) is read whole and carries its
        divisor in its attributes.
    divisor : int, optional
        Required for a plain ndarray; for a Zarr array it defaults to the
        recorded one.

    Returns
    -------
    semantic : ndarray of uint8
        ``panoptic // divisor``.
    instances : ndarray of uint32 (uint64 for divisors above 2**32)
        ``panoptic % divisor`` (0 on stuff pixels).

    Raises
    ------
    ValueError
        If no divisor is given or recorded, or a class exceeds 255.

    Examples
    --------
    >>> semantic, instances = decode(np.array([0, 1007, 2000], np.uint64), divisor=1000)
    >>> semantic.tolist(), instances.tolist()
    ([0, 1, 2], [0, 7, 0])
    """
    if isinstance(panoptic, str | Path):
        panoptic = zarr.open_array(str(panoptic), mode="r")
    if isinstance(panoptic, zarr.Array):
        if divisor is None:
            divisor = read_attrs(panoptic)[0]
        data = np.asarray(panoptic[...])
    else:
        data = np.asarray(panoptic)
    if divisor is None:
        raise ValueError(
            "divisor: Expected the divisor for a plain array (it is recorded in the panoptic "
            "array's attributes under segpipe.panoptic.divisor), got None instead."
        )
    divisor = _check_divisor(divisor)
    if data.dtype.kind not in "iu":
        raise ValueError(f"panoptic: Expected an integer array, got {data.dtype} instead.")
    values = data.astype(np.uint64, copy=False)
    d = np.uint64(divisor)
    classes = values // d
    if classes.size and int(classes.max()) > MAX_CLASS:
        raise ValueError(
            f"panoptic: class {int(classes.max())} exceeds {MAX_CLASS}; is the divisor "
            f"{divisor} right?"
        )
    return classes.astype(np.uint8), (values % d).astype(instance_dtype(divisor))


# -- metadata -------------------------------------------------------------------


def attrs_value(divisor: int, catalogue: Catalogue) -> dict[str, Any]:
    """What ``segpipe.panoptic`` holds in the attributes."""
    return {"divisor": int(divisor), "classes": catalogue.to_list()}


def node_attrs(node: zarr.Array[Any] | zarr.Group) -> dict[str, Any]:
    return dict(node.attrs.asdict())


def _node_path(node: zarr.Array[Any] | zarr.Group) -> Path | None:
    """Filesystem path of a node opened from a local store (None for other stores)."""
    root = getattr(node.store_path.store, "root", None)
    if root is None:
        return None
    return Path(str(root)) / node.store_path.path if node.store_path.path else Path(str(root))


def read_attrs(node: zarr.Array[Any] | zarr.Group | str | Path) -> tuple[int, Catalogue]:
    """``(divisor, catalogue)`` recorded on a panoptic array or its label group.

    Looks at the node itself, then at its parent group (the label image).

    Raises
    ------
    InputReadError
        If neither records a panoptic divisor (names the path).
    """
    if isinstance(node, str | Path):
        node = zarr.open(str(node), mode="r")
    path = _node_path(node)
    candidates: list[zarr.Array[Any] | zarr.Group] = [node]
    if path is not None and (path.parent / "zarr.json").is_file():
        candidates.append(zarr.open_group(str(path.parent), mode="r"))
    for candidate in candidates:
        section = node_attrs(candidate).get("segpipe")
        value = section.get(KEY) if isinstance(section, dict) else None
        if isinstance(value, dict) and "divisor" in value:
            catalogue = parse_catalogue(value.get("classes", []), source=f"{path}: classes")
            return _check_divisor(value["divisor"]), catalogue
    raise InputReadError(
        f"{path}: no panoptic divisor in its attributes (segpipe.panoptic.divisor); "
        "is it a segpipe panoptic array?"
    )


def label_properties(divisor: int, catalogue: Catalogue) -> list[dict[str, Any]]:
    """NGFF image-label ``properties``: one entry per class, at its instance-0 value."""
    return [
        {"label-value": c.id * divisor, "class": c.name, "category": c.id, "thing": c.thing}
        for c in catalogue.classes
    ]


# -- the stage -------------------------------------------------------------------

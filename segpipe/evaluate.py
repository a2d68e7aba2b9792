"""Segmentation quality against ground truth: PQ, SQ, RQ per class and overall,
AP at IoU 0.50:0.95, and pixel IoU per class.

Block by block: each block yields a contingency table (pixels per pair of
predicted and true segment); the tables add up exactly, and every metric
follows from the merged table, so no task holds more than one block of either
image.

Definitions
-----------
A segment is a (class, instance) pair; stuff classes have one segment
(instance 0). Ignored classes are *void*, in the ground truth and in the
prediction, as in COCO panoptic and ``torchmetrics.detection.PanopticQuality``:

- a predicted and a true segment of one class match when their IoU > 0.5
  (each matches at most one), with void pixels left out of the union;
- an unmatched prediction is a false positive unless more than half of it is
  void in the truth; an unmatched true segment is a false negative unless more
  than half of it is void in the prediction;
- ``SQ = sum of matched IoUs / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``,
  ``PQ = SQ * RQ`` per class; overall values average the classes with
  ``TP + FP + FN > 0``.

AP (thing classes; segmentations carry no confidence scores): at each IoU
threshold t in 0.50, 0.55, …, 0.95, ``AP_t = TP_t / (TP_t + FP_t + FN_t)``
with matches at IoU > t — the Data Science Bowl 2018 (and Cellpose/StarDist)
definition; AP is the mean over the ten thresholds. Pixel IoU per class is
``|P ∩ T| / |P ∪ T|`` over the pixels that are not void in the truth.

Classes are matched by id. The result names the classes matched and warns
when one side has classes the other lacks (each segment of such a class is a
false positive or negative). A label image whose classes are a deep model's
training layout (background, interior, boundary: segpipe before the nucleus
output) is read as background and nucleus: the boundary is part of its nucleus.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import zarr
from numpy.typing import NDArray

from segpipe.blocks import BlockGrid
from segpipe.errors import ConfigError, InputNotFoundError, InputReadError, UnsupportedImageError
from segpipe.io import storage
from segpipe.io.readers import SourceSpec, open_source, read_region
from segpipe.io.storage import Location
from segpipe.panoptic import (
    MAX_CLASS,
    Catalogue,
    ClassSpec,
    decode,
    default_catalogue,
    parse_catalogue,
    read_attrs,
)

ProgressFn = Callable[[str, int, int], None]
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
VOID = MAX_CLASS + 1  # class slot of void pixels in packed keys
_SHIFT = np.uint64(2**55)  # packed key: class * 2**55 + instance
BLOCK_PIXELS = 1 << 22  # default block: about 4 Mpx (2048² or 16 × 512²)


def _noop(stage: str, done: int, total: int) -> None:
    pass


# -- opening label images ---------------------------------------------------------


@dataclass(frozen=True)
class Labels:
    """A label image to evaluate: what its pixels mean and how to read them.

    ``kind`` is ``panoptic`` (class * divisor + instance), ``instances``
    (object ids; class 1 where non-zero) or ``semantic+instances`` (two arrays).
    """

    path: str
    kind: Literal["panoptic", "instances", "semantic+instances"]
    specs: tuple[SourceSpec, ...]
    divisor: int | None = None
    catalogue: Catalogue | None = None
    class_map: tuple[int, ...] = ()
    """Class id ``c`` is read as ``class_map[c]`` (empty: as is)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.specs[0].shape

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.specs[-1].chunks


def _is_group(path: Location) -> bool:
    meta = path / "zarr.json"
    if meta.is_file():
        try:
            node = json.loads(storage.read_bytes(meta))
        except (OSError, ValueError) as err:
            raise InputReadError(f"{meta}: unreadable Zarr metadata ({err}).") from err
        return isinstance(node, dict) and node.get("node_type") == "group"
    return (path / ".zgroup").is_file()


def _semantic_catalogue(group: Location) -> Catalogue | None:
    """Classes named in a semantic label image's NGFF properties (class 0 stuff, others things)."""
    try:
        attrs: Any = dict(zarr.open_group(str(group), mode="r").attrs.asdict())
        props = attrs["ome"]["image-label"]["properties"]
        names = {int(p["label-value"]): str(p["class"]) for p in props}
    except (KeyError, TypeError, ValueError):
        return None
    if not names:
        return None
    return parse_catalogue(
        [{"id": i, "name": n, "thing": i != 0} for i, n in sorted(names.items())],
        source=f"{group}: image-label properties",
    )


TRAINING_LAYOUT = ("background", "interior", "boundary")
"""Classes of a 3-class deep model's network, written as output by segpipe before the
nucleus output: interior and boundary are one nucleus."""


def _merge_training_layout(labels: Labels) -> Labels:
    """Read a label image in the training layout as background and nucleus."""
    cat = labels.catalogue
    if cat is None or tuple(cat.name(i) for i in cat.ids) != TRAINING_LAYOUT:
        return labels
    if cat.ids != (0, 1, 2):
        return labels
    merged = parse_catalogue(
        [
            {"id": 0, "name": "background", "thing": False},
            {"id": 1, "name": "nucleus", "thing": True},
        ],
        source=f"{labels.path}: interior and boundary as nucleus",
    )
    return replace(labels, catalogue=merged, class_map=(0, 1, 1))


def open_labels(path: str | os.PathLike[str], *, divisor: int | None = None) -> Labels:
    """Inspect a label image without reading its pixels.

    Parameters
    ----------
    path : str or path
        A segpipe image group (``OUT.zarr/<name>``: its panoptic labels, else
        semantic + instances), an OME-Zarr label image or Zarr array (panoptic
        when its attributes record a divisor, else instance ids), or a
        TIFF/PNG label image (instance ids).
    divisor : int, optional
        Read an array without recorded divisor as panoptic with this divisor.

    Raises
    ------
    InputNotFoundError, InputReadError, UnsupportedImageError
        Naming the file and the problem.
    """
    return _merge_training_layout(_open_labels(path, divisor=divisor))


def _open_labels(path: str | os.PathLike[str], *, divisor: int | None = None) -> Labels:
    text = os.fspath(path)
    p = storage.location(storage.local_text(text))
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory.")
    labels_dir = p / "labels"
    if p.is_dir() and labels_dir.is_dir() and _is_group(p):
        if (labels_dir / "panoptic").is_dir():
            return _open_labels(str(labels_dir / "panoptic"), divisor=divisor)
        if not (labels_dir / "instances").is_dir():
            found = sorted(d.name for d in labels_dir.iterdir() if d.is_dir())
            raise InputReadError(
                f"{p}: no labels/panoptic or labels/instances (found {found or 'none'})."
            )
        inst = _integer_source(labels_dir / "instances")
        if (labels_dir / "semantic").is_dir():
            sem = _integer_source(labels_dir / "semantic")
            _same_shape(sem, inst)
            catalogue = _semantic_catalogue(labels_dir / "semantic")
            return Labels(str(p), "semantic+instances", (sem, inst), catalogue=catalogue)
        return Labels(str(p), "instances", (inst,))
    spec = _integer_source(p)
    array_path = (spec.array_path or spec.path) if spec.format == "zarr" else None
    if array_path is not None:
        try:
            recorded, catalogue = read_attrs(array_path)
        except InputReadError:
            pass
        else:
            return Labels(str(p), "panoptic", (spec,), divisor or recorded, catalogue)
    if divisor is not None:
        return Labels(str(p), "panoptic", (spec,), int(divisor))
    return Labels(str(p), "instances", (spec,))


def _integer_source(path: Location) -> SourceSpec:
    spec = open_source(str(path))
    if np.dtype(spec.dtype).kind not in "iu" or spec.n_channels != 1:
        raise UnsupportedImageError(
            f"{spec.path}: expected a single-channel integer label image, got "
            f"{spec.dtype} with axes {spec.axes!r}."
        )
    return spec


def _same_shape(a: SourceSpec, b: SourceSpec) -> None:
    if a.shape != b.shape:
        raise UnsupportedImageError(
            f"{a.path} has shape {a.shape} but {b.path} has shape {b.shape}; they must match."
        )


def read_labels(
    labels: Labels, region: tuple[slice, ...]
) -> tuple[NDArray[np.int64], NDArray[np.uint64]]:
    """``(classes, instances)`` of ``region`` of a label image."""
    classes, instances = _read_labels(labels, region)
    if labels.class_map and classes.size:
        lut = np.arange(max(MAX_CLASS + 1, int(classes.max()) + 1), dtype=np.int64)
        lut[: len(labels.class_map)] = labels.class_map
        classes = lut[classes]
    return classes, instances


def _read_labels(
    labels: Labels, region: tuple[slice, ...]
) -> tuple[NDArray[np.int64], NDArray[np.uint64]]:
    if labels.kind == "panoptic":
        data = read_region(labels.specs[0], region)
        assert labels.divisor is not None
        try:
            classes, instances = decode(data, divisor=labels.divisor)
        except ValueError as err:
            raise InputReadError(f"{labels.path}: {err}") from err
        return classes.astype(np.int64), instances.astype(np.uint64)
    if labels.kind == "instances":
        inst = read_region(labels.specs[0], region)
        return (inst != 0).astype(np.int64), _non_negative(inst, labels.path)
    sem = read_region(labels.specs[0], region)
    inst = read_region(labels.specs[1], region)
    return _non_negative(sem, labels.path).astype(np.int64), _non_negative(inst, labels.path)


def _non_negative(data: NDArray[Any], path: str) -> NDArray[np.uint64]:
    if data.dtype.kind == "i" and data.size and data.min() < 0:
        raise UnsupportedImageError(f"{path}: negative label {data.min()}; labels are >= 0.")
    return data.astype(np.uint64)


# -- the contingency table -------------------------------------------------------------


@dataclass(frozen=True)
class Contingency:
    """Pixels per (predicted segment, true segment) pair, keys packed as
    ``class * 2**55 + instance`` (class 256 = void)."""

    pred: NDArray[np.uint64]
    truth: NDArray[np.uint64]
    pixels: NDArray[np.int64]

    @classmethod
    def empty(cls) -> Contingency:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))


def _class_tables(
    catalogue: Catalogue, ignore: Sequence[int]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(thing, void) lookup tables over class ids 0-255; unknown classes > 0 are things."""
    thing = np.ones(MAX_CLASS + 1, dtype=bool)
    thing[0] = False
    for c in catalogue.classes:
        thing[c.id] = c.thing
    void = np.zeros(MAX_CLASS + 1, dtype=bool)
    void[list(ignore)] = True
    return thing, void


def _pack(
    classes: NDArray[np.int64],
    instances: NDArray[np.uint64],
    thing: NDArray[np.bool_],
    void: NDArray[np.bool_],
    source: str,
) -> NDArray[np.uint64]:
    if classes.size and (classes.min() < 0 or classes.max() > MAX_CLASS):
        raise UnsupportedImageError(f"{source}: class ids must be 0-{MAX_CLASS}.")
    if instances.size and int(instances.max()) >= 2**55:
        raise UnsupportedImageError(f"{source}: instance ids must be below 2**55.")
    is_void = void[classes]
    inst = np.where(thing[classes] & ~is_void, instances, np.uint64(0))
    cls = np.where(is_void, VOID, classes).astype(np.uint64)
    return cls * _SHIFT + inst


def block_contingency(
    pred: tuple[NDArray[np.int64], NDArray[np.uint64]],
    truth: tuple[NDArray[np.int64], NDArray[np.uint64]],
    *,
    thing: NDArray[np.bool_],
    void: NDArray[np.bool_],
    sources: tuple[str, str] = ("prediction", "ground truth"),
) -> Contingency:
    """Pixels per (predicted segment, true segment) in one block.

    Parameters
    ----------
    pred, truth : tuple of (classes, instances) ndarrays of one shape
        Instance ids of stuff classes are ignored (set to 0).
    thing, void : (256,) ndarray of bool
        Which classes are things, and which are void.
    """
    if pred[0].shape != truth[0].shape:
        raise UnsupportedImageError(
            f"{sources[0]} block {pred[0].shape} and {sources[1]} block {truth[0].shape} differ."
        )
    kp = _pack(pred[0].ravel(), pred[1].ravel(), thing, void, sources[0])
    kt = _pack(truth[0].ravel(), truth[1].ravel(), thing, void, sources[1])
    # Background in both (key 0) is most of a block: count it apart, pair the rest.
    both_background = (kp == 0) & (kt == 0)
    n0 = int(np.count_nonzero(both_background))
    kp, kt = kp[~both_background], kt[~both_background]
    up, ip = _unique_inverse(kp)
    ut, it = _unique_inverse(kt)
    pair = ip * len(ut) + it
    if len(up) * len(ut) <= 4 * len(pair):
        hist = np.bincount(pair, minlength=len(up) * len(ut))
        pairs = np.flatnonzero(hist)
        pixels = hist[pairs]
    else:
        pairs, pixels = np.unique(pair, return_counts=True)
    zero = np.zeros(1 if n0 else 0, np.uint64)
    return Contingency(
        np.concatenate([zero, up[pairs // len(ut)]]),
        np.concatenate([zero, ut[pairs % len(ut)]]),
        np.concatenate([np.full(len(zero), n0), pixels]).astype(np.int64),
    )


def _unique_inverse(values: NDArray[np.uint64]) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """``np.unique(values, return_inverse=True)``, faster: a plain sort and a binary search."""
    if values.size == 0:
        return values, np.zeros(0, np.int64)
    ordered = np.sort(values)
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    uniq = ordered[keep]
    return uniq, np.searchsorted(uniq, values).astype(np.int64)


def merge_contingency(parts: Sequence[Contingency]) -> Contingency:
    """Add the tables of several blocks."""
    if not parts:
        return Contingency.empty()
    kp = np.concatenate([p.pred for p in parts])
    kt = np.concatenate([p.truth for p in parts])
    n = np.concatenate([p.pixels for p in parts])
    if kp.size == 0:
        return Contingency.empty()
    order = np.lexsort((kt, kp))
    kp, kt, n = kp[order], kt[order], n[order]
    change = np.ones(len(kp), dtype=bool)
    change[1:] = (kp[1:] != kp[:-1]) | (kt[1:] != kt[:-1])
    starts = np.flatnonzero(change)
    return Contingency(kp[starts], kt[starts], np.add.reduceat(n, starts))


# -- metrics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassScore:
    """Scores of one class (None where undefined: no segment of it anywhere)."""

    id: int
    name: str
    thing: bool
    pq: float | None
    sq: float | None
    rq: float | None
    tp: int
    fp: int
    fn: int
    iou: float | None
    ap: float | None = None
    ap50: float | None = None
    ap75: float | None = None
    ap_per_threshold: list[float] | None = None


@dataclass(frozen=True)
class Metrics:
    """Scores per class and overall, with the inputs they compare."""

    classes: tuple[ClassScore, ...]
    pq: float | None
    sq: float | None
    rq: float | None
    pq_things: float | None
    pq_stuff: float | None
    ap: float | None
    ap50: float | None
    ap75: float | None
    miou: float | None
    ignored: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = THRESHOLDS
    prediction: str = ""
    ground_truth: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = asdict(self)
        out["classes"] = [asdict(c) for c in self.classes]
        return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def metrics_from_contingency(
    table: Contingency, catalogue: Catalogue, *, ignore: Sequence[int] = ()
) -> Metrics:
    """Every metric from a merged contingency table (see the module docstring)."""
    kp, kt, n = table.pred, table.truth, table.pixels
    w = n.astype(np.float64)
    p_cls = (kp // _SHIFT).astype(np.int64)
    t_cls = (kt // _SHIFT).astype(np.int64)
    p_void, t_void = p_cls == VOID, t_cls == VOID
    # segments: index, area, and pixels on void of the other side
    up, ip = np.unique(kp, return_inverse=True)
    ut, it = np.unique(kt, return_inverse=True)
    p_area = np.bincount(ip, weights=w, minlength=len(up))
    t_area = np.bincount(it, weights=w, minlength=len(ut))
    p_on_void = np.bincount(ip[t_void], weights=w[t_void], minlength=len(up))
    t_on_void = np.bincount(it[p_void], weights=w[p_void], minlength=len(ut))
    cand = (p_cls == t_cls) & ~p_void & ~t_void
    union = p_area[ip] - p_on_void[ip] + t_area[it] - t_on_void[it] - w
    iou_all = np.where(cand, w / np.where(cand, union, 1.0), 0.0)
    matched = cand & (iou_all > 0.5)  # > 0.5: each segment matches at most one
    match_cls = p_cls[matched]
    match_iou = iou_all[matched]
    p_matched = np.zeros(len(up), dtype=bool)
    p_matched[ip[matched]] = True
    t_matched = np.zeros(len(ut), dtype=bool)
    t_matched[it[matched]] = True
    up_cls = (up // _SHIFT).astype(np.int64)
    ut_cls = (ut // _SHIFT).astype(np.int64)
    is_fp = ~p_matched & (up_cls != VOID) & (p_on_void / np.maximum(p_area, 1) <= 0.5)
    is_fn = ~t_matched & (ut_cls != VOID) & (t_on_void / np.maximum(t_area, 1) <= 0.5)
    fp_count = np.bincount(up_cls[is_fp], minlength=VOID)
    fn_count = np.bincount(ut_cls[is_fn], minlength=VOID)
    fp = {int(c): int(fp_count[c]) for c in np.flatnonzero(fp_count)}
    fn = {int(c): int(fn_count[c]) for c in np.flatnonzero(fn_count)}

    # pixel IoU over pixels that are not void in the truth
    keep = ~t_void
    same = keep & (p_cls == t_cls)
    inter = np.bincount(t_cls[same], weights=w[same])
    t_pix = np.bincount(t_cls[keep], weights=w[keep])
    p_pix = np.bincount(p_cls[keep & ~p_void], weights=w[keep & ~p_void])

    def at(arr: NDArray[Any], c: int) -> float:
        return float(arr[c]) if c < len(arr) else 0.0

    thing_lut, _ = _class_tables(catalogue, ignore)
    present = set(match_cls.tolist()) | set(fp) | set(fn)
    present |= {int(c) for c in np.unique(t_cls[keep]) if c != VOID}
    present |= {int(c) for c in np.unique(p_cls[~p_void])}
    ids = sorted((set(catalogue.ids) | present) - set(ignore))
    scores = []
    for c in ids:
        tp = int(np.count_nonzero(match_cls == c))
        ious = match_iou[match_cls == c]
        f_p, f_n = fp.get(c, 0), fn.get(c, 0)
        denom = tp + 0.5 * f_p + 0.5 * f_n
        sq = float(ious.sum() / tp) if tp else (0.0 if denom else None)
        rq = tp / denom if denom else None
        pq = sq * rq if sq is not None and rq is not None else None
        pix_union = at(t_pix, c) + at(p_pix, c) - at(inter, c)
        iou = at(inter, c) / pix_union if pix_union else None
        thing = bool(thing_lut[c])
        ap_t: list[float] | None = None
        if thing and tp + f_p + f_n:
            ap_t = [
                float(k / (2 * tp + f_p + f_n - k))
                for k in (int(np.count_nonzero(ious > t)) for t in THRESHOLDS)
            ]
        scores.append(
            ClassScore(
                c,
                catalogue.name(c),
                thing,
                pq,
                sq,
                rq,
                tp,
                f_p,
                f_n,
                iou,
                _mean(ap_t) if ap_t else None,
                ap_t[0] if ap_t else None,
                ap_t[THRESHOLDS.index(0.75)] if ap_t else None,
                ap_t,
            )
        )
    counted = [s for s in scores if s.tp + s.fp + s.fn]
    return Metrics(
        tuple(scores),
        _mean([s.pq for s in counted if s.pq is not None]),
        _mean([s.sq for s in counted if s.sq is not None]),
        _mean([s.rq for s in counted if s.rq is not None]),
        _mean([s.pq for s in counted if s.thing and s.pq is not None]),
        _mean([s.pq for s in counted if not s.thing and s.pq is not None]),
        _mean([s.ap for s in scores if s.ap is not None]),
        _mean([s.ap50 for s in scores if s.ap50 is not None]),
        _mean([s.ap75 for s in scores if s.ap75 is not None]),
        _mean([s.iou for s in scores if s.iou is not None]),
        tuple(sorted(set(ignore))),
    )


# -- catalogues ------------------------------------------------------------------------


def merge_catalogues(truth: Catalogue | None, pred: Catalogue | None) -> Catalogue:
    """The ground truth's classes, plus the prediction's it lacks.

    Without either: ``background`` (stuff) and ``foreground`` (thing).

    Raises
    ------
    ConfigError
        If a class is a thing in one and stuff in the other.
    """
    base = truth or pred or default_catalogue(["background", "foreground"])
    classes: dict[int, ClassSpec] = {c.id: c for c in base.classes}
    for c in pred.classes if pred is not None and truth is not None else ():
        known = classes.get(c.id)
        if known is None:
            classes[c.id] = c
        elif known.thing != c.thing:
            raise ConfigError(
                f"class {c.id} is {'a thing' if c.thing else 'stuff'} in the prediction "
                f"({c.name!r}) but {'a thing' if known.thing else 'stuff'} in the ground truth "
                f"({known.name!r})."
            )
    return Catalogue(tuple(classes[i] for i in sorted(classes)))


# -- running it -----------------------------------------------------------------------------


def default_tile(shape: Sequence[int], chunks: Sequence[int] = ()) -> tuple[int, ...]:
    """Blocks of whole chunks (the source's, else 256) grown to about `BLOCK_PIXELS`."""
    tile = [
        min(int(c) if c else 256, n) for c, n in zip(chunks or [0] * len(shape), shape, strict=True)
    ]
    while math.prod(tile) * 2 <= BLOCK_PIXELS:
        grown = False
        for k in reversed(range(len(tile))):
            if tile[k] < shape[k] and math.prod(tile) * 2 <= BLOCK_PIXELS:
                tile[k] = min(tile[k] * 2, shape[k])
                grown = True
        if not grown:
            break
    return tuple(max(t, 1) for t in tile)


def contingency_task(
    pred: Labels,
    truth: Labels,
    region: tuple[slice, ...],
    thing: NDArray[np.bool_],
    void: NDArray[np.bool_],
) -> Contingency:
    """Read one block of both label images (on a worker) and count segment pairs."""
    return block_contingency(
        read_labels(pred, region),
        read_labels(truth, region),
        thing=thing,
        void=void,
        sources=(pred.path, truth.path),
    )


def _run_local(
    fn: Callable[..., Contingency],
    args: Sequence[tuple[Any, ...]],
    progress: ProgressFn,
    threads: int | None,
) -> list[Contingency]:
    out: list[Contingency] = []
    progress("evaluate", 0, len(args))
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for i, result in enumerate(pool.map(lambda a: fn(*a), args), start=1):
            out.append(result)
            progress("evaluate", i, len(args))
    return out


def evaluate(
    pred: str | os.PathLike[str] | Labels,
    truth: str | os.PathLike[str] | Labels,
    *,
    ignore: Sequence[int] = (),
    divisor: int | None = None,
    tile: int | Sequence[int] | None = None,
    client: Any = None,
    threads: int | None = None,
    progress: ProgressFn = _noop,
) -> Metrics:
    """Compare a prediction with the ground truth, block by block.

    Parameters
    ----------
    pred, truth : path or Labels
        Label images (see `open_labels`) of one shape.
    ignore : sequence of int
        Void classes: left out of every metric (see the module docstring).
    divisor : int, optional
        Panoptic divisor for arrays that do not record one.
    tile : int or sequence of int, optional
        Block shape; default: whole chunks of the prediction, about 4 Mpx.
    client : distributed.Client, optional
        Run the blocks on this cluster; default: threads in this process.
    threads : int, optional
        Threads when no client is given (default: one per core).
    progress : callable
        ``progress(stage, done, total)``.

    Returns
    -------
    Metrics
    """
    p = _merge_training_layout(
        pred if isinstance(pred, Labels) else open_labels(pred, divisor=divisor)
    )
    t = _merge_training_layout(
        truth if isinstance(truth, Labels) else open_labels(truth, divisor=divisor)
    )
    if p.shape != t.shape:
        raise UnsupportedImageError(
            f"{p.path} has shape {p.shape} but {t.path} has shape {t.shape}; they must match."
        )
    catalogue = merge_catalogues(t.catalogue, p.catalogue)
    bad = [c for c in ignore if not 0 <= c <= MAX_CLASS]
    if bad:
        raise ConfigError(f"--ignore: Expected class ids 0-{MAX_CLASS}, got {bad} instead.")
    thing, void = _class_tables(catalogue, ignore)
    grid = BlockGrid.build(
        p.shape, tile=tile if tile is not None else default_tile(p.shape, p.chunks)
    )
    args = [(p, t, b.core, thing, void) for b in grid]
    if client is None:
        parts = _run_local(contingency_task, args, progress, threads)
    else:
        from segpipe import engine

        parts = engine.map_blocks(
            client, contingency_task, args, stage="evaluate", progress=progress
        )
    table = merge_contingency(parts)
    result = metrics_from_contingency(table, catalogue, ignore=ignore)
    extra: dict[str, Any] = {"blocks": len(grid), "shape": list(p.shape)}
    extra.update(class_sets(table, p, t, ignore=ignore))
    return replace(result, prediction=p.path, ground_truth=t.path, extra=extra)


def _names(labels: Labels, ids: Sequence[int]) -> list[str]:
    cat = labels.catalogue or default_catalogue(["background", "foreground"])
    return [f"{c} {cat.name(c)}" for c in ids]


def class_sets(
    table: Contingency, pred: Labels, truth: Labels, *, ignore: Sequence[int] = ()
) -> dict[str, Any]:
    """Which classes both sides hold (matched by id), and warnings where the sets differ.

    Parameters
    ----------
    table : Contingency
        The merged table of the whole image.
    pred, truth : Labels
        The label images compared (their catalogues name the classes).
    ignore : sequence of int
        Void classes, left out.

    Returns
    -------
    dict
        ``matched``: ``[{"id", "prediction", "truth"}]`` for each class in both;
        ``warnings``: one line per side holding classes the other lacks;
        ``mapped``: how a training-layout prediction or truth was read.
    """
    skip = {*ignore, VOID}
    in_pred = sorted({int(c) for c in np.unique(table.pred // _SHIFT)} - skip)
    in_truth = sorted({int(c) for c in np.unique(table.truth // _SHIFT)} - skip)
    default = default_catalogue(["background", "foreground"])
    pcat, tcat = pred.catalogue or default, truth.catalogue or default
    matched = [
        {"id": c, "prediction": pcat.name(c), "truth": tcat.name(c)}
        for c in in_pred
        if c in in_truth
    ]
    warnings = []
    only_pred = [c for c in in_pred if c not in in_truth]
    only_truth = [c for c in in_truth if c not in in_pred]
    if only_pred:
        warnings.append(
            f"prediction classes {_names(pred, only_pred)} are not in the ground truth "
            f"({truth.path}): each of their segments counts as a false positive."
        )
    if only_truth:
        warnings.append(
            f"ground-truth classes {_names(truth, only_truth)} are not in the prediction "
            f"({pred.path}): each of their segments counts as a false negative."
        )
    mapped = [
        f"{labels.path}: classes 1 interior and 2 boundary read as 1 nucleus"
        for labels in (pred, truth)
        if labels.class_map
    ]
    return {"matched": matched, "warnings": warnings, "mapped": mapped}


def score(
    pred_semantic: NDArray[np.integer],
    pred_instances: NDArray[np.integer],
    truth_semantic: NDArray[np.integer],
    truth_instances: NDArray[np.integer],
    *,
    catalogue: Catalogue | None = None,
    ignore: Sequence[int] = (),
    tile: int | Sequence[int] | None = None,
) -> Metrics:
    """`evaluate` on in-memory arrays (blockwise when ``tile`` is given).

    Parameters
    ----------
    pred_semantic, pred_instances, truth_semantic, truth_instances : (M, N[, P]) ndarray of int
        Classes and instance ids of the prediction and the ground truth.
    catalogue : Catalogue, optional
        Thing and stuff classes; default: class 0 stuff, every other a thing.
    ignore : sequence of int
        Void classes.
    tile : int or sequence of int, optional
        Block shape (default: one block).

    Examples
    --------
    >>> truth = np.array([[1, 1, 0, 2, 2]])
    >>> m = score(truth > 0, truth, truth > 0, truth)
    >>> m.pq, m.ap, m.miou
    (1.0, 1.0, 1.0)
    """
    arrays = [
        np.asarray(a) for a in (pred_semantic, pred_instances, truth_semantic, truth_instances)
    ]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(
            f"Expected four arrays of one shape, got {[a.shape for a in arrays]} instead."
        )
    catalogue = catalogue or default_catalogue(["background", "foreground"])
    thing, void = _class_tables(catalogue, ignore)
    shape = arrays[0].shape
    grid = BlockGrid.build(shape, tile=tile if tile is not None else max(shape, default=1))
    parts = []
    for b in grid:
        ps, pi, ts, ti = (a[b.core] for a in arrays)
        parts.append(
            block_contingency(
                (ps.astype(np.int64), _non_negative(pi, "prediction")),
                (ts.astype(np.int64), _non_negative(ti, "ground truth")),
                thing=thing,
                void=void,
            )
        )
    return metrics_from_contingency(merge_contingency(parts), catalogue, ignore=ignore)

"""``tree``: a hand-written decision tree over named features and whole-image statistics.

In ``run.yaml`` each node is either a class name (a leaf) or ``{if, then, else}`` whose
``if`` compares two expressions of features (`segpipe.features`), statistics and
numbers. The tree is checked when the segmenter is built (unknown feature, unknown
class, a missing branch: each named by its place under ``segmenter.tree``), so a bad
tree stops a run before any compute. Each split is one vectorised comparison over the
block; the classes are a pointwise function of exact features, and instances are
connected regions of one thing class.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from skimage.measure import label

from segpipe import features
from segpipe.errors import SegmenterError, SegpipeError
from segpipe.segmenters.base import Segmenter, SegmentResult, SmoothingOptions, context_limit
from segpipe.stats import ImageStats

__all__ = [
    "Condition",
    "Leaf",
    "Split",
    "Tree",
    "TreeError",
    "TreeOptions",
    "evaluate",
    "halo_for",
    "label_things",
    "names_in",
    "parse_catalogue_option",
    "parse_condition",
    "parse_tree",
]

WHERE = "segmenter.tree"


class TreeError(SegmenterError):
    """A decision tree that cannot run; the message names the node (``segmenter.tree.then``)."""


# -- conditions ----------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.\d+)?)"
    r"|(?P<op><=|>=|<|>|[-+*/()]))"
)
_COMPARE = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}
_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.divide,
}

Expr = tuple[Any, ...]  # ("num", v) | ("name", n) | ("neg", e) | (op, a, b)
Values = Callable[[str], "NDArray[np.float64] | float"]


@dataclass(frozen=True)
class Condition:
    """``left op right``: two expressions compared pixel by pixel, in float64."""

    text: str
    left: Expr
    op: str
    right: Expr

    @property
    def names(self) -> set[str]:
        """Every feature or statistic the condition reads."""
        return _names(self.left) | _names(self.right)


def _names(e: Expr) -> set[str]:
    if e[0] == "name":
        return {e[1]}
    if e[0] == "num":
        return set()
    return set().union(*(_names(x) for x in e[1:]))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"unexpected {text[pos:].strip()[:12]!r}")
            kind = m.lastgroup
            assert kind is not None
            self.tokens.append((kind, m[kind]))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ValueError("it ends too early")
        self.i += 1
        return token

    def expr(self) -> Expr:
        e = self.term()
        while (t := self.peek()) is not None and t[1] in "+-" and t[0] == "op":
            self.i += 1
            e = (t[1], e, self.term())
        return e

    def term(self) -> Expr:
        e = self.unary()
        while (t := self.peek()) is not None and t[1] in "*/" and t[0] == "op":
            self.i += 1
            e = (t[1], e, self.unary())
        return e

    def unary(self) -> Expr:
        kind, value = self.take()
        if kind == "number":
            return ("num", float(value))
        if kind == "name":
            return ("name", value)
        if value == "-":
            return ("neg", self.unary())
        if value == "(":
            e = self.expr()
            if self.take()[1] != ")":
                raise ValueError("a '(' is not closed")
            return e
        raise ValueError(f"expected a number, a name or '(', got {value!r}")


def parse_condition(text: str) -> Condition:
    """Parse ``"EXPR OP EXPR"`` with OP one of ``< <= > >=``.

    Expressions hold numbers, names (features such as ``gaussian_2``, statistics such as
    ``otsu``), ``+ - * /`` and parentheses.

    Raises
    ------
    ValueError
        Saying what is wrong (names are checked by `parse_tree`).

    Examples
    --------
    >>> c = parse_condition("gaussian_2 > 1.5 * otsu")
    >>> c.op, sorted(c.names)
    ('>', ['gaussian_2', 'otsu'])
    """
    p = _Parser(text)
    if not p.tokens:
        raise ValueError("the condition is empty")
    left = p.expr()
    t = p.peek()
    if t is None or t[1] not in _COMPARE:
        raise ValueError("expected a comparison: <, <=, > or >=")
    p.i += 1
    right = p.expr()
    if p.peek() is not None:
        raise ValueError(f"unexpected {p.peek()[1]!r} after the comparison")  # type: ignore[index]
    return Condition(text.strip(), left, t[1], right)


def _value(e: Expr, values: Values) -> NDArray[np.float64] | float:
    kind = e[0]
    if kind == "num":
        return float(e[1])
    if kind == "name":
        return values(e[1])
    if kind == "neg":
        return -_value(e[1], values)
    out: NDArray[np.float64] | float = _ARITH[kind](_value(e[1], values), _value(e[2], values))
    return out


# -- trees ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A class of the catalogue."""

    class_id: int
    where: str


@dataclass(frozen=True)
class Split:
    """``if`` the condition holds ``then`` else ``otherwise``."""

    condition: Condition
    then: Leaf | Split
    otherwise: Leaf | Split
    where: str


Node = Leaf | Split


def parse_tree(node: object, classes: Mapping[str, int], *, where: str = WHERE) -> Node:
    """Check and compile a tree written as nested ``{if, then, else}`` and class names.

    Parameters
    ----------
    node : str or dict
        A class name, or a mapping with exactly the keys ``if`` (a condition, see
        `parse_condition`), ``then`` and ``else`` (nodes).
    classes : mapping of str to int
        Class names to their ids.
    where : str
        The node's place in the config, for messages.

    Raises
    ------
    TreeError
        The first problem, with its place: a class or feature that does not exist, a
        missing ``then``/``else``, an unknown key, a condition that does not parse.
    """
    if isinstance(node, str):
        if node not in classes:
            raise TreeError(
                f"{where}: unknown class {node!r}; expected one of {', '.join(classes)} "
                "(the segmenter's classes)"
            )
        return Leaf(classes[node], where)
    if not isinstance(node, Mapping):
        hint = " (quote it: YAML reads yes/no/on/off as booleans)" if isinstance(node, bool) else ""
        raise TreeError(
            f"{where}: expected a class name or a mapping with if/then/else, got {node!r}{hint}"
        )
    unknown = [str(k) for k in node if k not in ("if", "then", "else")]
    if unknown:
        raise TreeError(f"{where}: unknown key {unknown[0]!r}; a node has if, then and else")
    for key in ("if", "then", "else"):
        if key not in node or node[key] is None:
            raise TreeError(
                f"{where}: `{key}:` is missing; a split needs if (a condition), then and else "
                "(each a class name or another split)"
            )
    text = node["if"]
    if not isinstance(text, str):
        raise TreeError(
            f"{where}.if: expected a condition such as 'gaussian_2 > otsu', got {text!r}"
        )
    try:
        condition = parse_condition(text)
    except ValueError as err:
        raise TreeError(f"{where}.if: {text!r}: {err}") from err
    for name in sorted(condition.names):
        if features.is_statistic(name):
            continue
        try:
            features.parse_feature(name)
        except features.FeatureError as err:
            raise TreeError(f"{where}.if: {text!r}: {err}") from err
    return Split(
        condition,
        parse_tree(node["then"], classes, where=f"{where}.then"),
        parse_tree(node["else"], classes, where=f"{where}.else"),
        where,
    )


def _walk(node: Node) -> list[Node]:
    if isinstance(node, Leaf):
        return [node]
    return [node, *_walk(node.then), *_walk(node.otherwise)]


def names_in(node: Node) -> list[str]:
    """The features and statistics a tree reads, sorted."""
    found: set[str] = set()
    for n in _walk(node):
        if isinstance(n, Split):
            found |= n.condition.names
    return sorted(found)


def evaluate(node: Node, values: Values, shape: Sequence[int]) -> NDArray[np.uint8]:
    """The class of every pixel: each split's condition computed over the whole block
    (one vectorised comparison per split), its branches joined with ``np.where``.

    ``values(name)`` gives a feature's plane (float64) or a statistic's value. A
    comparison with NaN (e.g. 0 / 0) is false: such pixels take ``else``.
    """
    if isinstance(node, Leaf):
        return np.full(tuple(shape), node.class_id, np.uint8)
    c = node.condition
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        holds = _COMPARE[c.op](_value(c.left, values), _value(c.right, values))
    holds = np.broadcast_to(holds, tuple(shape))
    if isinstance(node.then, Leaf) and isinstance(node.otherwise, Leaf):
        return np.where(holds, np.uint8(node.then.class_id), np.uint8(node.otherwise.class_id))
    return np.where(
        holds, evaluate(node.then, values, shape), evaluate(node.otherwise, values, shape)
    )


# -- shared by the pixel classifiers ---------------------------------------------------------


def parse_catalogue_option(value: object, *, where: str) -> tuple[list[str], list[str]]:
    """(names by id, thing names) from a ``classes`` option: names (id = position, the
    first stuff, the others things) or ``[{id, name, thing}]`` with ids 0..n-1.

    Raises
    ------
    SegmenterError
        Naming ``where`` and what is wrong.
    """
    from segpipe.panoptic import parse_catalogue

    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        names = [str(v) for v in value]
        if len(set(names)) != len(names):
            raise SegmenterError(f"{where}: class names must be unique, got {names}")
        return names, names[1:]
    try:
        catalogue = parse_catalogue(value, source=where)
    except SegpipeError as err:
        raise SegmenterError(str(err)) from err
    if list(catalogue.ids) != list(range(len(catalogue.ids))):
        raise SegmenterError(
            f"{where}: class ids must be 0..{len(catalogue.ids) - 1}, one each "
            f"(they are the values of labels/semantic), got {list(catalogue.ids)}"
        )
    names = [c.name for c in catalogue.classes]
    return names, [c.name for c in catalogue.classes if c.thing]


def label_things(
    semantic: NDArray[np.uint8], things: Sequence[int], core: tuple[slice, ...] | None = None
) -> NDArray[np.integer]:
    """Connected regions of one thing class each (full connectivity), numbered 1..k;
    pixels of stuff classes are 0. With ``core`` (the block within what was read),
    only the core is labelled: the context's outer pixels may be misclassified, and
    the pipeline joins objects across blocks exactly from their faces."""
    if core is not None:
        out = np.zeros(semantic.shape, np.int32)
        out[core] = label_things(np.ascontiguousarray(semantic[core]), things)
        return out
    lut = np.zeros(256, np.uint8)
    lut[list(things)] = 1
    thing = lut[semantic].astype(bool)
    masked = np.where(thing, semantic, np.uint8(0))
    labelled: NDArray[np.integer] = label(masked, background=0, connectivity=semantic.ndim)
    return labelled


def halo_for(radius: int, diameter: int, ndim: int) -> tuple[int, ...]:
    """Context per side: the features' ``radius`` (exact classes), plus ``diameter``
    where objects are matched by overlap in the context (a forest's watershed split).
    Connected components need no more: they are labelled on each block's core alone
    (``wants_core``) and joined across blocks from their faces. Without context
    (``radius`` 0) every pixel read is exact.
    """
    return (radius + diameter if radius > 0 else 0,) * ndim


# -- the segmenter -------------------------------------------------------------------------


class TreeOptions(SmoothingOptions):
    tree: dict[str, Any] | str
    """The decision tree: a class name, or ``{if: CONDITION, then: NODE, else: NODE}``
    nested; a condition compares expressions of features (``gaussian_2``, ``sobel_1``,
    ``log_2``, ``hessian1_4``, ``std_3`` ...), statistics of the whole image (``otsu``,
    ``li``, ``p99`` ...) and numbers, e.g. ``gaussian_1 > 0.8 * otsu``."""
    classes: list[str] | list[dict[str, Any]] = Field(
        default_factory=lambda: ["background", "foreground"]
    )
    """The catalogue: names (id = position; the first is stuff, the others things) or
    ``[{id, name, thing}]`` with ids 0..n-1, as ``classes:`` in run.yaml."""
    sigma: float | list[float] = 0.0
    """Gaussian smoothing of the image before anything else (0 = none): features and
    statistics then see the smoothed image."""
    diameter: int = Field(32, ge=0)
    """Largest extent of a thing object past a block's edge, in pixels: with context
    features, objects are exact when none reaches further (see `halo_for`)."""


class Tree(Segmenter):
    """A decision tree written in run.yaml: nested conditions on named features and
    whole-image statistics, leaves naming classes; instances are connected regions of
    one thing class.

    Options: ``tree`` (required), ``classes`` ([background, foreground]), ``sigma`` (0),
    ``diameter`` (32).
    """

    name = "tree"
    options_model = TreeOptions
    wants_core: ClassVar[bool] = True  # objects are labelled on the block's core alone

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.opts
        self._names, things = parse_catalogue_option(o.classes, where="segmenter.classes")
        ids = {n: i for i, n in enumerate(self._names)}
        self.thing_classes = things
        self.things = [ids[n] for n in things]
        self.root = parse_tree(o.tree, ids)
        used = names_in(self.root)
        self.statistic_names = [n for n in used if features.is_statistic(n)]
        canonical = {features.parse_feature(n).name for n in used if not features.is_statistic(n)}
        self.features = features.parse_features(sorted(canonical))

    @property
    def opts(self) -> TreeOptions:
        assert isinstance(self.options, TreeOptions)
        return self.options

    @property
    def classes(self) -> list[str]:
        return list(self._names)

    def check_image(self, shape: Sequence[int]) -> None:
        super().check_image(shape)
        for f in self.features:
            if f.kind == "hessian" and f.index > len(shape):
                raise SegmenterError(
                    f"{WHERE}: feature {f.name!r}: a {len(shape)}D image's Hessian has "
                    f"eigenvalues hessian1 to hessian{len(shape)}"
                )
            limit = context_limit(shape)
            if f.radius() > limit:
                raise SegmenterError(
                    f"{WHERE}: feature {f.name!r} reads {f.radius()} px per side, more than "
                    f"this image allows ({limit}); use a smaller scale"
                )

    def working_bytes(self, ndim: int) -> float:
        """A float32 plane per feature, and the labels."""
        return 4.0 * len(self.features) + 16.0

    def halo(self, ndim: int) -> tuple[int, ...]:
        radius = features.halo(self.features, ndim)[0] if ndim else 0
        return halo_for(radius, self.opts.diameter, ndim)

    def prepare(self, stats: ImageStats) -> Mapping[str, Any]:
        return {"statistics": features.statistics(stats, self.statistic_names)}

    def segment(self, block: NDArray[np.float32], params: Mapping[str, Any]) -> SegmentResult:
        planes = features.compute(block, self.features)
        index = {f.name: i for i, f in enumerate(self.features)}
        constants: Mapping[str, float] = params["statistics"]
        cache: dict[str, NDArray[np.float64]] = {}

        def values(name: str) -> NDArray[np.float64] | float:
            if name in constants:
                return float(constants[name])
            key = features.parse_feature(name).name
            if key not in cache:
                cache[key] = planes[index[key]].astype(np.float64)
            return cache[key]

        semantic = evaluate(self.root, values, block.shape)
        things = label_things(semantic, self.things, params.get("core"))
        return SegmentResult(semantic, things, sequential=True)

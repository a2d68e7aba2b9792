"""Compile segpipe's numba kernels ahead of time into numba's on-disk cache.

The container images run ``python -m segpipe.precompile`` when they are built, with
``NUMBA_CACHE_DIR`` set, so a new worker pod loads machine code on its first block
instead of compiling it. Each kernel is called once on tiny inputs of every type a run
passes it: the image dtypes the readers accept, uint32 and uint64 global ids, float32
and float64 histogram edges.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "IMAGE_DTYPES",
    "KERNEL_MODULES",
    "LABEL_DTYPES",
    "Compiled",
    "cached_kernels",
    "main",
    "precompile",
]

KERNEL_MODULES = ("segpipe.kernels", "segpipe.features", "segpipe.forest.predict")
"""The modules that hold ``numba.njit(cache=True)`` kernels."""

IMAGE_DTYPES = (
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float32",
    "float64",
)
"""Pixel types a block keeps into the per-object sums (`segpipe.kernels.object_stats`);
float16, which the readers also accept, numba does not compile."""

LABEL_DTYPES = ("uint32", "uint64")
"""Global instance ids: uint32 until their count would overflow it."""


@dataclass(frozen=True)
class Compiled:
    """One kernel after `precompile`: its signatures, how many were compiled and how many
    loaded from the cache, and the cache's folder."""

    name: str
    signatures: int
    compiled: int
    loaded: int
    cache: str


def cached_kernels() -> dict[str, Any]:
    """Every ``cache=True`` numba dispatcher of `KERNEL_MODULES`, by qualified name."""
    from numba.core.registry import CPUDispatcher

    out: dict[str, Any] = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            # a dispatcher without caching has no cache path
            if isinstance(value, CPUDispatcher) and value.stats.cache_path is not None:
                out[f"{module_name}.{name}"] = value
    return out


def _kernels_module() -> None:
    from segpipe import kernels

    image = np.zeros((3, 4, 5), np.float32)
    kernels.gaussian(image, 1.0)  # both passes: along a middle axis and the last
    for edges_dtype in (np.float32, np.float64):
        edges: NDArray[np.floating[Any]] = np.linspace(0, 1, 5, dtype=edges_dtype)
        kernels.histogram(np.zeros(8, edges_dtype), edges[0], edges[-1], edges)
    local = np.zeros((2, 3), np.uint32)  # a block's local ids (segment stage)
    semantic = np.zeros((2, 3), np.uint8)
    known = np.zeros(256, np.bool_)
    known[0] = True
    for ids in LABEL_DTYPES:
        instances = kernels.lookup(local, np.zeros(1, ids))
        kernels.panoptic(semantic, instances, 1 << 16, np.zeros(256, np.bool_), known)
    for pixels in IMAGE_DTYPES:
        kernels.object_stats(local, semantic, np.zeros((2, 3), pixels), 0)
    grey, table = np.zeros((2, 3), np.uint8), np.zeros(1, np.uint8)
    for ids in ("uint8", *LABEL_DTYPES):  # previews outline instances or classes
        kernels.outlined(grey, np.zeros((2, 3), ids), table)


def _features_module() -> None:
    from segpipe import features

    for ndim in (2, 3):
        bank = features.parse_features(features.default_features(ndim), ndim=ndim)
        features.compute(np.zeros((4,) * ndim, np.float32), bank)


def _forest_module() -> None:
    from segpipe.forest import predict
    from segpipe.forest.model import ClassEntry, ForestMeta, ForestModel

    # One tree of one split: the node arrays in the dtypes a forest file is loaded in.
    meta = ForestMeta(
        features=["intensity"],
        classes=[1, 2],
        catalogue=[ClassEntry(id=1, name="a", thing=False), ClassEntry(id=2, name="b", thing=True)],
        ndim=2,
    )
    model = ForestModel(
        feature=np.array([0, -1, -1], np.int32),
        threshold=np.array([0.5, 0.0, 0.0]),
        left=np.array([1, -1, -1], np.int32),
        right=np.array([2, -1, -1], np.int32),
        value=np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
        roots=np.array([0, 3], np.int64),
        meta=meta,
    )
    x = np.zeros((1, 2, 3), np.float32)
    predict.predict(model, x)
    predict.predict_things(model, x)


CALLS: dict[str, Callable[[], None]] = {
    "segpipe.kernels": _kernels_module,
    "segpipe.features": _features_module,
    "segpipe.forest.predict": _forest_module,
}
"""Per module of `KERNEL_MODULES`: the calls that compile its kernels for every type."""


def precompile() -> list[Compiled]:
    """Compile (or load from numba's cache) every kernel for every type a run uses.

    Returns
    -------
    list of Compiled
        One per kernel of `cached_kernels`, with the signatures this process compiled
        and those it found in the cache (``NUMBA_CACHE_DIR``, else ``__pycache__``
        beside the module, else the user's cache).
    """
    for module_name in KERNEL_MODULES:
        CALLS[module_name]()
    out = []
    for name, kernel in cached_kernels().items():
        stats = kernel.stats
        out.append(
            Compiled(
                name,
                len(kernel.signatures),
                sum(stats.cache_misses.values()),
                sum(stats.cache_hits.values()),
                stats.cache_path,
            )
        )
    return out


def main() -> int:
    """``python -m segpipe.precompile``: compile, then one line per kernel; exit status 1
    if a kernel has no signature (it would compile on a worker's first block)."""
    from numba.core import config

    t0 = time.perf_counter()
    done = precompile()
    for kernel in done:
        print(
            f"{kernel.name}: {kernel.signatures} signature(s), {kernel.compiled} compiled, "
            f"{kernel.loaded} from the cache"
        )
    caches = sorted({k.cache for k in done})
    cpu = getattr(config, "CPU_NAME", None) or "host"  # NUMBA_CPU_NAME
    print(
        f"{len(done)} kernels in {time.perf_counter() - t0:.1f} s for CPU {cpu}; "
        f"cache: {', '.join(caches)}"
    )
    missing = [k.name for k in done if k.signatures == 0]
    if missing:
        print(f"not compiled: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

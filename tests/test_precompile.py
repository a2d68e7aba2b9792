"""`python -m segpipe.precompile` fills numba's cache with what a run needs: a fresh
process that then segments images of every kind loads each kernel from the cache and
compiles none (numba's own cache statistics, not timings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from segpipe import precompile

ROOT = Path(__file__).resolve().parents[1]

# A real run in one process (the engine inline: the kernels run here, where their
# statistics are), 2D images of several dtypes and a volume, then the pixel classifier's
# features and a forest fitted by scikit-learn; prints each kernel's cache statistics.
RUN = """
import json, sys
from pathlib import Path
import numpy as np, tifffile
from sklearn.ensemble import RandomForestClassifier
from segpipe import features, pipeline, precompile, synthetic
from segpipe.config import block_tile
from segpipe.engine import Inline
from segpipe.forest import model as forest_model, predict
from segpipe.image import ImagePlan
from segpipe.io.readers import open_source
from segpipe.io.store import open_output
from segpipe.segmenters import get_segmenter

tmp = Path(sys.argv[1])
image = tifffile.imread(synthetic.write_tiff(tmp / "source.tif", (160, 150), seed=1))
paths = []
for dtype in ("uint8", "uint16", "int16", "float32", "float64"):
    path = tmp / f"{dtype}.tif"
    tifffile.imwrite(path, (image // 256 if dtype == "uint8" else image).astype(dtype))
    paths.append(path)
paths.append(synthetic.write_tiff(tmp / "volume.tif", (6, 80, 70), seed=2))
out = tmp / "out.zarr"
open_output(out, {"test": "precompile"}).release()
segmenter = get_segmenter("otsu")
plans = []
for path in paths:
    spec = open_source(str(path))
    plans.append(ImagePlan(spec, str(out), block_tile(64, len(spec.shape), spec.shape), segmenter))
outcomes = pipeline.run_images(Inline(), plans)
assert len(outcomes) == len(paths), outcomes

plane = np.asarray(image[:32, :32], np.float32)
for block in (plane, np.stack([plane, plane, plane])):
    bank = features.parse_features(features.default_features(block.ndim), ndim=block.ndim)
    features.compute(block, bank)
rng = np.random.default_rng(0)
x = rng.random((200, 2), np.float32)
fitted = RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(x, x[:, 0] > 0.5)
meta = forest_model.ForestMeta(
    features=["intensity", "gaussian_1"],
    classes=[1, 2],
    catalogue=[{"id": 1, "name": "bg", "thing": False}, {"id": 2, "name": "cell", "thing": True}],
    ndim=2,
)
forest = forest_model.from_sklearn(fitted, meta)
predict.predict(forest, np.ascontiguousarray(x.T.reshape(2, 10, 20)))
predict.predict_things(forest, np.ascontiguousarray(x.T.reshape(2, 10, 20)))

print(json.dumps({
    name: {
        "hits": sum(k.stats.cache_hits.values()),
        "misses": sum(k.stats.cache_misses.values()),
    }
    for name, k in precompile.cached_kernels().items()
}))
"""


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    return {**env, "NUMBA_CACHE_DIR": str(cache)}


def test_a_run_after_precompile_loads_every_kernel_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    first = subprocess.run(
        [sys.executable, "-m", "segpipe.precompile"],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    kernels = precompile.cached_kernels()
    for name in kernels:  # an empty cache: each kernel compiled, none loaded
        (line,) = [ln for ln in first.stdout.splitlines() if ln.startswith(f"{name}:")]
        assert re.search(r": (\d+) signature\(s\), \1 compiled, 0 from the cache$", line), line
    assert f"cache: {cache}" in first.stdout
    assert list(cache.rglob("*.nbi")) and list(cache.rglob("*.nbc"))

    work = tmp_path / "run"
    work.mkdir()
    second = subprocess.run(
        [sys.executable, "-c", RUN, str(work)],
        cwd=ROOT,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    stats = json.loads(second.stdout.splitlines()[-1])
    assert sorted(stats) == sorted(kernels)
    compiled = {name: s["misses"] for name, s in stats.items() if s["misses"]}
    assert compiled == {}, f"compiled at run time (precompile misses these types): {compiled}"
    unused = [name for name, s in stats.items() if not s["hits"]]
    assert unused == [], f"not exercised by the run: {unused}"


def test_precompile_knows_every_cached_kernel() -> None:
    """A new ``cache=True`` kernel in a module precompile does not visit would compile on
    each new worker: the modules that hold one are exactly `KERNEL_MODULES`."""
    holders = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "segpipe").rglob("*.py")
        if re.search(r"^@numba\.njit\([^)]*cache=True", path.read_text(encoding="utf-8"), re.M)
    }
    assert holders == set(precompile.KERNEL_MODULES)
    assert set(precompile.CALLS) == set(precompile.KERNEL_MODULES)
    assert len(precompile.cached_kernels()) >= 10

"""`forest` end to end against scikit-image's pixel classifier on the whole image, side by side.

Usage: python -m bench.forest [--sizes 4096] [--repeats 3] [--tile 2048] [--workdir DIR]
                              [--trees 100] [--max-depth 12]

Both classifiers are trained the same way: two synthetic 512² nuclei images with brush
strokes over 2 % of their pixels (1 background, 2 nucleus), a scikit-learn
``RandomForestClassifier`` with the same trees, depth and seed; scikit-image's on its
``multiscale_basic_features`` (``fit_segmenter``), segpipe's on the same 24 features of
its own bank (`segpipe train --arch forest` defaults). Then, for each size, on the same
synthetic tiled uint16 TIFF, medians over ``--repeats`` runs of:

- scikit-image on the whole image in one process: ``multiscale_basic_features`` +
  ``predict_segmenter`` (features and prediction, no I/O: the image is read before the
  clock starts), both on every core (``workers`` and the forest's ``n_jobs``: 2 here);
- segpipe's stages (`pipeline.run_image`, TIFF in, OME-Zarr out: ingest, statistics,
  features + trees per block with their context, stitching of instances, labels,
  panoptic, tables, previews) on a LocalCluster of 2 worker processes × 1 thread,
  started before the clock, as `bench.throughput` runs them.

Each side's foreground IoU against the ground truth and their agreement are printed too.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from bench.common import machine
from segpipe import synthetic
from segpipe.forest.train import ForestTrainConfig, synthetic_scribbled, train_forest


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1))


def train_both(workdir: Path, trees: int, max_depth: int, seed: int = 0) -> tuple[Path, Any]:
    """segpipe's forest file and scikit-image's fitted classifier, from the same scribbles."""
    from skimage.feature import multiscale_basic_features
    from skimage.future import fit_segmenter
    from sklearn.ensemble import RandomForestClassifier

    model = workdir / "forest.npz"
    config = ForestTrainConfig(out=str(model), trees=trees, max_depth=max_depth, seed=seed)
    result = train_forest(config)
    data = synthetic_scribbled(
        config.images, (config.size, config.size), seed=seed, fraction=config.fraction
    )
    features = np.concatenate(
        [multiscale_basic_features(d.image.astype(np.uint16))[d.scribbles > 0] for d in data]
    )
    marks = np.concatenate([d.scribbles[d.scribbles > 0] for d in data])
    clf = RandomForestClassifier(
        n_estimators=trees, max_depth=max_depth, random_state=seed, n_jobs=-1
    )
    # fit_segmenter takes one image: the scribbled pixels of both, as one row of samples
    fit_segmenter(marks[np.newaxis], features[np.newaxis], clf)
    print(
        f"trained: segpipe {result.model.meta.card['nodes']} nodes, scikit-learn "
        f"{sum(e.tree_.node_count for e in clf.estimators_)} nodes; {len(marks)} scribbled px",
        flush=True,
    )
    return model, clf


def _skimage(image: np.ndarray, clf: Any) -> tuple[float, np.ndarray]:
    from skimage.feature import multiscale_basic_features
    from skimage.future import predict_segmenter

    t0 = time.perf_counter()
    features = multiscale_basic_features(image)
    classes = predict_segmenter(features, clf)
    seconds = time.perf_counter() - t0
    del features
    return seconds, classes


def _segpipe(client: Any, path: Path, out: Path, tile: int, model: Path) -> tuple[float, Any]:
    import zarr

    from segpipe.image import ImagePlan
    from segpipe.io.readers import open_source
    from segpipe.pipeline import run_image
    from segpipe.segmenters import get_segmenter

    shutil.rmtree(out, ignore_errors=True)
    source = open_source(str(path))
    plan = ImagePlan(source, str(out), (tile, tile), get_segmenter("forest", model=str(model)))
    t0 = time.perf_counter()
    result = run_image(client, plan)
    seconds = time.perf_counter() - t0
    semantic = zarr.open_array(str(out / source.name / "labels" / "semantic" / "0"))
    return seconds, (np.asarray(semantic[:]), result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--max-depth", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segpipe-bench"))
    args = parser.parse_args(argv)
    import dask
    from distributed import Client, LocalCluster

    from segpipe.backends import worker_env_config

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    model, clf = train_both(args.workdir, args.trees, args.max_depth)
    rows = []
    with (
        dask.config.set(worker_env_config()),
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        for size in args.sizes:
            path = args.workdir / f"nuclei-{size}.tif"
            if not path.exists():
                synthetic.write_tiff(path, (size, size), tile=512, seed=1)
            image = tifffile.imread(path)
            truth = synthetic.render((slice(0, size), slice(0, size)), seed=1)[1] > 0
            out = args.workdir / f"forest-{size}.zarr"
            sk, sp = [], []
            for _ in range(args.repeats):
                seconds, sk_classes = _skimage(image, clf)
                sk.append(seconds)
                seconds, (sp_classes, result) = _segpipe(client, path, out, args.tile, model)
                sp.append(seconds)
                print(
                    f"{size}²: scikit-image {sk[-1]:.2f} s, segpipe forest {sp[-1]:.2f} s "
                    f"(stages: {', '.join(f'{k} {v:.2f}' for k, v in result.stages.items())})",
                    flush=True,
                )
            sk_iou, sp_iou = _iou(sk_classes == 2, truth), _iou(sp_classes == 2, truth)
            agree = float(np.mean(sk_classes == sp_classes))
            row = (size, statistics.median(sk), statistics.median(sp), sk_iou, sp_iou, agree)
            rows.append(row)
            print(
                f"{size}²: medians scikit-image {row[1]:.2f} s, segpipe {row[2]:.2f} s: "
                f"{row[1] / row[2]:.2f}x; foreground IoU {sk_iou:.4f} / {sp_iou:.4f}; "
                f"pixels agreeing {agree:.4%}",
                flush=True,
            )
    print("\nsize   scikit-image s  segpipe forest s  speed-up  IoU scikit-image  IoU segpipe")
    for size, sk_s, sp_s, sk_iou, sp_iou, _ in rows:
        print(
            f"{size:<6} {sk_s:>14.2f} {sp_s:>17.2f} {sk_s / sp_s:>9.2f} {sk_iou:>16.4f} "
            f"{sp_iou:>12.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

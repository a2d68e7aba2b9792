"""Test helpers shared by several test modules (independent references live in the tests)."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe.segmenters import Segmenter
from segpipe.stats import Extrema, ImageStats, block_histogram, hist_range, merge_histograms


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images have the same background and a bijection between ids."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    m = a > 0
    if not m.any():
        return True
    pairs = np.unique(np.stack([a[m].astype(np.int64), b[m].astype(np.int64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def whole_image_stats(image: NDArray[np.float32]) -> ImageStats:
    """Statistics of the whole image, as the pipeline computes them over its blocks."""
    extrema = Extrema.of(image)
    lo, hi = hist_range(extrema)
    return merge_histograms([block_histogram(image, lo, hi)], extrema)


def panoptic_quality(truth: NDArray[np.integer], labels: NDArray[np.integer]) -> float:
    """PQ = sum of matched IoUs / (TP + FP/2 + FN/2), objects matched at IoU > 0.5."""
    both = (truth > 0) & (labels > 0)
    pairs, inter = np.unique(
        np.stack([truth[both], labels[both]], axis=1).astype(np.int64), axis=0, return_counts=True
    )
    t_ids, t_sizes = np.unique(truth[truth > 0], return_counts=True)
    l_ids, l_sizes = np.unique(labels[labels > 0], return_counts=True)
    if len(pairs) == 0:
        return 0.0 if len(t_ids) + len(l_ids) else 1.0
    union = (
        t_sizes[np.searchsorted(t_ids, pairs[:, 0])]
        + l_sizes[np.searchsorted(l_ids, pairs[:, 1])]
        - inter
    )
    iou = inter / union
    matched = iou[iou > 0.5]  # IoU > 0.5 makes each match unique
    tp = len(matched)
    fp, fn = len(l_ids) - tp, len(t_ids) - tp
    return float(matched.sum() / (tp + fp / 2 + fn / 2))


def segment_whole(segmenter: Segmenter, image: NDArray[Any]) -> NDArray[np.integer]:
    """Instances of the whole image in one block, ``prepare`` fed its real statistics."""
    smoothed = segmenter.preprocess(image.astype(np.float32))
    params = segmenter.prepare(whole_image_stats(smoothed))
    instances = segmenter.segment(smoothed, params).instances
    assert instances is not None
    return instances


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OBJECT_RUN_ARGS = ("--segmenter", "watershed", "--tile", "256", "--quiet")
"""The run the object-storage tests compare with a local one."""
RESULT_ARRAYS = (
    "0",
    "1",
    "labels/instances/0",
    "labels/instances/1",
    "labels/semantic/0",
    "labels/panoptic/0",
)
"""The arrays of an image's result those tests compare."""
RESULT_TABLES = ("tables/objects.parquet", "tables/segments.parquet")


def segpipe_run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``segpipe run ARGS`` in a new process of this environment, its output captured."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("segpipe")), "run", *args],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def tiled_instances(
    client: Any, out: Any, source: Any, segmenter: Segmenter, tiles: Sequence[int]
) -> dict[int, NDArray[np.integer]]:
    """Instance labels of ``source`` through the pipeline at each tile size."""
    from pathlib import Path

    import zarr

    from segpipe.image import ImagePlan
    from segpipe.pipeline import run_image

    labels = {}
    for tile in tiles:
        root = Path(out) / f"tile{tile}"
        run_image(client, ImagePlan(source, str(root), (tile, tile), segmenter))
        group = root / source.name / "labels" / "instances" / "0"
        labels[tile] = np.asarray(zarr.open_array(str(group))[:])
    return labels


def once_exists(path: Path, action: Callable[[], None], timeout: float = 60) -> threading.Thread:
    """A started thread that runs ``action`` as soon as ``path`` exists (or after
    ``timeout`` seconds): a fault injected at a chosen point of a run."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        action()

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def fill_disk(path: Path) -> None:
    """Write ``path`` until its file system is full (the write, or the open of a disk the
    run has already filled, fails quietly)."""
    try:
        with open(path, "wb") as fh:
            while True:
                fh.write(b"\0" * 2**16)
                fh.flush()
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise


def start_prefect_server(home: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A real ``prefect server start`` on 127.0.0.1:``port`` (its own session: stop it
    with `os.killpg`), returned once its API answers."""
    import httpx

    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and server.poll() is None, "prefect server did not start"
        time.sleep(0.5)


STRICT_NGFF = ("image", "label", "plate", "well")


def ngff_valid(path: str | Path, model: str) -> None:
    """Check the group at ``path`` against NGFF 0.5's own JSON schema for ``model``
    (``image``, ``label``, ``plate``, ``well``, ``bf2raw``: as bundled by ngff-zarr),
    strict where the spec has a strict schema; raises on a violation."""
    import json

    from ngff_zarr import validate

    attributes = json.loads((Path(path) / "zarr.json").read_text())["attributes"]
    validate(attributes, version="0.5", model=model, strict=model in STRICT_NGFF)


def cluster_spec_app() -> Any:
    """A typer app holding ``segpipe cluster-spec`` and a second command (typer then
    dispatches by name, as segpipe's app does)."""
    import typer

    from flows.cluster_cli import register

    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:
        """Nothing."""

    return app

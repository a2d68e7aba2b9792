"""Shared fixtures: one real LocalCluster and one Prefect test API per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# Prefect reads its settings at import: give the session its own home first.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="segpipe-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def cluster_address() -> Iterator[str]:
    """Address of a real LocalCluster (one worker process, two threads) on loopback."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def client(cluster_address: str) -> Iterator[object]:
    from distributed import Client

    with Client(cluster_address) as c:
        yield c


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """Prefect's test harness (a real, temporary API on SQLite), started once."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images have the same background and a bijection between ids."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    m = a > 0
    if not m.any():
        return True
    pairs = np.unique(np.stack([a[m].astype(np.int64), b[m].astype(np.int64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def panoptic_quality(pred: np.ndarray, truth: np.ndarray) -> float:
    """PQ of two instance label images with IoU > 0.5 matching (Kirillov et al.)."""
    p, t = pred.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    both = (p > 0) & (t > 0)
    pairs, inter = np.unique(np.stack([p[both], t[both]]), axis=1, return_counts=True)
    size_p, size_t = np.bincount(p), np.bincount(t)
    iou = inter / (size_p[pairs[0]] + size_t[pairs[1]] - inter)
    tp = iou > 0.5
    n_pred, n_true = len(np.unique(p[p > 0])), len(np.unique(t[t > 0]))
    fp, fn = n_pred - tp.sum(), n_true - tp.sum()
    denom = tp.sum() + 0.5 * fp + 0.5 * fn
    return float(iou[tp].sum() / denom) if denom else 1.0


@pytest.fixture
def run_cli(prefect_api: None, cluster_address: str):  # type: ignore[no-untyped-def]
    """Invoke ``segpipe`` in-process (real Prefect API, real cluster); returns the Result."""
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()

    def invoke(*args: str, cluster: bool = True):  # type: ignore[no-untyped-def]
        argv = ["run", "--quiet", *args]
        if cluster and args and args[0] != "--config":
            argv += ["--cluster", cluster_address]
        return runner.invoke(app, argv, catch_exceptions=False)

    return invoke


@pytest.fixture
def tiff(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write an array as a TIFF in tmp_path and return the path."""
    import tifffile

    def write(name: str, data: np.ndarray, **kwargs: object) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, data, **kwargs)
        return path

    return write

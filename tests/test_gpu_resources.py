"""Deep segment blocks go to workers advertising a ``GPU`` resource; classical ones to any.

Real ``dask scheduler`` and two ``dask worker`` processes, one started with
``--resources GPU=1`` (no CUDA is needed: the resource is what the scheduler
sees); the provenance table says which worker ran each segment block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from segpipe import synthetic
from segpipe.deep import checkpoint, provenance
from segpipe.deep.nets import NetSpec, build
from segpipe.engine import gpu_resources
from segpipe.image import ImagePlan
from segpipe.io.readers import open_source
from segpipe.pipeline import run_image
from segpipe.segmenters import get_segmenter
from tests.helpers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mixed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(scheduler address, address of the GPU-resource worker)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    cwd = tmp_path_factory.mktemp("gpu-workers")
    dask = str(Path(sys.executable).parent / "dask")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    common = ["--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    for extra in (["--resources", "GPU=1", "--name", "gpu"], ["--name", "cpu"]):
        procs.append(
            subprocess.Popen(
                [dask, "worker", address, *common, *extra],
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        )
    from distributed import Client

    deadline = time.time() + 60
    gpu = ""
    while not gpu:
        try:
            with Client(address, timeout="2s") as c:
                workers = c.scheduler_info()["workers"]
                if len(workers) == 2:
                    gpu = next(a for a, w in workers.items() if w.get("resources", {}).get("GPU"))
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("dask scheduler/workers did not start")
        time.sleep(0.3)
    yield address, gpu
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def _plan(tmp_path: Path, segmenter, name: str) -> ImagePlan:  # type: ignore[no-untyped-def]
    path = synthetic.write_tiff(tmp_path / "in" / f"{name}.tif", (256, 256), tile=64, seed=2)
    return ImagePlan(open_source(path), str(tmp_path / "out.zarr"), (64, 64), segmenter)


def test_deep_blocks_run_on_the_gpu_worker(mixed_cluster: tuple[str, str], tmp_path: Path) -> None:
    from distributed import Client

    address, gpu = mixed_cluster
    spec = NetSpec(arch="unet", depth=2, width=4)
    torch.manual_seed(0)
    model = checkpoint.save(
        tmp_path / "tiny.pt", build(spec).eval(), checkpoint.ModelMeta(spec=spec)
    )
    seg = get_segmenter("unet", model=str(model), tile=64, diameter=8)
    plan = _plan(tmp_path, seg, "deep")
    with Client(address) as client:
        assert gpu_resources(client, seg) == {"GPU": 1}
        run_image(client, plan)
        logs = client.get_worker_logs()
    said = {w: [m for _, m in lines if "inference on" in m] for w, lines in logs.items()}
    assert len(said[gpu]) == 1 and "inference on cpu" in said[gpu][0], said  # once per worker
    assert not any(v for w, v in said.items() if w != gpu), said
    table = provenance.read_table(plan.provenance)
    assert len(table["block"]) == 16
    assert set(table["worker"]) == {gpu}, table["worker"]
    assert min(table["tiles"]) >= 1 and set(table["batch"]) == {4}


def test_classical_blocks_run_on_every_worker(
    mixed_cluster: tuple[str, str], tmp_path: Path
) -> None:
    from distributed import Client

    address, _ = mixed_cluster
    seg = get_segmenter("otsu", sigma=0)
    plan = _plan(tmp_path, seg, "classical")
    with Client(address) as client:
        assert gpu_resources(client, seg) is None
        workers = set(client.scheduler_info()["workers"])
        run_image(client, plan)
    table = provenance.read_table(plan.provenance)
    assert len(table["block"]) == 16
    assert set(table["worker"]) == workers, table["worker"]
    assert set(table["device"]) == {"cpu"} and set(table["tiles"]) == {1}


def test_packed_small_images_of_a_deep_segmenter_run_on_the_gpu_worker(
    mixed_cluster: tuple[str, str], tmp_path: Path
) -> None:
    """Images of one block are packed into tasks that run every stage: for a deep
    segmenter those tasks ask for the GPU too."""
    from distributed import Client

    from segpipe.io.store import open_output
    from segpipe.pipeline import run_images

    address, gpu = mixed_cluster
    spec = NetSpec(arch="unet", depth=2, width=4)
    torch.manual_seed(0)
    model = checkpoint.save(
        tmp_path / "tiny.pt", build(spec).eval(), checkpoint.ModelMeta(spec=spec)
    )
    seg = get_segmenter("unet", model=str(model), tile=64, diameter=8)
    out = tmp_path / "out.zarr"
    open_output(out, {"test": "packs"}).release()
    plans = []
    for i in range(4):
        path = synthetic.write_tiff(tmp_path / "in" / f"small{i}.tif", (96, 96), seed=i)
        plans.append(ImagePlan(open_source(path), str(out), (128, 128), seg))
    with Client(address) as client:
        outcomes = run_images(client, plans)
    assert all(o.result is not None for o in outcomes), outcomes
    for plan in plans:
        table = provenance.read_table(plan.provenance)
        assert set(table["worker"]) == {gpu}, table["worker"]

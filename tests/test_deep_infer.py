"""Tiled inference through the pipeline agrees with one forward call on the whole image.

The reference is independent of segpipe's inference code: the whole image,
normalised with numpy's own percentiles, reflect-padded to the network's
multiple and run through the network once with plain torch.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from skimage.segmentation import find_boundaries

from segpipe import synthetic
from segpipe.deep import checkpoint, infer, provenance
from segpipe.deep.nets import NetSpec, build
from segpipe.image import ImagePlan
from segpipe.io.readers import open_source
from segpipe.pipeline import run_image
from segpipe.segmenters import get_segmenter
from segpipe.segmenters.deep import DeepResult

pytestmark = pytest.mark.integration

SPECS = {
    "unet": NetSpec(arch="unet", depth=3, width=8),
    "segnet": NetSpec(arch="segnet", depth=3, width=8),
    "fcn": NetSpec(arch="fcn", depth=3, width=8),
    "unet3d": NetSpec(arch="unet", ndim=3, depth=2, width=4),
}


def _train(spec: NetSpec, steps: int) -> torch.nn.Module:
    """A few Adam steps on synthetic nuclei, so the classes are not constant and ties rare."""
    torch.manual_seed(0)
    net = build(spec)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    shape = (64, 64) if spec.ndim == 2 else (24, 24, 24)
    for i in range(steps):
        image, labels = synthetic.render(tuple(slice(i * 64, i * 64 + n) for n in shape), seed=3)
        lo, hi = np.percentile(image, [1, 99.8])
        x = torch.from_numpy(((image - lo) / (hi - lo)).astype(np.float32))[None, None]
        y = np.where(find_boundaries(labels, mode="inner"), 2, (labels > 0).astype(np.int64))
        loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(y)[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: checkpoint.save(
            root / f"{name}.pt",
            _train(spec, steps=15),
            checkpoint.ModelMeta(spec=spec, normalise=(1.0, 99.8)),
        )
        for name, spec in SPECS.items()
    }


def _whole(model: Path, image: np.ndarray) -> np.ndarray:
    """Nucleus (interior or boundary) where the argmax of one forward call on the whole
    normalised, reflect-padded image is not background: the output's two classes."""
    meta = checkpoint.read_meta(model)
    assert meta is not None
    net = build(meta.spec)
    net.load_state_dict(torch.load(model, weights_only=True))
    net.eval()
    lo, hi = np.percentile(image, meta.normalise)
    x = ((image.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    m = meta.spec.multiple
    padded = np.pad(x, [(0, -n % m) for n in x.shape], mode="reflect")
    with torch.inference_mode():
        logits = net(torch.from_numpy(padded)[None, None])[0]
    nucleus = logits.argmax(0).numpy() != 0
    return nucleus.astype(np.uint8)[tuple(slice(0, n) for n in image.shape)]


def _pipeline(client, tmp: Path, image: np.ndarray, tile, seg):  # type: ignore[no-untyped-def]
    path = tmp / "in" / "img.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image)
    plan = ImagePlan(open_source(path), str(tmp / "out.zarr"), tile, seg)
    run_image(client, plan)
    group = tmp / "out.zarr" / "img"
    semantic = np.asarray(zarr.open_array(str(group / "labels/semantic/0"))[:])
    instances = np.asarray(zarr.open_array(str(group / "labels/instances/0"))[:])
    return semantic, instances, provenance.read_table(plan.provenance)


@pytest.mark.parametrize("blend", ["crop", "gaussian"])
@pytest.mark.parametrize("arch", ["unet", "segnet", "fcn"])
def test_tiled_equals_whole_image(
    client, models: dict[str, Path], tmp_path: Path, arch: str, blend: str
) -> None:
    # Noise that never clips to 0: a spike at 0 would sit inside the first histogram bin,
    # where the global percentile interpolates it away from numpy's (a normalisation
    # difference, not a tiling one).
    image, _ = synthetic.render((slice(5, 305), slice(3, 263)), seed=5, noise=0.02)
    seg = get_segmenter(arch, model=str(models[arch]), tile=96, batch=3, blend=blend)
    # Blocks of 100 px: their read regions start off the network's 8-px grid (aligned
    # by the origin), and each block runs several network tiles.
    semantic, instances, table = _pipeline(client, tmp_path, image, (100, 100), seg)
    reference = _whole(models[arch], image)
    agree = float((semantic == reference).mean())
    print(f"{arch} {blend}: {agree:.5%} of pixels agree with the whole image")
    assert agree >= 0.999
    assert 0.05 < (reference == 1).mean() < 0.95  # a non-trivial prediction
    assert instances.max() > 10
    assert len(table["block"]) == 9 and min(table["tiles"]) > 1
    assert set(table["device"]) == {"cpu"} and set(table["batch"]) == {3}


def test_unet_3d_tiled_equals_whole_volume(client, models: dict[str, Path], tmp_path: Path) -> None:
    image, _ = synthetic.render((slice(0, 40), slice(0, 64), slice(4, 60)), seed=6, noise=0.02)
    seg = get_segmenter("unet", model=str(models["unet3d"]), tile=40, diameter=16)
    assert seg.halo(3) == (16, 16, 16)
    semantic, _, table = _pipeline(client, tmp_path, image, (24, 32, 32), seg)
    reference = _whole(models["unet3d"], image)
    agree = float((semantic == reference).mean())
    print(f"unet 3D: {agree:.5%} of voxels agree with the whole volume")
    assert agree >= 0.999
    assert 0.05 < (reference == 1).mean() < 0.95
    assert len(table["block"]) == 8 and min(table["tiles"]) > 1


def test_halo_covers_the_network_context(models: dict[str, Path]) -> None:
    seg = get_segmenter("unet", model=str(models["unet"]), diameter=0)
    spec = SPECS["unet"]
    (h, w) = seg.halo(2)
    assert h == w >= spec.context and h % spec.multiple == 0
    assert seg.halo(3) == (0, h, h)  # a 2D network runs plane by plane on a volume
    assert not seg.has_filter()


def test_tile_starts_stay_on_the_pooling_grid() -> None:
    for length in range(8, 400, 8):
        starts = infer.tile_starts(length, 96, 48)
        assert all(s % 8 == 0 for s in starts)
        assert starts[0] == 0 and starts[-1] + min(96, length) == length
        assert all(b - a <= 48 for a, b in itertools.pairwise(starts))


def test_normalisation_is_global_not_per_tile(models: dict[str, Path]) -> None:
    from segpipe.deep.postprocess import image_stats

    image, _ = synthetic.render((slice(0, 200), slice(0, 200)), seed=2, noise=0.02)
    seg = get_segmenter("unet", model=str(models["unet"]))
    params = seg.prepare(image_stats(image))
    lo, hi = np.percentile(image, [1, 99.8])
    assert params["lo"] == pytest.approx(lo, rel=0.01)
    assert params["hi"] == pytest.approx(hi, rel=0.01)
    # a dark tile of the image is scaled like the whole, not stretched to its own range
    dark = np.full((64, 64), image.min(), np.float32)
    result = seg.segment(dark, params)
    assert result.semantic is not None and (result.semantic == 0).all()


def test_worker_cache_loads_once_and_logs_one_line(
    models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    infer.clear_cache()
    infer._ANNOUNCED.clear()
    copy = tmp_path / "m.pt"
    copy.write_bytes(models["unet"].read_bytes())
    (tmp_path / "m.json").write_text(models["unet"].with_suffix(".json").read_text())
    with caplog.at_level(logging.INFO, logger="segpipe.deep.infer"):
        a = infer.load_runner(copy, device="cpu")
        b = infer.load_runner(copy, device="cpu")
        assert a is b
        later = time.time_ns() + 10**9
        os.utime(copy, ns=(later, later))  # a replaced file is loaded again
        c = infer.load_runner(copy, device="cpu")
        assert c is not a
    lines = [r.getMessage() for r in caplog.records if "inference on" in r.getMessage()]
    assert len(lines) == 1 and "cpu" in lines[0], lines


def test_provenance_survives_a_resume(client, tmp_path: Path) -> None:
    """Blocks kept from an interrupted run keep their records; recomputed ones get new ones."""
    from segpipe import lifecycle, stages

    path = synthetic.write_tiff(tmp_path / "in" / "img.tif", (192, 192), tile=64, seed=1)
    seg = get_segmenter("otsu", sigma=0)
    first = ImagePlan(open_source(path), str(tmp_path / "out.zarr"), (64, 64), seg)
    assert lifecycle.begin(first) == "fresh"
    stats = stages.statistics.statistics(client, first, stages.ingest.ingest(client, first))
    stages.segment.segment(client, first, stats)
    markers = first.markers("segment")
    for block_id in (1, 4, 7):  # as if the run died before these blocks finished
        markers.path(block_id).unlink()
    second = ImagePlan(open_source(path), str(tmp_path / "out.zarr"), (64, 64), seg)
    run_image(client, second)
    assert not markers.directory.exists()  # finish() removed the markers, not the table
    table = provenance.read_table(second.provenance)
    runs = dict(zip(table["block"], table["run"], strict=True))
    assert sorted(runs) == list(range(9))
    assert {b for b, r in runs.items() if r == second.token} == {1, 4, 7}
    assert {b for b, r in runs.items() if r == first.token} == {0, 2, 3, 5, 6, 8}
    assert all(w.startswith("tcp://") for w in table["worker"])
    assert set(table["device"]) == {"cpu"} and all(s > 0 for s in table["seconds"])


def test_2d_network_on_a_volume_runs_plane_by_plane(models: dict[str, Path]) -> None:
    image, _ = synthetic.render((slice(0, 3), slice(0, 72), slice(0, 80)), seed=4, noise=0.02)
    seg = get_segmenter("unet", model=str(models["unet"]), tile=96)
    params = {"lo": float(image.min()), "hi": float(image.max())}
    volume = seg.segment(image.astype(np.float32), params).semantic
    planes = [seg.segment(p.astype(np.float32), params).semantic for p in image]
    assert volume is not None and all(p is not None for p in planes)
    np.testing.assert_array_equal(volume, np.stack(planes))  # type: ignore[arg-type]


@pytest.mark.gpu  # `make test-gpu` on a CUDA machine; `make test` deselects it
def test_cuda_mixed_precision_agrees_with_float32_cpu(models: dict[str, Path]) -> None:
    image, _ = synthetic.render((slice(0, 300), slice(0, 260)), seed=5, noise=0.02)
    seg = get_segmenter("unet", model=str(models["unet"]), tile=96, device="cuda")
    lo, hi = np.percentile(image, [1, 99.8])
    params = {"lo": float(lo), "hi": float(hi)}
    result = seg.segment(image.astype(np.float32), params)
    assert isinstance(result, DeepResult) and result.device == "cuda"
    agree = float((result.semantic == _whole(models["unet"], image)).mean())
    print(f"unet on CUDA (autocast): {agree:.5%} of pixels agree with float32 on the CPU")
    assert agree >= 0.99

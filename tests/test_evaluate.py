"""`segpipe evaluate` against torchmetrics' PanopticQuality, hand-computed cases and naive
per-object references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi
from typer.testing import CliRunner

from segpipe import image as segpipe_image
from segpipe import pipeline, synthetic
from segpipe.errors import SegpipeError
from segpipe.evaluate import THRESHOLDS, evaluate, score
from segpipe.io.readers import open_source
from segpipe.panoptic import decode, parse_catalogue
from segpipe.segmenters import get_segmenter

CATALOGUE = parse_catalogue(
    [
        {"id": 0, "name": "background", "thing": False},
        {"id": 1, "name": "cell", "thing": True},
        {"id": 2, "name": "nucleus", "thing": True},
        {"id": 3, "name": "debris", "thing": False},
        {"id": 4, "name": "unlabelled", "thing": False},
    ]
)


def torchmetrics_pq(
    pred: tuple[np.ndarray, np.ndarray],
    truth: tuple[np.ndarray, np.ndarray],
    things: set[int],
    stuffs: set[int],
) -> tuple[np.ndarray, np.ndarray]:
    """(per-class [pq, sq, rq] rows in torchmetrics' order, averages [pq, sq, rq])."""
    torch = pytest.importorskip("torch")
    detection = pytest.importorskip("torchmetrics.detection")

    def tensor(sem: np.ndarray, inst: np.ndarray) -> Any:
        return torch.from_numpy(np.stack([sem, inst], axis=-1)[None].astype(np.int64))

    kwargs = {"things": things, "stuffs": stuffs, "allow_unknown_preds_category": True}
    p, t = tensor(*pred), tensor(*truth)
    per_class = detection.PanopticQuality(**kwargs, return_sq_and_rq=True, return_per_class=True)
    average = detection.PanopticQuality(**kwargs, return_sq_and_rq=True)
    return per_class(p, t).numpy().reshape(-1, 3), average(p, t).numpy().reshape(3)


def random_truth(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Things of classes 1-2 (blobs), stuff 3 (large patches), void 4, background 0."""
    blobs, _ = ndi.label(ndi.gaussian_filter(rng.normal(size=shape), 2) > 0.15)
    cls = rng.integers(1, 3, size=blobs.max() + 1)
    cls[0] = 0
    semantic = cls[blobs]
    patch = ndi.gaussian_filter(rng.normal(size=shape), 5)
    semantic[(patch < np.quantile(patch, 0.15)) & (semantic == 0)] = 3
    semantic[(patch > np.quantile(patch, 0.95)) & (semantic == 0)] = 4
    instances = np.where(np.isin(semantic, [1, 2]), blobs, 0)
    return semantic, instances


def perturbed(
    rng: np.random.Generator, semantic: np.ndarray, instances: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A prediction: objects eroded, dilated, dropped, relabelled, split; extras; noise."""
    sem, inst = semantic.copy(), instances.copy()
    for i in np.unique(instances[instances > 0]):
        m = inst == i
        if not m.any():
            continue
        r = rng.random()
        if r < 0.2:
            rim = m & ~ndi.binary_erosion(m)
            sem[rim], inst[rim] = 0, 0
        elif r < 0.35:
            grow = ndi.binary_dilation(m, iterations=2) & (inst == 0)
            sem[grow], inst[grow] = sem[m][0], i
        elif r < 0.45:
            sem[m], inst[m] = 0, 0
        elif r < 0.55:
            sem[m] = 3 - sem[m]
        elif r < 0.65:
            cols = np.nonzero(m)[-1]
            half = m & (np.arange(m.shape[-1]) > cols.mean())
            inst[half] = inst.max() + 1
    for _ in range(4):
        corner = [int(rng.integers(0, n - 5)) for n in sem.shape]
        box = tuple(slice(c, c + 4) for c in corner)
        sem[box], inst[box] = rng.integers(1, 3), inst.max() + 1
    noise = rng.random(sem.shape) < 0.02
    sem[noise] = rng.integers(0, 5, size=int(noise.sum()))
    inst[noise] = rng.integers(0, 5, size=int(noise.sum()))
    return sem, inst


@pytest.mark.parametrize("seed", range(12))
def test_pq_sq_rq_agree_with_torchmetrics_on_random_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (96, 88) if seed % 3 else (12, 40, 36)
    truth = random_truth(rng, shape)
    pred = perturbed(rng, *truth)
    ignore = (4,) if seed % 2 == 0 else ()
    tile = [None, 17, 5][seed % 3]  # one block, and blocks that cut objects
    ours = score(*pred, *truth, catalogue=CATALOGUE, ignore=ignore, tile=tile)
    things, stuffs = {1, 2}, {0, 3} | (set() if ignore else {4})
    per_class, average = torchmetrics_pq(pred, truth, things, stuffs)
    np.testing.assert_allclose([ours.pq, ours.sq, ours.rq], average, atol=1e-6, rtol=0)
    mine = {c.id: c for c in ours.classes}
    for row, cid in zip(per_class, sorted(things) + sorted(stuffs), strict=True):
        c = mine[cid]
        expected = [0.0, 0.0, 0.0] if c.pq is None else [c.pq, c.sq, c.rq]
        np.testing.assert_allclose(expected, row, atol=1e-6, rtol=0)
    assert sum(c.tp for c in ours.classes) > 5  # the cases match some segments


def row(*segments: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A 1×30 (class, instance) image from (start, stop, class, instance) runs."""
    sem, inst = np.zeros((1, 30), np.int64), np.zeros((1, 30), np.int64)
    for a, b, c, i in segments:
        sem[0, a:b], inst[0, a:b] = c, i
    return sem, inst


def test_hand_computed_case() -> None:
    # truth: A = 0:10, B = 12:16, C = 18:20 (class 1); prediction: A' = 0:8 (IoU 8/10),
    # B' = 13:17 (IoU 3/5), C missed, D' = 24:27 a false positive.
    truth = row((0, 10, 1, 1), (12, 16, 1, 2), (18, 20, 1, 3))
    pred = row((0, 8, 1, 7), (13, 17, 1, 8), (24, 27, 1, 9))
    m = score(*pred, *truth)
    background, cell = m.classes
    # background: truth 14 px, prediction 15 px, 10 in common -> IoU 10/19, matched
    assert (background.tp, background.fp, background.fn) == (1, 0, 0)
    assert background.pq == pytest.approx(10 / 19, abs=1e-12)
    assert (cell.tp, cell.fp, cell.fn) == (2, 1, 1)
    assert cell.sq == pytest.approx((0.8 + 0.6) / 2, abs=1e-12)
    assert cell.rq == pytest.approx(2 / 3, abs=1e-12)
    assert cell.pq == pytest.approx(0.7 * 2 / 3, abs=1e-12)
    assert m.pq == pytest.approx((10 / 19 + 0.7 * 2 / 3) / 2, abs=1e-12)
    assert m.pq_things == cell.pq and m.pq_stuff == background.pq
    # AP_t = TP_t / (TP_t + FP_t + FN_t), 3 predictions and 3 true objects:
    # t = .50, .55: 2 matches -> 2/4; t = .60-.75: only IoU .8 > t -> 1/5; t >= .80: 0
    assert cell.ap_per_threshold == pytest.approx([0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 0, 0, 0, 0])
    assert cell.ap == pytest.approx(0.18, abs=1e-12) and m.ap == cell.ap
    assert (cell.ap50, cell.ap75) == (pytest.approx(0.5), pytest.approx(0.2))
    assert background.ap is None  # stuff has no AP
    # pixel IoU: foreground 16 vs 15 px, 11 in common -> 11/20; background 10/19
    assert cell.iou == pytest.approx(11 / 20, abs=1e-12)
    assert m.miou == pytest.approx((11 / 20 + 10 / 19) / 2, abs=1e-12)
    _, average = torchmetrics_pq(pred, truth, {1}, {0})
    np.testing.assert_allclose([m.pq, m.sq, m.rq], average, atol=1e-6)


def test_hand_computed_void_case() -> None:
    # truth: A = 0:6 (class 1), void (class 4) 10:20, rest background.
    # prediction: A' = 0:4 + 10:12 (2 px on void): IoU 4 / (6 - 2 + 6 - 4) = 4/6 -> match;
    # E' = 14:19 lies on void: not a false positive; F' = 20:24 half on nothing: FP.
    truth = row((0, 6, 1, 1), (10, 20, 4, 0))
    pred = row((0, 4, 1, 5), (10, 12, 1, 5), (14, 19, 1, 6), (20, 24, 1, 7))
    m = score(*pred, *truth, catalogue=CATALOGUE, ignore=(4,))
    cell = next(c for c in m.classes if c.id == 1)
    assert (cell.tp, cell.fp, cell.fn) == (1, 1, 0)
    assert cell.sq == pytest.approx(4 / 6, abs=1e-12)
    assert 4 not in [c.id for c in m.classes]
    _, average = torchmetrics_pq(pred, truth, {1, 2}, {0, 3})
    np.testing.assert_allclose([m.pq, m.sq, m.rq], average, atol=1e-6)


def naive_ap(truth: np.ndarray, pred: np.ndarray) -> list[float]:
    """AP_t per threshold, one object pair at a time (class-agnostic, no void)."""
    t_ids = [int(i) for i in np.unique(truth) if i]
    p_ids = [int(i) for i in np.unique(pred) if i]
    ious = []
    for t in t_ids:
        for p in p_ids:
            a, b = truth == t, pred == p
            inter = np.logical_and(a, b).sum()
            if inter:
                ious.append(inter / np.logical_or(a, b).sum())
    out = []
    for th in THRESHOLDS:
        tp = sum(1 for v in ious if v > th)  # IoU > 0.5: at most one match per object
        out.append(tp / (len(t_ids) + len(p_ids) - tp))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_ap_agrees_with_a_naive_per_object_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    truth, _ = ndi.label(ndi.gaussian_filter(rng.normal(size=(64, 70)), 2) > 0.2)
    shift = ndi.shift(truth, (rng.integers(-2, 3), rng.integers(-2, 3)), order=0)
    pred = np.where(rng.random(truth.shape) < 0.5, shift, truth)
    pred[rng.random(truth.shape) < 0.05] = 0
    pred = ndi.grey_opening(pred, size=2) if seed % 2 else pred
    m = score(pred > 0, pred, truth > 0, truth, tile=13)
    cell = next(c for c in m.classes if c.id == 1)
    assert cell.ap_per_threshold == pytest.approx(naive_ap(truth, pred), abs=1e-12)
    assert 0 < cell.ap < 1


def test_pixel_iou_equals_numpy_masks() -> None:
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 4, size=(50, 60))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, size=truth.shape))
    zero = np.zeros_like(truth)
    cat = parse_catalogue([{"id": c, "name": f"c{c}", "thing": False} for c in range(4)])
    m = score(pred, zero, truth, zero, catalogue=cat, tile=16)
    for c in m.classes:
        a, b = truth == c.id, pred == c.id
        assert c.iou == pytest.approx(
            np.logical_and(a, b).sum() / np.logical_or(a, b).sum(), abs=1e-12
        )


# -- files and the command line ---------------------------------------------------------------


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory, client: Any) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    shape = (300, 260)
    image_path = synthetic.write_tiff(tmp / "cells.tif", shape, seed=6)
    _, truth = synthetic.render(tuple(slice(0, n) for n in shape), seed=6)
    truth_path = tmp / "truth.tif"
    tifffile.imwrite(truth_path, truth)
    seg = get_segmenter("watershed")
    plan = segpipe_image.ImagePlan(open_source(image_path), str(tmp / "out.zarr"), (96, 96), seg)
    pipeline.run_image(client, plan)
    return {"group": Path(plan.group), "truth": truth_path, "tmp": tmp}


def test_cli_scores_a_run_against_a_tiff_truth(segmented: dict[str, Path]) -> None:
    from flows.cli import app

    out = segmented["tmp"] / "scores.json"
    args = ["evaluate", str(segmented["group"]), str(segmented["truth"]), "--json", str(out)]
    result = CliRunner().invoke(app, [*args, "--tile", "64"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "foreground" in result.output and "PQ" in result.output
    scores = json.loads(out.read_text())
    sem, inst = decode(zarr.open_array(str(segmented["group"] / "labels/panoptic/0")))
    truth = tifffile.imread(segmented["truth"])
    _, average = torchmetrics_pq((sem, inst), (truth > 0, truth), {1}, {0})
    np.testing.assert_allclose([scores["pq"], scores["sq"], scores["rq"]], average, atol=1e-6)
    assert scores["pq"] > 0.8  # watershed finds the synthetic nuclei
    assert scores["extra"]["blocks"] == 25
    # the instance array alone, run on the cluster, scores the same
    direct = evaluate(segmented["group"] / "labels" / "instances", segmented["truth"])
    assert direct.pq == pytest.approx(scores["pq"], abs=1e-12)


def test_evaluate_on_the_cluster_equals_threads(segmented: dict[str, Path], client: Any) -> None:
    a = evaluate(segmented["group"], segmented["truth"], tile=100)
    b = evaluate(segmented["group"], segmented["truth"], client=client, tile=(128, 64))
    assert a.to_dict()["classes"] == b.to_dict()["classes"]


def test_bad_inputs_name_the_file(segmented: dict[str, Path], tmp_path: Path) -> None:
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((10, 10), np.uint16))
    with pytest.raises(SegpipeError, match=r"small\.tif has shape \(10, 10\)"):
        evaluate(segmented["group"], small)
    from flows.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "missing.tif"), str(small)])
    assert result.exit_code == 1
    assert "missing.tif: no such file" in result.output

"""`segpipe evaluate` names the classes it matches and warns where the two sides' class sets
differ; a 3-class deep model's output is background and nucleus, so a U-Net result scores
against a plain instance mask as its instances do (issue #19, part 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import zarr
from skimage.segmentation import find_boundaries
from typer.testing import CliRunner

from segpipe import image as segpipe_image
from segpipe import pipeline, synthetic
from segpipe.engine import Inline
from segpipe.evaluate import Labels, evaluate
from segpipe.io.readers import open_source
from segpipe.panoptic import decode, parse_catalogue
from segpipe.segmenters import get_segmenter
from tests.test_evaluate import torchmetrics_pq

SHAPE = (256, 320)
SEED = 20_002  # neither a training seed nor a model card's validation seed


def _truth(tmp: Path) -> tuple[Path, np.ndarray]:
    _, truth = synthetic.render(tuple(slice(0, n) for n in SHAPE), seed=SEED)
    path = tmp / "truth.tif"
    tifffile.imwrite(path, truth)
    return path, truth


def _panoptic(tmp: Path, semantic: np.ndarray, instances: np.ndarray, names: list[str]) -> Labels:
    """A panoptic TIFF (class * 10**6 + instance) with its classes named."""
    path = tmp / "pred.tif"
    tifffile.imwrite(path, semantic.astype(np.uint64) * 10**6 + instances.astype(np.uint64))
    catalogue = parse_catalogue(
        [{"id": i, "name": n, "thing": i != 0} for i, n in enumerate(names)]
    )
    return Labels(str(path), "panoptic", (open_source(path),), 10**6, catalogue)


def test_unet_scores_against_an_instance_mask_as_its_instances(tmp_path: Path) -> None:
    truth_path, truth = _truth(tmp_path)
    image = synthetic.write_tiff(tmp_path / "nuclei.tif", SHAPE, tile=128, seed=SEED)
    seg = get_segmenter("unet")
    assert seg.classes == ["background", "nucleus"]
    plan = segpipe_image.ImagePlan(open_source(image), str(tmp_path / "o.zarr"), (128, 128), seg)
    pipeline.run_image(Inline(), plan)
    m = evaluate(plan.group, truth_path)
    inst = np.asarray(zarr.open_array(str(Path(plan.group) / "labels/instances/0"))[:])
    # the reference: torchmetrics on the instance array alone, one thing class
    _, (pq, _, _) = torchmetrics_pq((inst > 0, inst), (truth > 0, truth), {1}, {0})
    assert m.pq is not None and abs(m.pq - float(pq)) < 0.05, (m.pq, pq)
    assert m.pq > 0.9
    assert m.extra["warnings"] == []
    assert [(c["id"], c["prediction"]) for c in m.extra["matched"]] == [
        (0, "background"),
        (1, "nucleus"),
    ]
    sem, _ = decode(zarr.open_array(str(Path(plan.group) / "labels/panoptic/0")))
    assert set(np.unique(sem)) <= {0, 1}


def test_training_layout_is_read_as_nuclei(tmp_path: Path) -> None:
    """A result written with the network's classes (segpipe before the nucleus output)."""
    truth_path, truth = _truth(tmp_path)
    # each nucleus: its inner rim boundary (2), the rest interior (1), one instance id
    rim = find_boundaries(truth, mode="inner")
    semantic = np.where(truth == 0, 0, np.where(rim, 2, 1))
    pred = _panoptic(tmp_path, semantic, truth, ["background", "interior", "boundary"])
    m = evaluate(pred, truth_path)
    assert m.pq == 1.0 and m.extra["warnings"] == []
    assert m.extra["mapped"] and "read as 1 nucleus" in m.extra["mapped"][0]


def test_a_class_the_truth_lacks_is_named_and_warned(tmp_path: Path) -> None:
    truth_path, truth = _truth(tmp_path)
    semantic = (truth > 0).astype(np.uint8)
    debris = np.zeros(SHAPE, np.uint32)
    debris[:6, :6] = 1  # one extra object of another class, on background
    semantic[:6, :6] = 2
    pred = _panoptic(tmp_path, semantic, np.where(debris > 0, debris, truth), ["bg", "a", "debris"])
    m = evaluate(pred, truth_path)
    (warning,) = m.extra["warnings"]
    assert "['2 debris']" in warning and "false positive" in warning and "truth.tif" in warning
    assert [c["id"] for c in m.extra["matched"]] == [0, 1]
    assert m.extra["matched"][1] == {"id": 1, "prediction": "a", "truth": "foreground"}
    debris_score = next(c for c in m.classes if c.id == 2)
    assert debris_score.fp == 1 and debris_score.tp == 0


def test_cli_states_matched_classes_and_warns(tmp_path: Path) -> None:
    from flows.cli import app

    truth_path, truth = _truth(tmp_path)
    same = tmp_path / "same.tif"
    tifffile.imwrite(same, truth)
    result = CliRunner().invoke(app, ["evaluate", str(same), str(truth_path)])
    assert result.exit_code == 0, result.output
    assert "Classes matched by id: 0 background, 1 foreground" in result.output
    assert "Warning" not in result.output
    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros_like(truth))
    result = CliRunner().invoke(app, ["evaluate", str(empty), str(truth_path)])
    assert result.exit_code == 0, result.output
    assert "Classes matched by id: 0 background" in result.output
    assert "Warning: ground-truth classes ['1 foreground'] are not in the prediction" in (
        " ".join(result.output.split())
    )

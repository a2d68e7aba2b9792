"""Training: reproducible with a seed, resumable exactly, from folders or synthetic data,
clear errors for bad training data, and the ``segpipe train`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from skimage.segmentation import find_boundaries

from segpipe import synthetic
from segpipe.deep import checkpoint, synth
from segpipe.deep.data import (
    MissingPartnerError,
    TrainingDataError,
    classes_from_labels,
    classes_from_onehot,
    read_pairs,
)
from segpipe.deep.train import TrainConfig, checkpoint_path, command_line, predict, train
from segpipe.errors import ConfigError, SegpipeError

# Tiny nets and few steps: these tests check mechanics, not quality.
TINY: dict[str, Any] = {
    "depth": 1,
    "width": 4,
    "patch": (16,),
    "batch": 2,
    "steps": 4,
    "val_images": 0,
    "checkpoint_every": 2,
}


def _config(tmp_path: Path, name: str = "m.pt", **kwargs: Any) -> TrainConfig:
    return TrainConfig.model_validate({**TINY, "out": str(tmp_path / name), **kwargs})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(path, weights_only=True))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pairs(tmp_path: Path, n: int = 2, size: int = 40) -> tuple[Path, Path, list[np.ndarray]]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    labels = []
    for i in range(n):
        image, truth = synthetic.render((slice(0, size), slice(0, size + 8)), seed=100 + i)
        tifffile.imwrite(images / f"cell{i}.tif", image)
        tifffile.imwrite(masks / f"cell{i}.tif", truth.astype(np.uint16))
        labels.append(truth)
    return images, masks, labels


# -- classes from annotations --------------------------------------------------------------


def test_classes_from_labels_separates_touching_objects() -> None:
    labels = np.zeros((6, 8), np.int32)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2  # touches object 1
    classes = classes_from_labels(labels)
    assert classes[0].tolist() == [0] * 8
    # the columns where the objects meet are boundary on both sides
    assert (classes[2, 3:5] == 2).all()
    assert classes[2].tolist() == [0, 2, 1, 2, 2, 1, 2, 0]
    # oracle: scikit-image's inner boundaries
    expected = np.where(labels > 0, 1, 0)
    expected[find_boundaries(labels, connectivity=1, mode="inner")] = 2
    assert np.array_equal(classes, expected)


def test_classes_from_onehot() -> None:
    classes = np.array([[0, 1, 2], [2, 1, 0]])
    stack = np.stack([classes == c for c in range(3)]).astype(np.uint8)
    assert np.array_equal(classes_from_onehot(stack), classes)
    with pytest.raises(TrainingDataError, match="not one-hot: 1 pixel"):
        stack[:, 0, 0] = 0
        classes_from_onehot(stack, source="x.tif")
    with pytest.raises(TrainingDataError, match="3 channels"):
        classes_from_onehot(stack[:2])


# -- reproducibility and resume ------------------------------------------------------------


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = train(_config(tmp_path, "a.pt"))
    b = train(_config(tmp_path, "b.pt"))
    c = train(_config(tmp_path, "c.pt", seed=1))
    wa, wb, wc = _weights(a.path), _weights(b.path), _weights(c.path)
    assert _same(wa, wb)
    assert not _same(wa, wc)
    assert a.loss == b.loss


class _StopError(Exception):
    pass


def test_resume_continues_exactly(tmp_path: Path) -> None:
    whole = train(_config(tmp_path, "whole.pt", steps=6, checkpoint_every=3))

    def stop_after_three(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise _StopError  # as if the run were killed after its checkpoint at step 3

    cfg = _config(tmp_path, "part.pt", steps=6, checkpoint_every=3)
    with pytest.raises(_StopError):
        train(cfg, progress=stop_after_three)
    assert not Path(cfg.out).exists()
    assert torch.load(checkpoint_path(cfg.out), weights_only=True)["step"] == 3
    steps: list[int] = []
    resumed = train(cfg, resume=True, progress=lambda s, n, loss: steps.append(s))
    assert steps == [4, 5, 6]
    assert _same(_weights(whole.path), _weights(resumed.path))
    assert resumed.meta.card["steps"] == 6
    assert resumed.meta.card["command"].endswith("--resume")


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    train(_config(tmp_path, "m.pt"))
    with pytest.raises(ConfigError, match="seed 0 → 3"):
        train(_config(tmp_path, "m.pt", seed=3), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_config(tmp_path, "other.pt"), resume=True)


def test_a_checkpoint_from_before_the_generator_option_resumes_as_it_trained(
    tmp_path: Path,
) -> None:
    """Its config lacks ``synthetic`` and ``augment``: it trained on `render` without them."""
    cfg = _config(tmp_path, "old.pt", synthetic="render", augment=False, steps=2)
    train(cfg)
    ckpt = checkpoint_path(cfg.out)
    state = torch.load(ckpt, weights_only=True)
    old = json.loads(state["config"])
    del old["synthetic"], old["augment"]
    state["config"] = json.dumps(old)
    torch.save(state, ckpt)
    resumed = train(cfg.model_copy(update={"steps": 3}), resume=True)
    assert resumed.meta.card["steps"] == 3
    with pytest.raises(ConfigError, match="generator 'render' → 'nuclei'"):
        train(_config(tmp_path, "old.pt", steps=4), resume=True)


def test_synthetic_generator_and_augmentation_options(tmp_path: Path) -> None:
    plane = _config(tmp_path)
    assert plane.generator == "nuclei" and plane.augment
    assert "--synthetic nuclei --augment" in command_line(plane)
    volume = _config(tmp_path, ndim=3, patch=(8, 16, 16))
    assert volume.generator == "render"
    plain = _config(tmp_path, synthetic="render", augment=False)
    assert "--synthetic render --no-augment" in command_line(plain)
    with pytest.raises(ConfigError, match="2D only"):
        train(_config(tmp_path, ndim=3, patch=(8, 16, 16), synthetic="nuclei"))
    with pytest.raises(ConfigError, match="only for --data synthetic"):
        train(_config(tmp_path, data=str(tmp_path), annotations=str(tmp_path), synthetic="render"))
    card = train(_config(tmp_path, "n.pt")).meta.card
    assert card["data"]["generator"] == "segpipe.deep.synth.nuclei"
    assert list(card["data"]["augmentation"]["zoom"]) == [0.75, 1.33]


# -- data sources --------------------------------------------------------------------------


def test_train_from_folder_of_label_masks(tmp_path: Path) -> None:
    images, masks, _ = _pairs(tmp_path)
    result = train(_config(tmp_path, data=str(images), annotations=str(masks), val_images=1))
    model = checkpoint.load(result.path)
    card = model.meta.card
    assert card["data"]["kind"] == "folder"
    assert card["data"]["pairs"] == ["cell0", "cell1"]
    assert card["seed"] == 0 and card["steps"] == 4
    assert "--data" in card["command"] and "--annotations" in card["command"]
    val = card["validation"]
    assert {"pq", "sq", "rq", "nuclei"} <= val["model"].keys()
    assert val["watershed"]["nuclei"]["tp"] > 0
    # every held-out synthetic set, scored for the model and the watershed
    assert list(card["held_out"]) == list(synth.HELD_OUT)
    assert card["held_out"]["large"]["watershed"]["nuclei"]["tp"] > 0
    md = result.card_path.read_text()
    assert "## Held-out synthetic sets" in md and "| low-contrast |" in md
    assert md.startswith("# m: unet") and "watershed" in md and card["command"] in md
    # the sidecar is what checkpoint.load read
    assert json.loads(result.path.with_suffix(".json").read_text())["card"]["seed"] == 0
    # the loaded network predicts at an image size that is no multiple of 2**depth
    classes, boundary = predict(model.net, np.zeros((21, 19), np.uint16), model.meta)
    assert classes.shape == boundary.shape == (21, 19)


def test_train_from_onehot_annotations(tmp_path: Path) -> None:
    images, _, labels = _pairs(tmp_path)
    onehot = tmp_path / "onehot"
    onehot.mkdir()
    # one as a (3, Y, X) TIFF, one as a Zarr array: both formats pair by name
    for i, truth in enumerate(labels):
        stack = np.stack([classes_from_labels(truth) == c for c in range(3)]).astype(np.uint8)
        if i == 0:
            tifffile.imwrite(onehot / f"cell{i}.tif", stack)
        else:
            zarr.create_array(str(onehot / f"cell{i}.zarr"), data=stack)
    pairs = read_pairs(images, onehot)
    for pair, truth in zip(pairs, labels, strict=True):
        assert np.array_equal(pair.classes, classes_from_labels(truth))
    result = train(_config(tmp_path, data=str(images), annotations=str(onehot)))
    assert checkpoint.load(result.path).meta.card["data"]["annotations"] == str(onehot)


@pytest.mark.parametrize(
    ("arch", "ndim", "patch"), [("segnet", 2, (16,)), ("fcn", 2, (16,)), ("unet", 3, (8, 16, 16))]
)
def test_other_architectures(tmp_path: Path, arch: str, ndim: int, patch: tuple[int, ...]) -> None:
    result = train(_config(tmp_path, arch=arch, ndim=ndim, patch=patch, steps=2))
    spec = checkpoint.load(result.path).meta.spec
    assert (spec.arch, spec.ndim) == (arch, ndim)


# -- bad training data ---------------------------------------------------------------------


def _bad_pair(tmp_path: Path, image: np.ndarray, annotation: np.ndarray) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    tifffile.imwrite(images / "bad.tif", image)
    tifffile.imwrite(masks / "bad.tif", annotation)
    return images, masks


IMAGE = synthetic.render((slice(0, 32), slice(0, 32)), seed=1)[0]
LABELS = synthetic.render((slice(0, 32), slice(0, 32)), seed=1)[1]


@pytest.mark.parametrize(
    ("image", "annotation", "message"),
    [
        (IMAGE, LABELS[:30], "annotation shape (30, 32) does not match image bad.tif (32, 32)"),
        (IMAGE, LABELS.astype(np.float32), "must hold integer object ids, got dtype float32"),
        (np.stack([IMAGE] * 3), LABELS, "expected a single-channel 2D image, got shape (3, 32"),
        (IMAGE.astype(np.complex64), LABELS, "unsupported image dtype complex64"),
        (IMAGE, np.stack([LABELS > 0] * 3).astype(np.uint8), "not one-hot"),
        (np.where(LABELS > 0, np.nan, 1).astype(np.float32), LABELS, "NaN"),
    ],
    ids=["shape", "float-mask", "channels", "complex", "not-one-hot", "nan"],
)
def test_bad_pairs_are_named(
    tmp_path: Path, image: np.ndarray, annotation: np.ndarray, message: str
) -> None:
    images, masks = _bad_pair(tmp_path, image, annotation)
    with pytest.raises(TrainingDataError) as err:
        read_pairs(images, masks)
    assert "bad.tif" in str(err.value) and message in str(err.value)


def test_missing_partners_are_named(tmp_path: Path) -> None:
    images, masks, _ = _pairs(tmp_path)
    (masks / "cell1.tif").rename(masks / "other.tif")
    with pytest.raises(MissingPartnerError, match=r"cell1\.tif: no annotation named 'cell1'"):
        read_pairs(images, masks)
    (images / "cell1.tif").unlink()
    with pytest.raises(MissingPartnerError, match=r"other\.tif: annotation without an image"):
        read_pairs(images, masks)
    with pytest.raises(FileNotFoundError, match="nowhere: annotation folder not found"):
        read_pairs(images, tmp_path / "nowhere")


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of 2"):
        train(_config(tmp_path, patch=(15,)))
    with pytest.raises(ConfigError, match="2D only"):
        train(_config(tmp_path, arch="fcn", ndim=3, patch=(8, 16, 16)))
    with pytest.raises(ConfigError, match="needs --annotations"):
        train(_config(tmp_path, data=str(tmp_path)))


# -- the command ---------------------------------------------------------------------------


def _invoke(*args: str) -> Any:
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, ["train", "--quiet", *args], catch_exceptions=False)


TINY_ARGS = ("--depth", "1", "--width", "4", "--patch", "16", "--batch", "2", "--steps", "3")


def test_cli_train(tmp_path: Path) -> None:
    out = tmp_path / "cli.pt"
    result = _invoke(*TINY_ARGS, "--val-images", "1", "--val-size", "64", "--out", str(out))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "after 3 steps" in text and "watershed: PQ" in text
    meta = checkpoint.load(out).meta
    assert meta.card["command"].startswith("segpipe train --arch unet")
    assert (tmp_path / "cli.md").is_file() and (tmp_path / "cli.ckpt").is_file()


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    images, masks, _ = _pairs(tmp_path)
    (masks / "cell0.tif").unlink()
    result = _invoke(*TINY_ARGS, "--data", str(images), "--annotations", str(masks))
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert text.startswith("error:") and "cell0.tif: no annotation named 'cell0'" in text
    assert "Traceback" not in result.output
    result = _invoke(*TINY_ARGS, "--patch", "abc")
    assert result.exit_code == 2 and "--patch 'abc'" in result.output
    result = _invoke(*TINY_ARGS, "--arch", "resnet")
    assert result.exit_code == 2 and "--arch" in result.output


def test_errors_are_segpipe_errors() -> None:
    assert issubclass(TrainingDataError, SegpipeError)
    assert issubclass(MissingPartnerError, FileNotFoundError)


# -- training that fails: loudly, and with nothing half-written ----------------------------


def test_annotations_without_objects_are_refused_before_training(tmp_path: Path) -> None:
    images, masks, _ = _pairs(tmp_path)
    for path in masks.iterdir():  # only background: every mask zero
        tifffile.imwrite(path, np.zeros_like(tifffile.imread(path)))
    out = tmp_path / "empty.pt"
    result = _invoke(
        *TINY_ARGS, "--data", str(images), "--annotations", str(masks), "--out", str(out)
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert text.startswith(f"error: {masks}: no annotation holds 'interior', 'boundary'"), text
    assert not out.exists() and not checkpoint_path(out).exists()


def test_a_loss_that_is_not_finite_stops_training_and_writes_no_model(tmp_path: Path) -> None:
    from segpipe.errors import TrainingDivergedError

    cfg = _config(tmp_path, "wild.pt", lr=1e30, steps=20, checkpoint_every=100)
    with pytest.raises(TrainingDivergedError, match=r"wild.pt: training diverged at step \d+"):
        train(cfg)
    assert not Path(cfg.out).exists()
    assert not Path(cfg.out).with_suffix(".json").exists()


def test_ctrl_c_checkpoints_the_last_whole_step_and_resume_continues_exactly(
    tmp_path: Path,
) -> None:
    import os
    import signal

    whole = train(_config(tmp_path, "whole.pt", steps=6, checkpoint_every=5))

    def ctrl_c_at_three(step: int, total: int, loss: float) -> None:
        if step == 3:  # no checkpoint is due before step 5
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _config(tmp_path, "part.pt", steps=6, checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=ctrl_c_at_three)
    assert not Path(cfg.out).exists()
    assert torch.load(checkpoint_path(cfg.out), weights_only=True)["step"] == 3
    resumed = train(cfg, resume=True)
    assert _same(_weights(whole.path), _weights(resumed.path))


def test_an_early_ctrl_c_names_no_checkpoint(tmp_path: Path) -> None:
    """A Ctrl-C while `segpipe train` still imports or loads: one line, no traceback, and
    no checkpoint to continue from is claimed."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "segpipe"), "train", "--quiet", *TINY_ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    time.sleep(0.5)  # importing, or loading: no step yet
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "--resume" not in output, output
    assert output.strip() in (
        "interrupted",
        "interrupted before the first step; no checkpoint was written",
    ), output
    assert not any(tmp_path.iterdir())

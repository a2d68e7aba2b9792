"""``tree``: rules computed by hand with NumPy and scikit-image are what the segmenter writes,
pixel for pixel, whole and tiled; the README's example runs as written; bad trees are
refused before any compute, naming their place."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage import filters
from skimage.measure import label

from segpipe.errors import SegmenterError
from segpipe.image import ImagePlan
from segpipe.io.readers import open_source
from segpipe.pipeline import run_image
from segpipe.segmenters import get_segmenter
from segpipe.segmenters.tree import Tree, parse_condition
from segpipe.synthetic import render
from tests.helpers import same_up_to_renumbering, whole_image_stats

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = ["background", "nucleus", "spot"]
KNOWN = {"if": "intensity > 150", "then": "spot", "else": {
    "if": "intensity > 50", "then": "nucleus", "else": "background"}}  # fmt: skip


def _three_classes(shape: tuple[int, ...], seed: int = 0) -> tuple[NDArray[Any], NDArray[Any]]:
    """Piecewise-constant image of discs (nuclei, 100) holding smaller discs (spots, 250)
    on a background of 10, and its classes (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    truth = np.zeros(shape, np.uint8)
    for _ in range(max(3, int(np.prod(shape)) // 900)):
        centre = [rng.uniform(0, n) for n in shape]
        r = rng.uniform(5, 11)
        d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        truth[d2 <= r * r] = np.maximum(truth[d2 <= r * r], 1)
        truth[d2 <= (r / 3) ** 2] = 2
    image = np.choose(truth, [10.0, 100.0, 250.0]).astype(np.float32)
    return image, truth


def _run(client: Any, tmp: Path, image: NDArray[Any], seg: Tree, tile: int) -> dict[str, Any]:
    path = tmp / "image.tif"
    if not path.exists():
        tifffile.imwrite(path, image)
    out = tmp / f"tile{tile}.zarr"
    src = open_source(str(path))
    run_image(client, ImagePlan(src, str(out), (tile,) * image.ndim, seg))
    group = out / src.name / "labels"
    return {
        kind: np.asarray(zarr.open_array(str(group / kind / "0"))[:])
        for kind in ("semantic", "instances", "panoptic")
    }


def _whole(seg: Tree, image: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    image = image.astype(np.float32)
    result = seg.segment(image, seg.prepare(whole_image_stats(image)))
    assert result.semantic is not None and result.instances is not None
    return result.semantic, result.instances


# -- rules reproduced exactly ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(150, 170), (20, 40, 44)])
def test_known_rules_reproduce_the_truth_exactly(shape: tuple[int, ...]) -> None:
    image, truth = _three_classes(shape, seed=len(shape))
    seg = get_segmenter("tree", tree=KNOWN, classes=CLASSES)
    assert seg.halo(len(shape)) == (0,) * len(shape)  # intensity alone needs no context
    semantic, instances = _whole(seg, image)  # type: ignore[arg-type]
    assert np.array_equal(semantic, truth)
    things = np.where(truth > 0, truth, 0)
    assert same_up_to_renumbering(instances, label(things, connectivity=len(shape)))


def test_tree_with_context_equals_the_rules_by_hand_whole_and_tiled(
    client: Any, tmp_path: Path
) -> None:
    image = render((slice(0, 300), slice(0, 260)), seed=5)[0].astype(np.float32)
    tree = {
        "if": "gaussian_2 > otsu",
        "then": {"if": "log_2 < -0.02 * (p99 - p1)", "then": "spot", "else": "nucleus"},
        "else": "background",
    }
    seg = get_segmenter("tree", tree=tree, classes=CLASSES, diameter=30)
    assert isinstance(seg, Tree)
    g2 = filters.gaussian(image, 2, preserve_range=True, mode="nearest").astype(np.float64)
    log2 = ndi.gaussian_laplace(image, 2, mode="nearest").astype(np.float64)
    stats = whole_image_stats(image)
    otsu = float(filters.threshold_otsu(image))
    p1, p99 = stats.percentile(1), stats.percentile(99)
    expected = np.where(g2 > otsu, np.where(log2 < -0.02 * (p99 - p1), 2, 1), 0)
    assert 0.01 < (expected == 2).mean() < 0.5  # every class is there
    semantic, instances = _whole(seg, image)  # type: ignore[arg-type]
    assert np.array_equal(semantic, expected)
    reference = label(np.where(expected > 0, expected, 0), connectivity=2)
    assert same_up_to_renumbering(instances, reference)
    assert seg.halo(2) == (8 + 30, 8 + 30)
    for tile in (48, 1024):
        got = _run(client, tmp_path, image, seg, tile)
        assert np.array_equal(got["semantic"], expected), tile
        assert same_up_to_renumbering(got["instances"], reference), tile


def test_large_objects_across_small_tiles_are_exact_without_extra_context(
    client: Any, tmp_path: Path
) -> None:
    """Objects many times the tile and no ``diameter`` beyond the features' radius: the
    context's outer pixels are misclassified, yet objects are labelled on each block's
    core and joined from their faces, so the instances equal the whole image's."""
    image = render((slice(0, 256), slice(0, 240)), seed=9, density=0.95)[0].astype(np.float32)
    tree = {"if": "gaussian_4 > 0.5 * otsu", "then": "nucleus", "else": "background"}
    seg = get_segmenter("tree", tree=tree, classes=CLASSES[:2], diameter=0)
    assert isinstance(seg, Tree)
    semantic, instances = _whole(seg, image)  # type: ignore[arg-type]
    assert instances.max() >= 2 and np.bincount(instances.ravel())[1:].max() > 32**2
    got = _run(client, tmp_path, image, seg, 32)
    assert np.array_equal(got["semantic"], semantic)
    assert same_up_to_renumbering(got["instances"], instances)


def test_tree_in_3d_tiled_equals_whole(client: Any, tmp_path: Path) -> None:
    image = render((slice(0, 24), slice(0, 60), slice(0, 70)), seed=2)[0].astype(np.float32)
    tree = {"if": "hessian3_1 < -0.05 * otsu", "then": "nucleus", "else": "background"}
    seg = get_segmenter("tree", tree=tree, classes=CLASSES[:2], diameter=20)
    assert isinstance(seg, Tree)
    semantic, instances = _whole(seg, image)  # type: ignore[arg-type]
    assert 0.05 < semantic.mean() < 0.8
    got = _run(client, tmp_path, image, seg, 16)
    assert np.array_equal(got["semantic"], semantic)
    assert same_up_to_renumbering(got["instances"], instances)


def test_stuff_classes_get_no_instances() -> None:
    image, truth = _three_classes((120, 120), seed=3)
    classes = [
        {"id": 0, "name": "background", "thing": False},
        {"id": 1, "name": "nucleus", "thing": False},
        {"id": 2, "name": "spot", "thing": True},
    ]
    seg = get_segmenter("tree", tree=KNOWN, classes=classes)
    semantic, instances = _whole(seg, image)  # type: ignore[arg-type]
    assert np.array_equal(semantic, truth)
    assert not instances[truth == 1].any() and (instances[truth == 2] > 0).all()
    assert same_up_to_renumbering(instances, label(truth == 2, connectivity=2))


# -- the README's example --------------------------------------------------------------------


def _readme_example() -> tuple[list[str], str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- tree-example")
    bash = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    config = re.search(r"`tree\.yaml`:\s*```yaml\n(.*?)```", text[start:], re.S)
    assert bash is not None and config is not None
    return bash.group(1).strip().splitlines(), config.group(1)


def test_readme_tree_example_runs_as_written_and_follows_its_rules(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands, config = _readme_example()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tree.yaml").write_text(config, encoding="utf-8")
    make_image, run = (shlex.split(c) for c in commands)
    assert make_image[:2] == ["python", "-c"]
    subprocess.run([sys.executable, *make_image[1:]], check=True, cwd=tmp_path)
    assert run[:2] == ["segpipe", "run"]
    # the session's cluster instead of a new LocalCluster: the same code, less waiting
    result = run_cli(*run[2:], "--cluster", run_cli.cluster_address)
    assert result.exit_code == 0, result.output

    settings = yaml.safe_load(config)
    image = tifffile.imread(tmp_path / settings["input"]).astype(np.float32)
    g1 = filters.gaussian(image, 1, preserve_range=True, mode="nearest").astype(np.float64)
    s1 = filters.sobel(filters.gaussian(image, 1, preserve_range=True, mode="nearest"))
    otsu = float(filters.threshold_otsu(image))
    expected = np.where(g1 > otsu, np.where(s1.astype(np.float64) > 0.4 * otsu, 2, 1), 0)
    labels = tmp_path / settings["output"] / "nuclei" / "labels"
    semantic = np.asarray(zarr.open_array(str(labels / "semantic" / "0"))[:])
    assert np.array_equal(semantic, expected)
    assert all((expected == k).mean() > 0.02 for k in (0, 1, 2))
    instances = np.asarray(zarr.open_array(str(labels / "instances" / "0"))[:])
    assert same_up_to_renumbering(instances, label(expected == 1, connectivity=2))
    # touching nuclei apart: more objects than connected regions of the foreground
    assert instances.max() > label(expected > 0, connectivity=2).max()


def test_a_tree_mistake_stops_the_cli_before_any_compute(run_cli: Any, tmp_path: Path) -> None:
    _, config = _readme_example()
    tifffile.imwrite(tmp_path / "nuclei.tif", np.zeros((32, 32), np.uint16))
    bad = config.replace("then: boundary", "then: boundry")
    (tmp_path / "tree.yaml").write_text(bad, encoding="utf-8")
    result = run_cli("--config", str(tmp_path / "tree.yaml"), cluster=False)
    assert result.exit_code == 1
    assert (
        "segmenter.tree.then.then: unknown class 'boundry'; expected one of background, "
        "nucleus, boundary"
    ) in " ".join(result.output.split())
    assert not (tmp_path / "tree.zarr").exists()


# -- mistakes, with their place --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"if": "gausian_2 > otsu", "then": "nucleus", "else": "background"},
         r"segmenter\.tree\.if: 'gausian_2 > otsu': unknown feature 'gausian_2'"),
        ({"if": "intensity > 1", "then": {"if": "intensity > otsu", "then": "spot"},
          "else": "background"},
         r"segmenter\.tree\.then: `else:` is missing"),
        ({"if": "intensity > 1", "then": "nucleus", "else": {
            "if": "sobel_1 > 2", "then": "nucleos", "else": "background"}},
         r"segmenter\.tree\.else\.then: unknown class 'nucleos'; expected one of background, "
         r"nucleus, spot"),
        ({"if": "intensity > 1", "then": "nucleus", "else": "background", "when": 1},
         r"segmenter\.tree: unknown key 'when'"),
        ({"if": "intensity >", "then": "nucleus", "else": "background"},
         r"segmenter\.tree\.if: 'intensity >': it ends too early"),
        ({"if": "intensity + 2", "then": "nucleus", "else": "background"},
         r"segmenter\.tree\.if: 'intensity \+ 2': expected a comparison"),
        ({"if": "intensity > 2 > 1", "then": "nucleus", "else": "background"},
         r"unexpected '>' after the comparison"),
        ({"if": "intensity > 1", "then": False, "else": "background"},
         r"segmenter\.tree\.then: expected a class name .* got False \(quote it"),
        ({"if": "(intensity > 1", "then": "nucleus", "else": "background"},
         r"'\(intensity > 1': a '\(' is not closed"),
        ({"if": "intensity > * 1", "then": "nucleus", "else": "background"},
         r"expected a number, a name or '\(', got '\*'"),
        ({"if": "median_2 > p101", "then": "nucleus", "else": "background"},
         r"unknown feature 'median_2'"),
        ("nucleus ", r"segmenter\.tree: unknown class 'nucleus '"),
    ],
)  # fmt: skip
def test_mistakes_are_named_with_their_place(tree: Any, message: str) -> None:
    with pytest.raises(SegmenterError, match=message):
        get_segmenter("tree", tree=tree, classes=CLASSES)


def test_image_specific_mistakes_name_the_feature() -> None:
    seg = get_segmenter("tree", tree={"if": "hessian3_1 > 0", "then": "a", "else": "b"},
                        classes=["b", "a"])  # fmt: skip
    seg.check_image((20, 20, 20))
    with pytest.raises(SegmenterError, match="'hessian3_1': a 2D image's Hessian"):
        seg.check_image((20, 20))
    wide = get_segmenter("tree", tree={"if": "gaussian_40 > 0", "then": "a", "else": "b"},
                         classes=["b", "a"])  # fmt: skip
    with pytest.raises(SegmenterError, match="'gaussian_40' reads 160 px per side"):
        wide.check_image((100, 100))


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["a", "a"], "class names must be unique"),
        ([{"id": 1, "name": "a", "thing": True}], r"class ids must be 0\.\.0"),
        ([{"id": 0, "name": "a"}], "thing"),
    ],
)
def test_bad_catalogues_are_refused(classes: Any, message: str) -> None:
    with pytest.raises(SegmenterError, match=message):
        get_segmenter("tree", tree="a", classes=classes)


# -- conditions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3 > 6.5", True),
        ("(1 + 2) * 3 < 9", False),
        ("-2 - -3 >= 1", True),
        ("8 / 4 / 2 <= 1", True),
        ("1e2 > 99.5", True),
        (".5 < 0.25", False),
    ],
)
def test_arithmetic_follows_the_usual_precedence(text: str, value: bool) -> None:
    from segpipe.segmenters.tree import Leaf, Split, evaluate

    split = Split(parse_condition(text), Leaf(1, "t"), Leaf(0, "e"), "x")
    assert evaluate(split, lambda name: 0.0, (1,))[0] == value


def test_nan_and_division_by_zero_take_else() -> None:
    image = np.zeros((8, 8), np.float32)
    image[0, 0] = 1
    seg = get_segmenter(
        "tree", tree={"if": "intensity / intensity > 0.5", "then": "a", "else": "b"},
        classes=["b", "a"],
    )  # fmt: skip
    semantic, _ = _whole(seg, image)  # type: ignore[arg-type]
    assert semantic[0, 0] == 1 and semantic.sum() == 1

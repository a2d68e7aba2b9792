"""bioimage.io model packages in and out (issue #19, parts 1 and 2).

References are independent of segpipe's code: bioimageio.core's own model test and its
own whole-image prediction, and packages built here with bioimageio.spec's API from
small torch networks written in this file.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

pytest.importorskip("bioimageio.core")
torch = pytest.importorskip("torch")

import bioimageio.core as core  # noqa: E402
from bioimageio.core.digest_spec import get_test_input_sample  # noqa: E402
from bioimageio.spec import load_model_description, save_bioimageio_package  # noqa: E402
from bioimageio.spec.model import v0_5 as bio  # noqa: E402

from segpipe import image as segpipe_image  # noqa: E402
from segpipe import pipeline, synthetic  # noqa: E402
from segpipe.deep.export import export_bioimageio  # noqa: E402
from segpipe.engine import Inline  # noqa: E402
from segpipe.errors import ModelFileError  # noqa: E402
from segpipe.io.readers import open_source  # noqa: E402
from segpipe.segmenters import get_segmenter  # noqa: E402

SEED = 20_003  # neither a training seed nor a model card's validation seed
TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """Smooths, then scores brightness: foreground where the image is bright."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.smooth = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        self.score = nn.Conv2d(1, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.smooth(x))
'''


def _tiny(source: Path, channels: int) -> torch.nn.Module:
    """`Tiny` imported from the source file the package ships (TorchScript reads it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tiny_{abs(hash(source))}", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    net = module.Tiny(channels)
    with torch.no_grad():
        net.smooth.weight.fill_(1 / 25)
        signs = torch.tensor([-4.0, 4.0][-channels:])
        net.score.weight.copy_(signs.reshape(channels, 1, 1, 1))
        net.score.bias.copy_(torch.tensor([4.0, -4.0][-channels:]) * 0.5)
    return net.eval()


def _image(shape: tuple[int, int] = (192, 224)) -> np.ndarray:
    image, _ = synthetic.render(tuple(slice(0, n) for n in shape), seed=SEED)
    return image.astype(np.float32)


def _package(
    tmp: Path,
    *,
    weights: str = "torchscript",
    channels: int = 1,
    pre: list[Any] | None = None,
    post: list[Any] | None = None,
    in_channels: int = 1,
    two_inputs: bool = False,
    min_size: int = 32,
    step: int = 16,
    shape: tuple[int, int] = (192, 224),
    bare: bool = False,
) -> Path:
    """A package built with bioimageio.spec's own API around `Tiny`; test output from torch.

    ``bare``: the input is ``(y, x)`` alone and the output ``(y, x, channel)`` (TorchScript
    of a wrapper that adds and moves the axes)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tiny.py").write_text(TINY)
    net = _tiny(tmp / "tiny.py", channels)
    image = _image(shape)
    x = image[None, None]
    pre = (
        pre
        if pre is not None
        else [
            bio.ZeroMeanUnitVarianceDescr(
                kwargs=bio.ZeroMeanUnitVarianceKwargs(axes=[bio.AxisId("y"), bio.AxisId("x")])
            )
        ]
    )
    post = post if post is not None else [bio.SigmoidDescr()]
    normalised = (x - x.mean()) / (x.std() + 1e-6)
    with torch.inference_mode():
        y = net(torch.from_numpy(normalised.astype(np.float32))).numpy()
    y = 1 / (1 + np.exp(-y)) if channels == 1 else np.exp(y) / np.exp(y).sum(1, keepdims=True)
    if bare:
        np.save(tmp / "in.npy", image)
        np.save(tmp / "out.npy", np.moveaxis(y[0], 0, -1).astype(np.float32))
    else:
        np.save(tmp / "in.npy", np.repeat(x, in_channels, axis=1))
        np.save(tmp / "out.npy", y.astype(np.float32))
    (tmp / "README.md").write_text("# tiny\n\nBright blobs.\n")
    version = bio.Version(torch.__version__.split("+")[0])
    if weights == "torchscript":
        scripted = torch.jit.script(net if not bare else Bare(net))
        torch.jit.save(scripted, str(tmp / "tiny.ts"))
        w = bio.WeightsDescr(
            torchscript=bio.TorchscriptWeightsDescr(source=tmp / "tiny.ts", pytorch_version=version)
        )
    elif weights == "pytorch_state_dict":
        torch.save(net.state_dict(), tmp / "tiny.pt")
        arch = bio.ArchitectureFromFileDescr(
            source=tmp / "tiny.py", callable=bio.Identifier("Tiny"), kwargs={"channels": channels}
        )
        w = bio.WeightsDescr(
            pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                source=tmp / "tiny.pt", pytorch_version=version, architecture=arch
            )
        )
    else:  # onnx: only its description matters, the file is never run
        (tmp / "tiny.onnx").write_bytes(b"not really onnx")
        w = bio.WeightsDescr(onnx=bio.OnnxWeightsDescr(source=tmp / "tiny.onnx", opset_version=15))
    raw = bio.TensorId("raw")
    space = [
        bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=min_size, step=step))
        for a in "yx"
    ]
    names = ["nuclei"] if channels == 1 else ["background", "nuclei"]
    in_axes = [
        bio.BatchAxis(),
        bio.ChannelAxis(channel_names=[bio.Identifier(f"c{i}") for i in range(in_channels)]),
    ]
    inputs = [
        bio.InputTensorDescr(
            id=raw,
            axes=space if bare else [*in_axes, *space],
            test_tensor=bio.FileDescr(source=tmp / "in.npy"),
            preprocessing=pre,
        )
    ]
    if two_inputs:
        inputs.append(inputs[0].model_copy(update={"id": bio.TensorId("mask")}))
    descr = bio.ModelDescr(
        name="tiny bright blobs",
        description="a test network: smoothing, then a brightness score",
        authors=[bio.Author(name="segpipe tests")],
        cite=[bio.CiteEntry(text="segpipe tests", doi=bio.Doi("10.1007/978-3-319-24574-4_28"))],
        license=bio.LicenseId("MIT"),
        documentation=bio.FileDescr(source=tmp / "README.md"),
        inputs=inputs,
        outputs=[
            bio.OutputTensorDescr(
                id=bio.TensorId("scores"),
                axes=_out_axes(raw, names, bare),
                test_tensor=bio.FileDescr(source=tmp / "out.npy"),
                postprocessing=post,
            )
        ],
        weights=w,
    )
    return save_bioimageio_package(descr, output_path=tmp / "tiny.zip")


class Bare(torch.nn.Module):
    """(y, x) in, (y, x, channel) out, around a network of (batch, channel, y, x)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[None, None])[0].permute(1, 2, 0)


def _out_axes(raw: Any, names: list[str], bare: bool) -> list[Any]:
    space = [
        bio.SpaceOutputAxis(
            id=bio.AxisId(a), size=bio.SizeReference(tensor_id=raw, axis_id=bio.AxisId(a))
        )
        for a in "yx"
    ]
    channel = bio.ChannelAxis(channel_names=[bio.Identifier(n) for n in names])
    return [*space, channel] if bare else [bio.BatchAxis(), channel, *space]


def _core_whole_image(package: Path) -> tuple[np.ndarray, np.ndarray]:
    """bioimageio.core's own prediction of the package's test input, in one piece."""
    descr = load_model_description(package)
    sample = get_test_input_sample(descr)
    out = core.predict(model=descr, inputs=sample)
    (member,) = out.members.values()
    scores = np.asarray(
        member.transpose([*(d for d in member.dims if d not in "yx"), "y", "x"]).data
    )
    scores = scores.reshape(-1, *scores.shape[-2:])  # (channel, y, x)
    (inp,) = sample.members.values()
    image = np.asarray(inp.data)
    return image.reshape(image.shape[-2:]), scores


def _segment_file(
    tmp: Path, image: np.ndarray, model: str | None, tile: int
) -> tuple[np.ndarray, np.ndarray]:
    """segpipe's pipeline (blocks of ``tile``, network tiles inside) on one image."""
    src = tmp / "in" / "img.tif"
    src.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(src, image)
    options = {"model": model} if model else {}
    seg = get_segmenter("unet", **options, tile=96)
    out = tmp / f"o{abs(hash(model)) % 10**6}.zarr"
    plan = segpipe_image.ImagePlan(open_source(src), str(out), (tile, tile), seg)
    pipeline.run_image(Inline(), plan)
    group = Path(plan.group) / "labels"
    return (
        np.asarray(zarr.open_array(str(group / "semantic" / "0"))[:]),
        np.asarray(zarr.open_array(str(group / "instances" / "0"))[:]),
    )


def _same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# -- export -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bioimageio("unet", tmp_path_factory.mktemp("export") / "unet.zip").path


def test_exported_unet_passes_bioimageio_cores_test(unet_zip: Path) -> None:
    summary = core.test_model(unet_zip)
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    names = {d.name for d in summary.details}
    assert any("pytorch_state_dict" in n for n in names) and any("torchscript" in n for n in names)
    descr = load_model_description(unet_zip)
    card = descr.documentation.get_reader().read().decode()
    assert "## Validation" in card and "segpipe train --arch unet" in card  # the model card


def test_round_trip_segments_as_the_shipped_model(unet_zip: Path, tmp_path: Path) -> None:
    image, _ = synthetic.render((slice(0, 300), slice(0, 340)), seed=SEED)
    shipped = _segment_file(tmp_path, image, None, 128)
    imported = _segment_file(tmp_path, image, str(unet_zip), 128)
    agree = float((shipped[0] == imported[0]).mean())
    assert agree >= 0.999, agree
    assert _same_objects(shipped[1], imported[1])


def test_tiled_agrees_with_bioimageio_cores_whole_image(unet_zip: Path, tmp_path: Path) -> None:
    image, scores = _core_whole_image(unet_zip)
    semantic, _ = _segment_file(tmp_path, image, str(unet_zip), 128)
    reference = (scores.argmax(0) != 0).astype(np.uint8)  # interior or boundary: nucleus
    agree = float((semantic == reference).mean())
    print(f"exported unet: tiled vs bioimageio.core whole image: {agree:.5%} of pixels agree")
    # scale_range's percentiles: the package takes them exactly, segpipe from its
    # 256-bin whole-image histogram (low end 115 against 0 on this image), which moves
    # nucleus rims near 50 % probability: 66 pixels of 256² with the shipped unet
    assert agree >= 0.998, agree


def test_export_cli_and_train_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "fcn.zip"
    result = CliRunner().invoke(
        app, ["export", "--model", "fcn", "--format", "bioimageio", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and "fcn.zip" in result.output
    bad = CliRunner().invoke(
        app, ["export", "--model", "fcn", "--format", "onnx", "--out", str(out)]
    )
    assert bad.exit_code != 0
    trained = tmp_path / "tiny.zip"
    args = ["train", "--arch", "unet", "--depth", "2", "--width", "4", "--steps", "2"]
    args += ["--patch", "32", "--batch", "2", "--val-images", "0", "--quiet"]
    args += ["--out", str(tmp_path / "tiny.pt"), "--bioimageio", str(trained)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert core.test_model(trained).status == "passed"
    forest = CliRunner().invoke(app, ["train", "--arch", "forest", "--bioimageio", str(trained)])
    assert forest.exit_code == 2 and "a forest has no bioimage.io form" in forest.output


# -- import of packages built independently -------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "channels", "bare"),
    [("torchscript", 1, False), ("pytorch_state_dict", 2, False), ("torchscript", 2, True)],
)
def test_independent_package_tiled_agrees_with_its_whole_image_run(
    tmp_path: Path, weights: str, channels: int, bare: bool
) -> None:
    post = [bio.SigmoidDescr()] if channels == 1 else [bio.SoftmaxDescr()]
    pkg = _package(tmp_path / "pkg", weights=weights, channels=channels, post=post, bare=bare)
    assert core.test_model(pkg).status == "passed"  # the package is sound by bioimageio.core's test
    seg = get_segmenter("unet", model=str(pkg))
    assert seg.classes == ["background", "nuclei"]
    image, scores = _core_whole_image(pkg)
    fg = scores[0] if channels == 1 else scores[1]
    reference = (fg > 0.5).astype(np.uint8)
    semantic, instances = _segment_file(tmp_path, image, str(pkg), 64)
    agree = float((semantic == reference).mean())
    kind = f"{weights}{' (y, x) in, (y, x, c) out' if bare else ''}"
    print(f"{kind}: tiled vs bioimageio.core whole image: {agree:.5%} of pixels agree")
    assert agree >= 0.995, agree
    assert ((instances > 0) == (semantic > 0)).mean() > 0.99 and instances.max() > 5


def test_package_as_folder_and_rdf(tmp_path: Path) -> None:
    import zipfile

    pkg = _package(tmp_path / "pkg")
    folder = tmp_path / "folder"
    with zipfile.ZipFile(pkg) as z:
        z.extractall(folder)
    for source in (folder, folder / "rdf.yaml"):
        assert get_segmenter("unet", model=str(source)).classes == ["background", "nuclei"]


# -- refusals --------------------------------------------------------------------------------------


def _refused(package: Path, *problem: str) -> None:
    with pytest.raises(ModelFileError) as err:
        get_segmenter("unet", model=str(package))
    message = str(err.value)
    assert "\n" not in message and str(package) in message, message
    for p in problem:
        assert p in message, message


def test_unsupported_packages_are_refused_in_one_line(tmp_path: Path) -> None:
    _refused(_package(tmp_path / "a", two_inputs=True), "2 inputs and 1 outputs")
    _refused(_package(tmp_path / "b", in_channels=2), "the input has 2 channels")
    _refused(_package(tmp_path / "c", weights="onnx"), "weights ['onnx']", "torchscript")
    _refused(
        _package(
            tmp_path / "d",
            post=[
                bio.SigmoidDescr(),
                bio.ScaleRangeDescr(
                    kwargs=bio.ScaleRangeKwargs(axes=[bio.AxisId("y"), bio.AxisId("x")])
                ),
            ],
        ),
        "postprocessing step 'scale_range' is not supported",
    )
    _refused(
        _package(
            tmp_path / "e",
            pre=[bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(axes=[bio.AxisId("x")]))],
        ),
        "statistics per row or plane",
    )
    _refused(_package(tmp_path / "f", min_size=48, step=48, shape=(192, 192)), "power-of-two step")


def test_an_invalid_description_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "rdf.yaml").write_text("type: model\nformat_version: 0.5.4\nname: x\n")
    _refused(folder / "rdf.yaml", "bioimage.io package: fails bioimageio.spec's validation")


def test_without_bioimageio_a_package_is_refused_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = _package(tmp_path / "pkg")
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    monkeypatch.setitem(sys.modules, "bioimageio.core", None)
    _refused(pkg, "pip install 'segpipe[bioimageio]'")
    # segpipe's own models need none of it
    assert get_segmenter("unet").classes == ["background", "nucleus"]


def test_module_imports_without_bioimageio() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["bioimageio"] = None
        import segpipe.deep.package, segpipe.deep.export, segpipe.segmenters.deep
        print("ok")
        """
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr


RDF_04 = """\
format_version: 0.4.10
type: model
name: segpipe unet in spec 0.4
description: the shipped unet's TorchScript, described in spec 0.4
authors: [{name: segpipe tests}]
cite: [{text: "Ronneberger, Fischer, Brox: U-Net. MICCAI 2015", doi: 10.1007/978-3-319-24574-4_28}]
license: BSD-3-Clause
documentation: README.md
tags: [segmentation, nuclei]
timestamp: "2026-12-01T00:00:00"
test_inputs: [test_input.npy]
test_outputs: [test_output.npy]
inputs:
  - name: raw
    axes: bcyx
    data_type: float32
    data_range: [-.inf, .inf]
    shape: {min: [1, 1, 56, 56], step: [0, 0, 8, 8]}
    preprocessing:
      - name: scale_range
        kwargs: {mode: per_sample, axes: yx, min_percentile: 1.0, max_percentile: 99.8}
outputs:
  - name: logits
    axes: bcyx
    data_type: float32
    data_range: [-.inf, .inf]
    shape: {reference_tensor: raw, scale: [1, 3, 1, 1], offset: [0, 0, 0, 0]}
    halo: [0, 0, 24, 24]
weights:
  torchscript: {source: weights_torchscript.pt, pytorch_version: "2.13"}
"""


def test_spec_04_package_is_converted_and_segments(unet_zip: Path, tmp_path: Path) -> None:
    """A 0.4 description (written by hand here) of the unet's TorchScript: bioimageio.spec
    converts it; its three unnamed channels are classes, nucleus where not class 0."""
    import zipfile

    folder = tmp_path / "v04"
    with zipfile.ZipFile(unet_zip) as z:
        z.extractall(folder)
    (folder / "rdf.yaml").write_text(RDF_04)
    seg = get_segmenter("unet", model=str(folder / "rdf.yaml"))
    assert seg.info is not None and seg.info.halo == (24, 24) and seg.info.step == (8, 8)
    image, _ = synthetic.render((slice(0, 200), slice(0, 240)), seed=SEED)
    shipped, _ = _segment_file(tmp_path, image, None, 128)
    semantic, _ = _segment_file(tmp_path, image, str(folder / "rdf.yaml"), 128)
    assert float(((semantic != 0) == (shipped != 0)).mean()) >= 0.999

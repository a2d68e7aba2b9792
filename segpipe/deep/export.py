"""segpipe models as bioimage.io model packages (spec 0.5): the format of the BioImage Model Zoo.

A package holds the network twice: its ``pytorch_state_dict`` (the original; the
architecture is `segpipe.deep.nets.network`) and a TorchScript conversion that runs
without segpipe. The input's preprocessing is ``scale_range`` over the image's
spatial axes at the model's percentiles (segpipe's whole-image normalisation), the
output a ``softmax`` over the network's classes. Its test tensors are a synthetic
image and segpipe's whole-image prediction of it; its documentation is the model
card. ``bioimageio.spec`` builds and validates it; it is an optional dependency.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe.deep import checkpoint
from segpipe.deep.infer import margin, round_up
from segpipe.deep.nets import NetSpec
from segpipe.deep.postprocess import CLASSES
from segpipe.errors import ModelFileError, SegpipeError

__all__ = ["INSTALL", "Exported", "export_bioimageio", "model_path", "require"]

INSTALL = "pip install 'segpipe[bioimageio]'"
"""How to install the optional bioimage.io libraries."""
SHIPPED = ("unet", "segnet", "fcn")
TEST_SEED = 10_099  # a validation-range seed (never drawn in training) for the test tensors
AXES = ("z", "y", "x")
CITE = {
    "unet": (
        "Ronneberger, Fischer, Brox: U-Net: Convolutional Networks for Biomedical Image "
        "Segmentation. MICCAI 2015",
        "10.1007/978-3-319-24574-4_28",
    ),
    "segnet": (
        "Badrinarayanan, Kendall, Cipolla: SegNet: A Deep Convolutional Encoder-Decoder "
        "Architecture for Image Segmentation. IEEE TPAMI 2017",
        "10.1109/TPAMI.2016.2644615",
    ),
    "fcn": (
        "Long, Shelhamer, Darrell: Fully Convolutional Networks for Semantic Segmentation. "
        "CVPR 2015",
        "10.1109/CVPR.2015.7298965",
    ),
}
"""The architecture's paper, cited by an exported package."""


def require(what: str, source: str | os.PathLike[str] | None = None) -> None:
    """Refuse in one line when bioimageio.spec (and .core) are not installed.

    Raises
    ------
    ModelFileError
        Naming ``source`` (when given) and how to install them.
    """
    try:
        import bioimageio.core
        import bioimageio.spec  # noqa: F401
    except ImportError as err:
        where = f"{source}: " if source is not None else ""
        raise ModelFileError(
            f"{where}{what} needs bioimageio.spec and bioimageio.core ({INSTALL})."
        ) from err


def model_path(model: str | os.PathLike[str]) -> Path:
    """A shipped model's name (``unet``) or a model file's path, as the file's path."""
    from segpipe.segmenters.deep import WEIGHTS

    if str(model) in SHIPPED:
        return WEIGHTS / f"{model}.pt"
    return Path(model).expanduser().absolute()


@dataclass(frozen=True)
class Exported:
    """A written package: where, its weight formats and its test image's shape."""

    path: Path
    weights: tuple[str, ...]
    test_shape: tuple[int, ...]


def _test_image(spec: NetSpec) -> NDArray[np.float32]:
    from segpipe import synthetic

    need = 2 * margin(spec) + spec.multiple
    shape = (round_up(max(need, 256 if spec.ndim == 2 else 64), spec.multiple),) * spec.ndim
    image, _ = synthetic.render(tuple(slice(0, s) for s in shape), seed=TEST_SEED)
    return np.asarray(image, np.float32)


def _whole_prediction(
    net: Any, image: NDArray[np.float32], percentiles: tuple[float, float]
) -> NDArray[np.float32]:
    """Softmax of one forward call on the whole image, normalised as ``scale_range`` does
    (numpy's percentiles; eps 1e-6)."""
    import torch

    lo, hi = np.percentile(image, percentiles)
    x = ((image - lo) / (hi - lo + 1e-6)).astype(np.float32)
    with torch.inference_mode():
        out = torch.softmax(net(torch.from_numpy(x)[None, None]).float(), dim=1)
    result: NDArray[np.float32] = out.numpy()
    return result


def _cover(image: NDArray[np.float32], probs: NDArray[np.float32], path: Path) -> None:
    """The test image beside its predicted classes, as a PNG."""
    from PIL import Image

    plane = image if image.ndim == 2 else image[image.shape[0] // 2]
    classes = probs[0].argmax(0)
    classes = classes if classes.ndim == 2 else classes[classes.shape[0] // 2]
    lo, hi = np.percentile(plane, (1, 99.8))
    grey = (np.clip((plane - lo) / (hi - lo + 1e-6), 0, 1) * 255).astype(np.uint8)
    palette = np.array([[0, 0, 0], [80, 200, 120], [240, 90, 60]] + [[90, 120, 240]] * 253)
    colour = palette[np.minimum(classes, 255)].astype(np.uint8)
    both = np.concatenate([np.stack([grey] * 3, -1), colour], axis=1)
    Image.fromarray(both).save(path)


def _card(path: Path, meta: checkpoint.ModelMeta, name: str) -> str:
    from segpipe.deep.train import card_markdown, card_path

    md = card_path(path)
    if md.is_file():
        text = md.read_text(encoding="utf-8")
    elif "config" in meta.card:
        text = card_markdown(name, meta.card)
    else:
        s = meta.spec
        text = f"# {name}: {s.arch} ({s.ndim}D, depth {s.depth}, width {s.width})\n"
    return (
        text.rstrip()
        + "\n\n## In this package\n\n"
        + "Exported by `segpipe export --format bioimageio`. The output holds the "
        + "network's class probabilities; segpipe writes them as background and nucleus "
        + "(interior and boundary together) and grows instances from the interior. "
        + "Input: the whole image mapped from its "
        + f"{meta.normalise[0]:g}–{meta.normalise[1]:g} percentiles to 0–1 (`scale_range`).\n"
    )


def export_bioimageio(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
) -> Exported:
    """Write a segpipe model as a bioimage.io model package (a ``.zip``).

    Parameters
    ----------
    model : str or path
        A shipped model's name (``unet``, ``segnet``, ``fcn``) or a model file: a
        state_dict ``.pt`` with its sidecar, or a TorchScript file with one.
    out : str or path
        The package to write (``.zip``); replaced atomically.
    name : str, optional
        The package's name (default: ``segpipe <model file's stem>``).

    Returns
    -------
    Exported

    Raises
    ------
    InputNotFoundError, ModelFileError
        If the model cannot be loaded, or bioimageio.spec is not installed.
    SegpipeError
        If bioimageio.spec refuses the description.
    """
    path = model_path(model)
    require("bioimage.io export", path)
    import torch
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    loaded = checkpoint.load(path)
    meta, spec = loaded.meta, loaded.meta.spec
    if spec.in_channels != 1:
        raise ModelFileError(f"{path}: {spec.in_channels} input channels; segpipe exports one.")
    stem = name or f"segpipe {path.stem}"
    names = meta.card.get("classes")
    if not (isinstance(names, list) and len(names) == spec.classes):
        names = (
            CLASSES if spec.classes == len(CLASSES) else [f"class{k}" for k in range(spec.classes)]
        )
    out_path = Path(out).expanduser().absolute()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    axes = AXES[-spec.ndim :]
    halo = margin(spec)
    with tempfile.TemporaryDirectory(prefix="segpipe-export-") as tmp:
        d = Path(tmp)
        image = _test_image(spec)
        probs = _whole_prediction(loaded.net, image, meta.normalise)
        np.save(d / "test_input.npy", image[None, None])
        np.save(d / "test_output.npy", probs)
        _cover(image, probs, d / "cover.png")
        (d / "README.md").write_text(_card(path, meta, stem), encoding="utf-8")
        version = bio.Version(torch.__version__.split("+")[0])
        ts = torch.jit.script(loaded.net) if not loaded.scripted else loaded.net
        torch.jit.save(ts, str(d / "weights_torchscript.pt"))
        weights: dict[str, Any] = {}
        if loaded.scripted:
            weights["torchscript"] = bio.TorchscriptWeightsDescr(
                source=d / "weights_torchscript.pt", pytorch_version=version
            )
        else:
            state = {k: v.detach().cpu() for k, v in loaded.net.state_dict().items()}
            torch.save(state, d / "weights.pt")
            weights["pytorch_state_dict"] = bio.PytorchStateDictWeightsDescr(
                source=d / "weights.pt",
                pytorch_version=version,
                architecture=bio.ArchitectureFromLibraryDescr(
                    callable=bio.Identifier("network"),
                    import_from="segpipe.deep.nets",
                    kwargs=spec.model_dump(),
                ),
            )
            weights["torchscript"] = bio.TorchscriptWeightsDescr(
                source=d / "weights_torchscript.pt",
                pytorch_version=version,
                parent="pytorch_state_dict",
            )
        raw = bio.TensorId("raw")
        minimum = 2 * halo + spec.multiple  # the output keeps a core beyond its halo
        descr = bio.ModelDescr(
            name=stem,
            description=f"{spec.arch} ({spec.ndim}D) from segpipe: {', '.join(names)} per pixel",
            authors=[bio.Author(name="segpipe")],
            cite=[bio.CiteEntry(text=CITE[spec.arch][0], doi=bio.Doi(CITE[spec.arch][1]))],
            license=bio.LicenseId("BSD-3-Clause"),
            tags=["segmentation", "nuclei", "fluorescence", "segpipe", f"{spec.ndim}d"],
            documentation=bio.FileDescr(source=d / "README.md"),
            covers=[bio.FileDescr(source=d / "cover.png")],
            inputs=[
                bio.InputTensorDescr(
                    id=raw,
                    axes=[
                        bio.BatchAxis(),
                        bio.ChannelAxis(channel_names=[bio.Identifier("raw")]),
                        *(
                            bio.SpaceInputAxis(
                                id=bio.AxisId(a),
                                size=bio.ParameterizedSize(min=minimum, step=spec.multiple),
                            )
                            for a in axes
                        ),
                    ],
                    test_tensor=bio.FileDescr(source=d / "test_input.npy"),
                    preprocessing=[
                        bio.ScaleRangeDescr(
                            kwargs=bio.ScaleRangeKwargs(
                                axes=[bio.AxisId(a) for a in axes],
                                min_percentile=meta.normalise[0],
                                max_percentile=meta.normalise[1],
                            )
                        )
                    ],
                )
            ],
            outputs=[
                bio.OutputTensorDescr(
                    id=bio.TensorId("probabilities"),
                    axes=[
                        bio.BatchAxis(),
                        bio.ChannelAxis(channel_names=[bio.Identifier(n) for n in names]),
                        *(
                            bio.SpaceOutputAxisWithHalo(
                                id=bio.AxisId(a),
                                size=bio.SizeReference(tensor_id=raw, axis_id=bio.AxisId(a)),
                                halo=halo,
                            )
                            for a in axes
                        ),
                    ],
                    test_tensor=bio.FileDescr(source=d / "test_output.npy"),
                    postprocessing=[
                        bio.SoftmaxDescr(kwargs=bio.SoftmaxKwargs(axis=bio.AxisId("channel")))
                    ],
                )
            ],
            weights=bio.WeightsDescr(**weights),
            config={"segpipe": {"min_size": meta.min_size, "classes": list(names)}},  # type: ignore[arg-type]
        )
        tmp_zip = out_path.with_name(out_path.name + ".tmp")
        try:
            save_bioimageio_package(descr, output_path=tmp_zip)
        except Exception as err:  # bioimageio.spec raises ValueError and others
            tmp_zip.unlink(missing_ok=True)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SegpipeError(
                f"{out_path}: bioimageio.spec refused the package ({first})."
            ) from err
        tmp_zip.replace(out_path)
    return Exported(out_path, tuple(weights), image.shape)

"""Model files through `segpipe run`: bad ones fail before any compute with one line
naming the file; TorchScript and sidecar-less state_dicts work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from segpipe import synthetic
from segpipe.deep import checkpoint
from segpipe.deep.nets import NetSpec, build

pytestmark = pytest.mark.integration

SPEC = NetSpec(arch="unet", depth=2, width=8)


class CreatesFile:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def _net(spec: NetSpec = SPEC) -> torch.nn.Module:
    torch.manual_seed(1)
    return build(spec).eval()


def _state_dict(path: Path, spec: NetSpec = SPEC) -> Path:
    torch.save(_net(spec).state_dict(), path)
    return path


def _image(tmp_path: Path) -> Path:
    return synthetic.write_tiff(tmp_path / "in" / "img.tif", (200, 180), tile=128, seed=4)


def _run(run_cli, tmp_path: Path, model: Path, *sets: str):  # type: ignore[no-untyped-def]
    args = ["--input", str(_image(tmp_path)), "--output", str(tmp_path / "o.zarr")]
    args += ["--segmenter", "unet", "--tile", "128", "--set", f"model={model}"]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args)


def _refused(result, out: Path, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0
    text = " ".join(result.output.split())  # rich wraps long lines
    assert text.count("error:") == 1 and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text
    assert not out.exists(), "a bad model must fail before the output is touched"


def test_missing_model(run_cli, tmp_path: Path) -> None:
    result = _run(run_cli, tmp_path, tmp_path / "missing.pt")
    _refused(result, tmp_path / "o.zarr", "missing.pt", "not found")


def test_empty_model(run_cli, tmp_path: Path) -> None:
    model = tmp_path / "empty.pt"
    model.write_bytes(b"")
    _refused(_run(run_cli, tmp_path, model), tmp_path / "o.zarr", "empty.pt", "empty")


def test_random_bytes_model(run_cli, tmp_path: Path) -> None:
    model = tmp_path / "noise.pt"
    model.write_bytes(np.random.default_rng(0).bytes(4096))
    result = _run(run_cli, tmp_path, model, "depth=2", "width=8")
    # Not a zip: torch reads it as a legacy pickle, whose unpickler finds no pickle.
    _refused(result, tmp_path / "o.zarr", "noise.pt", "not a readable PyTorch checkpoint")


def test_truncated_model(run_cli, tmp_path: Path) -> None:
    whole = _state_dict(tmp_path / "whole.pt")
    model = tmp_path / "cut.pt"
    model.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = _run(run_cli, tmp_path, model, "depth=2", "width=8")
    _refused(result, tmp_path / "o.zarr", "cut.pt", "not a readable PyTorch checkpoint")


def test_weights_of_another_architecture(run_cli, tmp_path: Path) -> None:
    model = _state_dict(tmp_path / "deep3.pt", NetSpec(arch="unet", depth=3, width=8))
    result = _run(run_cli, tmp_path, model, "depth=2", "width=8")
    _refused(result, tmp_path / "o.zarr", "deep3.pt", "do not fit unet", "depth=2")


def test_sidecar_of_another_architecture(run_cli, tmp_path: Path) -> None:
    model = _state_dict(tmp_path / "m.pt")
    meta = checkpoint.ModelMeta(spec=NetSpec(arch="unet", depth=3, width=8))
    (tmp_path / "m.json").write_text(meta.model_dump_json())
    _refused(_run(run_cli, tmp_path, model), tmp_path / "o.zarr", "m.pt", "do not fit")


def test_model_of_another_segmenter(run_cli, tmp_path: Path) -> None:
    spec = NetSpec(arch="segnet", depth=2, width=8)
    model = checkpoint.save(tmp_path / "seg.pt", _net(spec), checkpoint.ModelMeta(spec=spec))
    _refused(_run(run_cli, tmp_path, model), tmp_path / "o.zarr", "seg.pt", "not a unet")


def test_pickled_code_never_runs(run_cli, tmp_path: Path) -> None:
    proof = tmp_path / "code-ran"
    model = tmp_path / "evil.pt"
    torch.save({"weight": CreatesFile(str(proof))}, model)
    result = _run(run_cli, tmp_path, model, "depth=2", "width=8")
    _refused(result, tmp_path / "o.zarr", "evil.pt", "refused")
    assert not proof.exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{not json", "not valid JSON"), (json.dumps({"spec": {"arch": "vgg"}}), "not a model")],
)
def test_bad_sidecar(run_cli, tmp_path: Path, text: str, problem: str) -> None:
    model = _state_dict(tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(text)
    _refused(_run(run_cli, tmp_path, model), tmp_path / "o.zarr", "m.json", problem)


def _labels(out: Path) -> tuple[np.ndarray, np.ndarray]:
    group = out / "img" / "labels"
    return (
        np.asarray(zarr.open_array(str(group / "semantic" / "0"))[:]),
        np.asarray(zarr.open_array(str(group / "instances" / "0"))[:]),
    )


def _reference(net: torch.nn.Module, tmp_path: Path, normalise: tuple[float, float]) -> np.ndarray:
    """Whole-image argmax with plain torch and numpy's percentiles, as the output's classes
    (nucleus where the network says interior or boundary)."""
    import tifffile

    image = tifffile.imread(tmp_path / "in" / "img.tif").astype(np.float64)
    lo, hi = np.percentile(image, normalise)
    x = ((image - lo) / (hi - lo)).astype(np.float32)
    x = np.pad(x, [(0, -n % 4) for n in x.shape], mode="reflect")
    with torch.inference_mode():
        out = net(torch.from_numpy(x)[None, None])[0].argmax(0).numpy() != 0
    return out.astype(np.uint8)[: image.shape[0], : image.shape[1]]


def test_torchscript_model(run_cli, tmp_path: Path) -> None:
    net = _net()
    model = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), str(model))
    result = _run(run_cli, tmp_path, model, "depth=2", "classes=3")
    assert result.exit_code == 0, result.output
    semantic, _ = _labels(tmp_path / "o.zarr")
    # The noisy synthetic image clips at 0: allow the histogram percentile its bin.
    assert (semantic == _reference(net, tmp_path, (1.0, 99.8))).mean() > 0.99


def test_state_dict_without_sidecar(run_cli, tmp_path: Path) -> None:
    model = _state_dict(tmp_path / "bare.pt")
    result = _run(run_cli, tmp_path, model, "depth=2", "width=8")
    assert result.exit_code == 0, result.output
    semantic, instances = _labels(tmp_path / "o.zarr")
    assert (semantic == _reference(_net(), tmp_path, (1.0, 99.8))).mean() > 0.99
    assert semantic.shape == instances.shape == (200, 180)


def test_new_weights_under_the_same_path_are_another_run(run_cli, tmp_path: Path) -> None:
    model = _state_dict(tmp_path / "bare.pt")
    args = ["--input", str(_image(tmp_path)), "--output", str(tmp_path / "o.zarr"), "-s", "unet"]
    args += ["--tile", "128", "--set", f"model={model}", "--set", "depth=2", "--set", "width=8"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    again = run_cli(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert "0 processed, 1 unchanged" in " ".join(again.output.split())
    net = _net()
    with torch.no_grad():
        next(net.parameters()).mul_(2.0)  # retrained weights, same file name
    torch.save(net.state_dict(), model)
    changed = run_cli(*args, "--resume")
    assert changed.exit_code == 1  # never "unchanged" results of the old weights
    assert "o.zarr" in changed.output and "--overwrite" in changed.output, changed.output

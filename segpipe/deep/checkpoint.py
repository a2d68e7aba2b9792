"""Model files: a state_dict (``.pt``) with a JSON sidecar, or a TorchScript file.

``model.pt`` holds only tensors (``torch.save(net.state_dict())``) and is read
with ``torch.load(weights_only=True)`` (`segpipe.io.models.load_weights`);
``model.json`` beside it holds the architecture (`NetSpec`), the input
normalisation and the model card. A TorchScript file (``torch.jit.save``) runs
as compiled TorchScript; its sidecar, if any, gives classes and normalisation.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segpipe.deep.nets import NetSpec, build
from segpipe.errors import ModelFileError
from segpipe.io.models import load_weights, model_file


class ModelMeta(BaseModel):
    """What the sidecar JSON of a model holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    spec: NetSpec
    normalise: tuple[float, float] = (1.0, 99.8)
    """Percentiles of the whole image mapped to 0 and 1 before the network."""
    min_size: int = Field(0, ge=0)
    """Smallest interior seed kept as an instance, in pixels."""
    card: dict[str, Any] = Field(default_factory=dict)
    """Model card: data, seed, command, scores."""


@dataclass
class LoadedModel:
    """A network in eval mode on the CPU, with what is known about it."""

    net: Any  # torch.nn.Module or torch.jit.ScriptModule
    meta: ModelMeta
    path: Path
    scripted: bool


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save(path: str | Path, net: Any, meta: ModelMeta) -> Path:
    """Write ``net``'s state_dict to ``path`` and ``meta`` to its sidecar (atomically each)."""
    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(p)
    side = sidecar(p)
    tmp_side = side.with_name(side.name + ".tmp")
    tmp_side.write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    tmp_side.replace(side)
    return p


def read_meta(path: Path) -> ModelMeta | None:
    """The sidecar of ``path``, or None when it has none."""
    side = sidecar(path)
    if not side.is_file():
        return None
    try:
        return ModelMeta.model_validate(json.loads(side.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{side}: not valid JSON ({err}).") from err
    except ValidationError as err:
        problem = err.errors()[0]["msg"]
        raise ModelFileError(f"{side}: not a model description ({problem}).") from err


def is_torchscript(path: Path) -> bool:
    """TorchScript archives carry compiled code (``code/``); state_dicts only ``data.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())


def load(path: str | Path, fallback: NetSpec | None = None) -> LoadedModel:
    """Load a model for inference, never running pickled code.

    Parameters
    ----------
    path : str or Path
        A state_dict ``.pt`` (architecture from its sidecar JSON, else ``fallback``)
        or a TorchScript file.
    fallback : NetSpec, optional
        Architecture to use when the file has no sidecar.

    Raises
    ------
    InputNotFoundError
        If the file is missing.
    ModelFileError
        If it is corrupt, holds pickled code, or does not fit the architecture.
    """
    import torch

    p = model_file(Path(path).expanduser().absolute())
    meta = read_meta(p)
    if meta is None and fallback is not None:
        meta = ModelMeta(spec=fallback, min_size=0)
    if is_torchscript(p):
        try:
            net = torch.jit.load(str(p), map_location="cpu")
        except Exception as err:  # torch raises RuntimeError and others for a bad archive
            raise ModelFileError(f"{p}: not a loadable TorchScript file ({err}).") from err
        if meta is None:
            raise ModelFileError(
                f"{p}: a TorchScript model needs its classes and depth: give them as options "
                "(classes=..., depth=...) or in a sidecar JSON."
            )
        return LoadedModel(net.eval(), meta, p, True)
    state = load_weights(p)
    if meta is None:
        raise ModelFileError(f"{p}: no sidecar {sidecar(p).name} and no architecture given.")
    try:
        net = build(meta.spec)
    except ValueError as err:
        raise ModelFileError(f"{p}: {err}") from err
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or wrong:
        s = meta.spec
        raise ModelFileError(
            f"{p}: weights do not fit {s.arch} (ndim={s.ndim}, depth={s.depth}, width={s.width}, "
            f"in_channels={s.in_channels}, classes={s.classes}): {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape "
            f"(e.g. {(missing + unexpected + wrong)[:2]})."
        )
    net.load_state_dict(state)
    return LoadedModel(net.eval(), meta, p, False)

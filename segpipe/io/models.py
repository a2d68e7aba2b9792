"""Loading model weights without running code from the file.

A PyTorch checkpoint is a pickle: loaded naively it can run any code. Here
only tensors (and plain containers of them) are accepted, through
``torch.load(weights_only=True)``; anything else is refused and nothing of
it is kept.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segpipe.errors import InputNotFoundError, ModelFileError

__all__ = ["load_weights", "model_file"]


def model_file(path: str | os.PathLike[str], what: str = "model") -> Path:
    """``path`` if it is a file; else one line saying what it is instead.

    Raises
    ------
    InputNotFoundError
        If nothing is there, or a directory is (a model is one file).
    """
    p = Path(path)
    if p.is_dir():
        raise InputNotFoundError(f"{p}: is a directory; the {what} is one file inside it.")
    if not p.is_file():
        raise InputNotFoundError(f"{p}: {what} file not found.")
    return p


def load_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A state dict (name → tensor) from a ``.pt``/``.pth`` file, never executing its code.

    Parameters
    ----------
    path : str or PathLike
        A file written by ``torch.save(model.state_dict(), path)``.

    Returns
    -------
    dict of str to torch.Tensor
        On the CPU.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    ModelFileError
        If it is empty, not a checkpoint, corrupt, holds pickled objects other than
        tensors (code), or is not a mapping of names to tensors. Naming the file.
    """
    import torch

    p = model_file(path)
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: model file is empty (0 bytes).")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # no reference to code: bytes that are no pickle
            raise ModelFileError(f"{p}: not a readable PyTorch checkpoint (corrupt?).") from err
        raise ModelFileError(
            f"{p}: refused: the file holds pickled objects other than tensors (code could "
            f"run on load); save a state_dict instead ({str(err).splitlines()[0]})."
        ) from err
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
        raise ModelFileError(f"{p}: not a readable PyTorch checkpoint ({err}).") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelFileError(
            f"{p}: expected a state_dict (names to tensors), got {type(state).__name__}."
        )
    return dict(state)

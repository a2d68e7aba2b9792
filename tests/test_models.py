"""Model files are loaded without executing code: pickled objects are refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from segpipe.errors import InputNotFoundError, ModelFileError
from segpipe.io.models import load_weights


class Payload:
    """Pickles into a call that creates a file: proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.target),))


def test_state_dict_loads(tmp_path: Path) -> None:
    model = torch.nn.Conv2d(1, 4, 3)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    state = load_weights(path)
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], model.weight.detach())


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    proof = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": Payload(proof)}, path)
    with pytest.raises(ModelFileError, match=r"evil\.pt: refused"):
        load_weights(path)
    assert not proof.exists()
    # the same through a plain pickle file
    plain = tmp_path / "evil.pth"
    plain.write_bytes(pickle.dumps(Payload(proof), protocol=2))
    with pytest.raises(ModelFileError, match=r"evil\.pth"):
        load_weights(plain)
    assert not proof.exists()


def test_whole_model_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Conv2d(1, 1, 3), path)  # a pickled module, not a state_dict
    with pytest.raises(ModelFileError, match=r"model\.pt"):
        load_weights(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_corrupt_or_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"bad\.pt"):
        load_weights(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save(torch.nn.Linear(50, 50).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"cut\.pt"):
        load_weights(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelFileError, match="expected a state_dict"):
        load_weights(path)


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match=r"nope\.pt"):
        load_weights(tmp_path / "nope.pt")

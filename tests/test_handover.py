"""`segpipe run` checks a run once: the flow takes over what the command line checked
(`flows.prepare.hand_over`), and checks again whatever it was not handed."""

from __future__ import annotations

from pathlib import Path

import pytest

import flows.prepare
from flows.prepare import hand_over, prepare_run, take_over
from segpipe import synthetic
from segpipe.config import RunConfig


def _params(config: RunConfig) -> dict[str, object]:
    return config.model_dump(mode="json", exclude={"prefect"})


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    for i in range(3):
        synthetic.write_tiff(tmp_path / "in" / f"f{i}.tif", (96, 96), seed=i)
    return tmp_path / "in"


def test_run_opens_every_input_once(
    run_cli, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real = flows.prepare.open_source

    def counted(path: str, **kwargs: object):  # type: ignore[no-untyped-def]
        opened.append(path)
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(flows.prepare, "open_source", counted)
    result = run_cli("--input", str(inputs), "--output", str(tmp_path / "out.zarr"))
    assert result.exit_code == 0, result.output
    assert sorted(Path(p).name for p in opened) == ["f0.tif", "f1.tif", "f2.tif"]
    assert all((tmp_path / "out.zarr" / f"f{i}").is_dir() for i in range(3))


def test_only_the_same_run_still_locked_is_taken_over(inputs: Path, tmp_path: Path) -> None:
    config = RunConfig(input=str(inputs), output=str(tmp_path / "out.zarr"))
    prepared = prepare_run(config)
    try:
        params = _params(prepared.config)
        hand_over(prepared, params)
        assert take_over({**params, "tile": 32}) is None  # another run's parameters
        assert take_over(params) is None  # handed over once, already claimed
        hand_over(prepared, params)
        assert take_over(params) is prepared
        hand_over(prepared, params)
        prepared.lock.release()
        assert take_over(params) is None  # its output no longer held
    finally:
        prepared.lock.release()

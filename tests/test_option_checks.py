"""Options of `plan`, `cluster-spec` and the SLURM / Kubernetes sections are checked as
`run`'s are: one line per bad value, naming it, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from segpipe import synthetic
from segpipe.errors import SegpipeError
from segpipe.segmenters import get_segmenter


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return synthetic.write_tiff(tmp_path / "img.tif", (64, 64), seed=1)


@pytest.mark.parametrize("flag", [["-n", "0"], ["-n", "-3"], ["--threads", "0"]])
def test_plan_refuses_no_workers_or_threads(image: Path, flag: list[str]) -> None:
    res = CliRunner().invoke(app, ["plan", "-i", str(image), *flag])
    assert res.exit_code == 2
    assert "greater than or equal to 1" in " ".join(res.output.replace("│", " ").split())


@pytest.mark.parametrize(
    "section, bad",
    [
        ("slurm", 'memory: "-4GB"'),
        ("slurm", "memory: lots"),
        ("slurm", 'walltime: "99:99:99"'),
        ("slurm", 'walltime: "1-25:00:00"'),
        ("kubernetes", "memory: -1Gi"),
        ("kubernetes", "memory: 8GB"),
    ],
)
def test_cluster_sections_refuse_bad_sizes_and_times(
    image: Path, tmp_path: Path, section: str, bad: str
) -> None:
    key, value = bad.split(": ")
    config = tmp_path / "run.yaml"
    extra = "  image: segpipe:cpu\n" if section == "kubernetes" else ""
    config.write_text(
        f"input: {image}\noutput: {tmp_path / 'o.zarr'}\ncluster: {section}\n"
        f"{section}:\n{extra}  {bad}\n"
    )
    for command in ("cluster-spec", "run"):
        res = CliRunner().invoke(app, [command, "--config", str(config)])
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1, res.output
        assert f"run.yaml: {section}.{key}:" in lines[0] and value.strip('"') in lines[0]
    assert not (tmp_path / "o.zarr").exists()


def test_good_cluster_sections_pass(image: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"input: {image}\noutput: {tmp_path / 'o.zarr'}\ncluster: slurm\n"
        "slurm:\n  memory: 1.5TB\n  walltime: 2-12:00:00\n"
    )
    res = CliRunner().invoke(app, ["cluster-spec", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert "#SBATCH -t 2-12:00:00" in res.output


@pytest.mark.parametrize("segmenter", ["forest", "unet"])
def test_a_model_that_is_a_directory_is_named_as_one(tmp_path: Path, segmenter: str) -> None:
    if segmenter == "unet":
        pytest.importorskip("torch")
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(SegpipeError, match=r"is a directory; the .*model is one file inside it"):
        get_segmenter(segmenter, model=str(folder))

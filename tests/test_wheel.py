"""segpipe installed from its wheel, without the repository: the wheel carries the plan's
calibration table, and `segpipe plan` and `segpipe cluster-spec` work from a directory
outside the repository, importing segpipe from the installed copy (not the editable one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from segpipe import synthetic

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "segpipe", "flows")  # what the Dockerfiles copy


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources (the build leaves nothing in the
    repository) and installed with ``--target``; this venv's packages serve its
    dependencies."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("segpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "segpipe/data/plan_costs.json" in names
    assert "segpipe/py.typed" in names
    target = tmp / "site"
    done = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def _segpipe(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(target), "PREFECT_HOME": str(cwd / "prefect")}
    return subprocess.run(
        [str(target / "bin" / "segpipe"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def away(tmp_path: Path) -> Path:
    """A working directory outside the repository."""
    assert not tmp_path.is_relative_to(ROOT)
    return tmp_path


def test_the_installed_copy_is_imported(installed: Path, away: Path) -> None:
    code = (
        "import flows, segpipe, segpipe.plan as p; "
        "print(segpipe.__file__, flows.__file__, p.COSTS_FILE)"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=away, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    paths = [Path(p) for p in out.stdout.split()]
    assert all(p.is_relative_to(installed) for p in paths), paths
    assert paths[2].is_file()


def test_segpipe_plan_uses_the_shipped_costs(installed: Path, away: Path) -> None:
    synthetic.write_tiff(away / "image.tif", (1200, 1000), seed=3)
    result = _segpipe(installed, away, "plan", "--input", "image.tif", "-n", "2", "--json", "-")
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads(result.stdout)
    assert plan["costs"] == str(installed / "segpipe" / "data" / "plan_costs.json")
    assert plan["images"][0]["shape"] == [1200, 1000]
    assert plan["wall_seconds"]["2"] > 0  # the estimate needs the calibration table
    table = _segpipe(installed, away, "plan", "--input", "image.tif")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "image" in table.stdout


def test_segpipe_cluster_spec(installed: Path, away: Path) -> None:
    run = {
        "input": "s3://bucket/in/",
        "output": "s3://bucket/out.zarr",
        "cluster": "kubernetes",
        "kubernetes": {
            "image": "registry/segpipe:cpu",
            "secret_env": {"AWS_ACCESS_KEY_ID": {"secret": "segpipe-s3", "key": "id"}},
        },
        "slurm": {"gpus": 1},
    }
    (away / "run.yaml").write_text(yaml.safe_dump(run), encoding="utf-8")
    kube = _segpipe(installed, away, "cluster-spec", "--config", "run.yaml")
    assert kube.returncode == 0, kube.stdout + kube.stderr
    spec = yaml.safe_load(kube.stdout)
    assert spec["kind"] == "DaskCluster"
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    assert {
        "name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "segpipe-s3", "key": "id"}},
    } in worker["env"]
    slurm = _segpipe(installed, away, "cluster-spec", "-c", "run.yaml", "--cluster", "slurm")
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr
    assert "#SBATCH --gres=gpu:1" in slurm.stdout

"""The output store: OME-Zarr 0.5 layout, pyramids, completion, determinism, config files."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from segpipe import synthetic


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_tiff(tmp_path_factory.mktemp("in") / "cells.tif", (700, 650), seed=2)


def _digest(root: Path) -> dict[str, str]:
    """Checksums of every chunk and metadata file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def test_layout_is_ome_zarr_napari_can_open(run_cli, small: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    assert run_cli("--input", str(small), "--output", str(out), "--tile", "128").exit_code == 0
    image = zarr.open_group(str(out / "cells"), mode="r")
    ome = image.attrs["ome"]
    assert ome["version"] == "0.5"
    datasets = ome["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["y", "x"]
    labels = zarr.open_group(str(out / "cells" / "labels"), mode="r")
    assert labels.attrs["ome"]["labels"] == ["instances", "semantic", "panoptic"]
    for name in ("instances", "semantic", "panoptic"):
        group = zarr.open_group(str(out / "cells" / "labels" / name), mode="r")
        assert "image-label" in group.attrs["ome"]
        level0 = group["0"][:]
        for k in (1, 2):  # nearest downsampling: never a label value that is not in level 0
            assert np.array_equal(group[str(k)][:], level0[:: 2**k, :: 2**k])
    assert np.array_equal(image["0"][:], tifffile.imread(small))
    assert image.attrs["segpipe"]["complete"] is True
    assert (out / "cells" / "tables" / "objects.parquet").exists()
    assert (out / "cells" / "tables" / "segments.parquet").exists()
    assert (out / "cells" / "previews" / "cells.png").exists()
    assert not (out / "_segpipe" / "scratch" / "cells").exists()
    # an independent NGFF reader finds the image and both label images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

        nodes = list(Reader(parse_url(str(out / "cells")))())
    assert len(nodes[0].data) == 3
    assert {n.zarr.path.rstrip("/").split("/")[-1] for n in nodes[1:]} >= {"instances", "semantic"}


@pytest.mark.slow  # test_collection_engine checks identity on 1 and 2 workers in the default suite
def test_output_identical_whatever_cluster_shape(run_cli, small: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert (
        run_cli(
            "--input", str(small), "--output", str(a), "--tile", "96", "--segmenter", "watershed"
        ).exit_code
        == 0
    )
    result = run_cli(
        "--input",
        str(small),
        "--output",
        str(b),
        "--tile",
        "96",
        "--segmenter",
        "watershed",
        "--workers",
        "2",
        "--threads",
        "1",
        cluster=False,
    )
    assert result.exit_code == 0, result.output
    da, db = _digest(a / "cells"), _digest(b / "cells")
    assert da and da == db


def test_config_file_and_flags_override(
    run_cli, small: Path, tmp_path: Path, cluster_address: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(small),
                "output": "from-file.zarr",
                "tile": 128,
                "halo": "auto",
                "cluster": cluster_address,
                "segmenter": {"name": "multiotsu", "sigma": 1.0, "classes": 3},
            }
        )
    )
    result = run_cli("--config", str(config), "--set", "classes=4")
    assert result.exit_code == 0, result.output
    out = tmp_path / "from-file.zarr"  # relative to the config file
    group = zarr.open_group(str(out / "cells"), mode="r")
    seg = group.attrs["segpipe"]["segmenter"]
    assert seg == {"name": "multiotsu", "sigma": 1.0, "classes": 4}
    semantic = zarr.open_array(str(out / "cells/labels/semantic/0"))[:]
    assert set(np.unique(semantic)) == {0, 1, 2, 3}


def test_rerun_same_settings_reuses_output(run_cli, small: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    args = ("--input", str(small), "--output", str(out), "--tile", "128", "--resume")
    assert run_cli(*args).exit_code == 0
    first = _digest(out / "cells")
    assert run_cli(*args).exit_code == 0
    assert _digest(out / "cells") == first


def test_lower_levels_from_the_relabel_pass_equal_striding(
    client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Levels 1-2 come from the relabel pass (chunks of a half and a quarter tile),
    level 3 from the pyramid tasks; every level of the image and of the three label
    images is level 0 taken every 2^k-th pixel."""
    from segpipe import blocks
    from segpipe.image import ImagePlan
    from segpipe.io.readers import open_source
    from segpipe.pipeline import run_image
    from segpipe.segmenters import get_segmenter
    from segpipe.stages import write as relabel

    monkeypatch.setattr(blocks, "MIN_LEVEL_CHUNK", 32)  # 2048-px tiles' rule, scaled down
    path = synthetic.write_tiff(tmp_path / "cells.tif", (1100, 900), seed=5)
    plan = ImagePlan(
        open_source(path), str(tmp_path / "out.zarr"), (128, 128), get_segmenter("otsu")
    )
    assert relabel.written_levels(plan) == 2 and len(relabel.pyramid(plan)) == 4
    run_image(client, plan)
    image = tifffile.imread(path)
    group = tmp_path / "out.zarr" / "cells"
    for sub, level0 in (
        ("", image),
        *((f"labels/{n}", None) for n in ("semantic", "instances", "panoptic")),
    ):
        arrays = [zarr.open_array(str(group / sub / str(k)), mode="r") for k in range(4)]
        level0 = arrays[0][:] if level0 is None else level0
        assert np.array_equal(arrays[0][:], level0)
        for k, arr in enumerate(arrays[1:], start=1):
            assert np.array_equal(arr[:], level0[:: 2**k, :: 2**k]), (sub, k)
        # level 3 is 138 × 113: its one chunk column is cut to the array
        assert [a.chunks for a in arrays] == [(128, 128), (64, 64), (32, 32), (128, 113)]
    assert zarr.open_array(str(group / "labels/instances/0"))[:].max() > 10


@pytest.mark.parametrize(
    "shape, factors, from_blocks",
    [
        ((12, 100, 90), [(1, 1, 1), (1, 2, 2), (1, 4, 4)], 2),  # thin: Z kept
        ((70, 100, 90), [(1, 1, 1), (2, 2, 2), (4, 4, 4)], 1),  # deep: Z halved too
    ],
)
def test_volumes_get_pyramids_halving_only_the_large_axes(
    client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape, factors, from_blocks
) -> None:
    """A volume's levels halve Y and X, and Z only while it is large (the sizes scaled
    down: a level stops at 32 instead of 256); the relabel pass writes the levels whose
    factor divides the tile, the pyramid tasks the others (the deep volume's level 2:
    the tile's Z, 30, is not a multiple of 4). Every
    level of the image and of each label image is level 0 taken every factor-th pixel,
    and its NGFF scale is that factor; ome-zarr-models validates the groups."""
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    from segpipe import blocks
    from segpipe.image import ImagePlan
    from segpipe.io.readers import open_source
    from segpipe.pipeline import run_image
    from segpipe.segmenters import get_segmenter
    from segpipe.stages import write as relabel

    monkeypatch.setattr(blocks, "VIEW_SIZE", 32)
    monkeypatch.setattr(blocks, "MIN_LEVEL_CHUNK", 8)
    path = synthetic.write_tiff(tmp_path / "cells.tif", shape, seed=4)
    plan = ImagePlan(
        open_source(path), str(tmp_path / "out.zarr"), (30, 64, 64), get_segmenter("otsu")
    )
    assert relabel.written_levels(plan) == from_blocks
    run_image(client, plan)
    image = tifffile.imread(path)
    group = tmp_path / "out.zarr" / "cells"
    for sub in ("", *(f"labels/{n}" for n in ("semantic", "instances", "panoptic"))):
        node = zarr.open_group(str(group / sub), mode="r")
        datasets = node.attrs["ome"]["multiscales"][0]["datasets"]
        assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == [
            list(map(float, f)) for f in factors
        ]
        level0 = image if sub == "" else node["0"][:]
        assert np.array_equal(node["0"][:], level0)
        for k, (fz, fy, fx) in enumerate(factors[1:], start=1):
            assert np.array_equal(node[str(k)][:], level0[::fz, ::fy, ::fx]), (sub, k)
        Image.from_zarr(node) if sub == "" else ImageLabel.from_zarr(node)

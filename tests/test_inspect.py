"""`segpipe inspect OUT.zarr`: images, arrays, classes, object counts, tables and previews."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import zarr
from typer.testing import CliRunner

from segpipe import image as segpipe_image
from segpipe import lifecycle, pipeline, synthetic
from segpipe.inspect import inspect_store
from segpipe.io.readers import open_source
from segpipe.io.store import open_output
from segpipe.segmenters import get_segmenter


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, client: Any) -> Path:
    tmp = tmp_path_factory.mktemp("inspect")
    root = tmp / "out.zarr"
    open_output(root, {"segmenter": "multiotsu", "options": {"classes": 3}}).release()
    seg = get_segmenter("multiotsu", classes=3)
    done = synthetic.write_tiff(tmp / "plate.tif", (400, 300), seed=3)
    plan = segpipe_image.ImagePlan(open_source(done), str(root), (128, 128), seg)
    pipeline.run_image(client, plan)
    # a second image whose run stopped after it began: listed as incomplete
    other = synthetic.write_tiff(tmp / "stopped.tif", (64, 64), seed=4)
    lifecycle.begin(segpipe_image.ImagePlan(open_source(other), str(root), (64, 64), seg))
    return root


def test_inspect_reports_what_the_store_holds(store: Path) -> None:
    info = inspect_store(store)
    assert info.run["run"]["segmenter"] == "multiotsu"
    assert [i.name for i in info.images] == ["plate", "stopped"]
    plate, stopped = info.images
    assert plate.complete and not stopped.complete
    assert plate.shape == (400, 300)
    group = store / "plate"
    assert plate.objects == dict(zarr.open_group(str(group)).attrs)["segpipe"]["objects"]
    arrays = {a.path: a for a in plate.arrays}
    assert set(arrays) == {
        "plate",
        "plate/labels/instances",
        "plate/labels/semantic",
        "plate/labels/panoptic",
    }
    for path, a in arrays.items():
        level0 = zarr.open_array(str(store / path / "0"))
        assert (a.shape, a.dtype, a.chunks) == (level0.shape, str(level0.dtype), level0.chunks)
        levels = [p.name for p in (store / path).iterdir() if p.name.isdigit()]
        assert a.levels == len(levels) == 2
    assert arrays["plate/labels/panoptic"].dtype == "uint64"
    assert [c["name"] for c in plate.classes] == ["background", "class1", "class2"]
    assert [c["thing"] for c in plate.classes] == [False, True, True]
    assert plate.divisor == 1000
    objects = pq.read_table(group / "tables" / "objects.parquet")
    by_class = Counter(objects.column("class_name").to_pylist())
    assert plate.objects_per_class == {"background": 0, **by_class}
    assert sum(by_class.values()) == plate.objects
    assert plate.tables["objects"]["rows"] == objects.num_rows
    segments = group / "tables" / "segments.parquet"
    assert plate.tables["segments"] == {
        "path": str(segments),
        "rows": pq.read_metadata(segments).num_rows,
    }
    assert plate.previews == [str(group / "previews" / "plate.png")]
    assert Path(plate.previews[0]).is_file()
    assert stopped.arrays == [] and stopped.tables == {} and stopped.previews == []


def test_cli_lists_images_tables_and_previews(store: Path, tmp_path: Path) -> None:
    from flows.cli import app

    report = tmp_path / "inspect.json"
    result = CliRunner().invoke(
        app, ["inspect", str(store), "--json", str(report)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in (
        "plate 400×300 complete",
        "stopped",
        "incomplete",
        "plate/labels/panoptic 2 400×300 uint64 128×128",
        "segments.parquet",
        "plate.png",
        "1 class1 thing",
    ):
        assert expected in text, expected
    assert json.loads(report.read_text()) == json.loads(json.dumps(inspect_store(store).to_dict()))


def test_missing_store_is_one_error_line(tmp_path: Path) -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 1
    assert "nope.zarr: no such output store" in result.output

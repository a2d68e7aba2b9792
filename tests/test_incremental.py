"""Incremental runs: only new or changed images are segmented; --full forces all; serve's checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
import zarr
from skimage import filters, measure
from typer.testing import CliRunner

from flows.cli import app
from flows.serve import deployment_parameters
from segpipe import synthetic
from segpipe.config import load_config


def _objects(path: Path) -> int:
    """Objects of the whole-image scikit-image recipe (the reference)."""
    smooth = filters.gaussian(tifffile.imread(path).astype(np.float32), 2, preserve_range=True)
    return int(measure.label(smooth > filters.threshold_otsu(smooth), connectivity=2).max())


def test_only_new_or_changed_images_run_and_full_forces_all(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "in"
    for i in range(2):
        synthetic.write_tiff(src / f"w{i}.tif", (300, 260), seed=i)
    out = tmp_path / "out.zarr"
    args = ("--input", str(src), "--output", str(out), "--tile", "128")
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    assert "2 processed, 0 unchanged, 0 failed" in " ".join(first.output.split())

    again = run_cli(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert "0 processed, 2 unchanged" in " ".join(again.output.split())

    # one image changes (same name, other content), one is new
    synthetic.write_tiff(src / "w1.tif", (300, 260), seed=7)
    os.utime(src / "w1.tif", ns=(1, 1))  # even with an old mtime: the size and mtime differ
    synthetic.write_tiff(src / "w2.tif", (200, 220), seed=3)
    nightly = run_cli(*args, "--resume")
    assert nightly.exit_code == 0, nightly.output
    assert "2 processed, 1 unchanged" in " ".join(nightly.output.split())
    for name in ("w0", "w1", "w2"):
        group = zarr.open_group(str(out / name), mode="r")
        assert group.attrs["segpipe"]["complete"] is True
        assert group.attrs["segpipe"]["objects"] == _objects(src / f"{name}.tif")

    full = run_cli(*args, "--full")
    assert full.exit_code == 0, full.output
    assert "3 processed, 0 unchanged" in " ".join(full.output.split())
    assert "full run" in full.output


def test_scheduled_runs_are_incremental_unless_full(tmp_path: Path) -> None:
    cfg = load_config(None, {"input": "in", "output": "out.zarr"})
    params = deployment_parameters(cfg)["config"]
    assert params["resume"] is True and params["full"] is False
    assert os.path.isabs(params["input"]) and os.path.isabs(params["output"])
    params = deployment_parameters(cfg, full=True)["config"]
    assert params["resume"] is False and params["full"] is True


def test_serve_refuses_a_bad_cron_or_config_before_serving(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("input: in\noutput: out.zarr\n")
    runner = CliRunner()
    bad = runner.invoke(app, ["serve", "--config", str(config), "--cron", "every night"])
    assert bad.exit_code == 1
    assert "--cron 'every night'" in " ".join(bad.output.split())
    tz = runner.invoke(app, ["serve", "--config", str(config), "--timezone", "Mars/Olympus"])
    assert tz.exit_code == 1 and "Mars/Olympus" in tz.output
    config.write_text("input: in\noutput: out.zarr\nsegmenter: {name: otsu, sigma: -1}\n")
    seg = runner.invoke(app, ["serve", "--config", str(config)])
    assert seg.exit_code == 1 and "otsu" in seg.output
    missing = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "nope.yaml" in missing.output


def test_an_interrupted_image_resumes_only_in_the_same_blocks(tmp_path: Path) -> None:
    """Markers name blocks by number: an interrupted image whose tile now resolves
    otherwise (``tile: auto`` per image and version) starts over; a complete one is kept."""
    from segpipe.image import ImagePlan
    from segpipe.io.readers import open_source
    from segpipe.io.store import image_state, mark_image
    from segpipe.lifecycle import begin, write_manifest
    from segpipe.segmenters import get_segmenter

    spec = open_source(synthetic.write_tiff(tmp_path / "v.tif", (96, 80), seed=1))
    root, otsu = str(tmp_path / "out.zarr"), get_segmenter("otsu")
    first = ImagePlan(spec, root, (64, 64), otsu)
    assert begin(first) == "fresh" and image_state(first.group)["tile"] == [64, 64]
    first.markers("ingest").save(0, {})
    assert begin(ImagePlan(spec, root, (64, 64), otsu)) == "resume"
    assert first.markers("ingest").done(0)  # kept for the resumed run
    assert begin(ImagePlan(spec, root, (32, 32), otsu)) == "fresh"
    assert not first.markers("ingest").done(0)  # another grid: its blocks start over
    mark_image(first.group, tile=None)  # an image begun before tiles were recorded
    assert begin(ImagePlan(spec, root, (32, 32), otsu)) == "fresh"
    write_manifest(first)  # what a finished image records of its files
    mark_image(first.group, complete=True)
    assert begin(ImagePlan(spec, root, (64, 64), otsu)) == "done"  # complete: any tile


def test_a_replacement_with_the_same_size_and_mtime_is_segmented_again(
    run_cli, tmp_path: Path
) -> None:
    """The unchanged-input test samples content: size and mtime alone do not vouch."""
    # uncompressed: two images of one shape make files of one size
    first, second = (
        tifffile.imread(synthetic.write_tiff(tmp_path / f"s{seed}.tif", (300, 260), seed=seed))
        for seed in (1, 2)
    )
    path = tmp_path / "in" / "w.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, first)
    out = tmp_path / "out.zarr"
    args = ("--input", str(path), "--output", str(out))
    assert run_cli(*args).exit_code == 0
    st = path.stat()
    tifffile.imwrite(path, second)  # other nuclei
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    again = run_cli(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert "1 processed, 0 unchanged" in " ".join(again.output.split()), again.output
    group = zarr.open_group(str(out / "w"), mode="r")
    assert group.attrs["segpipe"]["objects"] == _objects(path)


def test_a_record_from_before_content_samples_is_kept_and_completed(
    run_cli, tmp_path: Path
) -> None:
    """Stores written before `sample` existed stay unchanged (no recompute of every
    image after an upgrade); the sample is recorded then."""
    from segpipe.io.store import image_state, mark_image

    path = synthetic.write_tiff(tmp_path / "in" / "w.tif", (200, 200), seed=3)
    out = tmp_path / "out.zarr"
    args = ("--input", str(path), "--output", str(out))
    assert run_cli(*args).exit_code == 0
    recorded = image_state(str(out / "w"))["source"]
    old = {k: v for k, v in recorded.items() if k != "sample"}
    mark_image(str(out / "w"), source=old)
    again = run_cli(*args, "--resume")
    assert "0 processed, 1 unchanged" in " ".join(again.output.split()), again.output
    assert image_state(str(out / "w"))["source"] == recorded


def test_images_whose_input_is_gone_are_reported_then_pruned(run_cli, tmp_path: Path) -> None:
    """Deleted and renamed inputs between runs: their images are kept and reported as
    orphaned (summary and inspect), and removed with --prune; nothing else is."""
    from segpipe.inspect import inspect_store

    src = tmp_path / "in"
    for name in ("a", "b", "c"):
        synthetic.write_tiff(src / f"{name}.tif", (200, 160), seed=ord(name))
    out = tmp_path / "out.zarr"
    args = ("--input", str(src), "--output", str(out))
    assert run_cli(*args).exit_code == 0
    (out / "notes").mkdir()  # the user's own folder in the store
    (src / "a.tif").unlink()
    (src / "b.tif").rename(src / "d.tif")

    again = run_cli(*args, "--resume")
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert "2 image(s): 1 processed, 1 unchanged, 0 failed" in text, text
    assert "2 orphaned (input gone)" in text, text
    info = {i.name: i for i in inspect_store(out).images}
    assert sorted(info) == ["a", "b", "c", "d"]
    assert {n for n, i in info.items() if i.orphaned} == {"a", "b"}
    assert info["a"].source == str(src / "a.tif")
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert "2 orphaned" in shown.output and "orphaned: its input" in shown.output

    pruned = run_cli(*args, "--resume", "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert "2 pruned (input gone)" in " ".join(pruned.output.split()), pruned.output
    assert sorted(i.name for i in inspect_store(out).images) == ["c", "d"]
    for name in ("a", "b"):
        assert not (out / name).exists()
        assert not (out / "_segpipe" / "manifests" / f"{name}.npz").exists()
    assert (out / "notes").is_dir()

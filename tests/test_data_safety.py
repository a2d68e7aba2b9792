"""Data safety through `segpipe run`: nothing deleted that segpipe did not write, nothing
damaged kept as complete, one line for each refusal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr
from skimage import filters, measure

from segpipe import synthetic
from tests.helpers import same_up_to_renumbering


def _reference(image: np.ndarray) -> np.ndarray:
    """Whole-image scikit-image: Gaussian σ 2, Otsu, connected components."""
    smooth = filters.gaussian(image.astype(np.float32), sigma=2, preserve_range=True)
    return measure.label(smooth > filters.threshold_otsu(smooth), connectivity=image.ndim)


def _one_line_refusal(result, *needles: str) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    return text


def _check_result(out: Path, source: Path) -> None:
    """The image, its labels and its table are those of the whole-image reference."""
    image = tifffile.imread(source)
    group = zarr.open_group(str(out / source.stem), mode="r")
    assert group.attrs["segpipe"]["complete"] is True
    assert np.array_equal(group["0"][:], image)
    ref = _reference(image)
    labels = group["labels/instances/0"][:]
    assert same_up_to_renumbering(labels, ref)
    assert np.array_equal(group["labels/semantic/0"][:], (ref > 0).astype(np.uint8))
    panoptic = group["labels/panoptic/0"][:]
    assert np.array_equal(panoptic > 0, ref > 0)
    assert pq.read_metadata(out / source.stem / "tables" / "objects.parquet").num_rows == ref.max()
    if "1" in group:  # the pyramid is the level below, strided
        assert np.array_equal(group["1"][:], image[::2, ::2])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return synthetic.write_tiff(tmp_path / "img.tif", (300, 260), seed=3)


def test_overwrite_never_empties_a_folder_segpipe_did_not_make(run_cli, image, tmp_path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / "thesis.docx").write_text("years of work")
    result = run_cli("-i", str(image), "-o", str(home), "--overwrite")
    text = _one_line_refusal(result, str(home), "not a segpipe store")
    assert "--overwrite" not in text  # no advice that would delete it
    assert (home / ".ssh" / "id_ed25519").read_text() == "secret"
    assert sorted(p.name for p in home.iterdir()) == [".ssh", "thesis.docx"]


def test_overwrite_removes_only_what_segpipe_wrote(run_cli, image, tmp_path) -> None:
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(image), "-o", str(out), "--tile", "128").exit_code == 0
    (out / "NOTES.txt").write_text("my notes")
    (out / "mine").mkdir()
    (out / "mine" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    result = run_cli("-i", str(image), "-o", str(out), "--tile", "128", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "NOTES.txt").read_text() == "my notes"
    assert (out / "mine" / "zarr.json").exists()
    _check_result(out, image)


def test_an_input_inside_the_output_is_refused_untouched(run_cli, image, tmp_path) -> None:
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(image), "-o", str(out), "--tile", "128").exit_code == 0
    ref = out / "ref"
    zarr.save_array(str(ref), tifffile.imread(image), zarr_format=3)
    before = sorted(str(p.relative_to(ref)) for p in ref.rglob("*"))
    result = run_cli("-i", str(ref), "-o", str(out), "--resume")
    _one_line_refusal(result, str(ref), "inside the output store")
    assert sorted(str(p.relative_to(ref)) for p in ref.rglob("*")) == before
    # and the output inside an input
    result = run_cli("-i", str(ref), "-o", str(ref / "out.zarr"))
    _one_line_refusal(result, "lies inside this input")
    assert not (ref / "out.zarr").exists()


def test_scratch_as_a_link_is_refused_and_its_target_kept(run_cli, image, tmp_path) -> None:
    out = tmp_path / "out.zarr"
    assert run_cli("-i", str(image), "-o", str(out), "--tile", "128").exit_code == 0
    elsewhere = tmp_path / "fast-disk"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"x" * 10)
    (elsewhere / "blocks").mkdir()
    (elsewhere / "blocks" / "keep").write_text("k")
    scratch = out / "_segpipe"
    os.rename(scratch, tmp_path / "old-scratch")
    scratch.symlink_to(elsewhere)
    result = run_cli("-i", str(image), "-o", str(out), "--tile", "128", "--overwrite")
    _one_line_refusal(result, "_segpipe", "symbolic link")
    assert (elsewhere / "data.bin").read_bytes() == b"x" * 10
    assert (elsewhere / "blocks" / "keep").read_text() == "k"


def test_store_beside_its_images(run_cli, tmp_path) -> None:
    folder = tmp_path / "scans"
    a = synthetic.write_tiff(folder / "a.tif", (200, 180), seed=1)
    synthetic.write_tiff(folder / "b.tif", (150, 170), seed=2)
    out = folder / "out.zarr"
    for extra in ((), ("--resume",)):
        result = run_cli("-i", str(folder), "-o", str(out), "--tile", "128", *extra)
        assert result.exit_code == 0, result.output
    # the images, and the group that lists them
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("_", "z"))) == [
        "OME",
        "a",
        "b",
    ]
    _check_result(out, a)


def test_unsupported_urls_are_refused_in_one_line(run_cli, image, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli("-i", str(image), "-o", "ftp://host/out.zarr")
    _one_line_refusal(result, "ftp://host/out.zarr", "ftp://", "s3://")
    assert not (tmp_path / "ftp:").exists()
    result = run_cli("-i", "hdfs://cluster/img.tif", "-o", str(tmp_path / "o.zarr"))
    _one_line_refusal(result, "hdfs://cluster/img.tif")


def test_file_urls_are_local_paths_everywhere(run_cli, image, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.zarr"
    args = ("-i", f"file://{image}", "-o", f"file://{out}", "--tile", "128")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    _check_result(out, image)
    again = run_cli(*args, "--resume")
    assert again.exit_code == 0 and "1 unchanged" in again.output, again.output
    for command in (
        ("inspect", f"file://{out}"),
        ("evaluate", f"file://{out}/img", str(out / "img")),
        ("plan", "-i", f"file://{image}", "-o", f"file://{tmp_path / 'other.zarr'}"),
    ):
        done = CliRunner().invoke(app, list(command), catch_exceptions=False)
        assert done.exit_code == 0, (command, done.output)
    assert not any(p.name.startswith("file:") for p in tmp_path.rglob("*"))


def test_output_below_a_regular_file(run_cli, image, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    result = run_cli("-i", str(image), "-o", str(tmp_path / "notes.txt" / "out.zarr"))
    _one_line_refusal(result, "notes.txt", "not a directory")


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "garbage":  # same size, other bytes: only the checksum tells
        size = path.stat().st_size
        path.write_bytes(bytes((i * 7 + 1) % 256 for i in range(size)))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # one bit flipped
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "target, how",
    [
        pytest.param("img/0/c/0/0", "delete", marks=pytest.mark.slow),
        pytest.param("img/labels/semantic/0/c/1/1", "delete", marks=pytest.mark.slow),
        pytest.param("img/0/c/1/0", "garbage", marks=pytest.mark.slow),
        ("img/labels/instances/0/c/0/1", "garbage"),
        pytest.param("img/tables/objects.parquet", "flip", marks=pytest.mark.slow),
        ("_segpipe/manifests/img.npz", "truncate"),
    ],
)
def test_a_damaged_complete_result_is_computed_again(
    run_cli, image, tmp_path, target: str, how: str
) -> None:
    out = tmp_path / "out.zarr"
    args = ("-i", str(image), "-o", str(out), "--tile", "128")
    assert run_cli(*args).exit_code == 0
    _damage(out / target, how)
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "unchanged" not in result.output.split("Results")[0].split("img")[-1], result.output
    _check_result(out, image)
    # now intact: the next incremental run leaves it alone
    again = run_cli(*args, "--resume")
    assert again.exit_code == 0 and "unchanged" in again.output, again.output


@pytest.mark.parametrize(
    "how",
    [
        "delete",
        pytest.param("garbage", marks=pytest.mark.slow),
        "truncate",
        pytest.param("flip", marks=pytest.mark.slow),
    ],
)
def test_an_interrupted_image_recomputes_damaged_blocks(client, image, tmp_path, how) -> None:
    """Blocks finished before an interruption, then a chunk or a marker damaged: the
    resumed run checks each marker and recomputes what no longer holds."""
    from segpipe import image as segpipe_image
    from segpipe import lifecycle, pipeline, stages
    from segpipe.io.readers import open_source
    from segpipe.io.store import open_output
    from segpipe.segmenters import get_segmenter

    out = tmp_path / "out.zarr"
    open_output(out, {"test": 1}).release()
    spec = open_source(str(image))
    plan = segpipe_image.ImagePlan(spec, str(out), (128, 128), get_segmenter("otsu"))
    assert lifecycle.begin(plan) == "fresh"
    raw = stages.ingest.ingest(client, plan)
    stats = stages.statistics.statistics(client, plan, raw)
    stages.segment.segment(client, plan, stats)  # then the run is "interrupted"
    if how in ("delete", "garbage"):
        _damage(out / "img" / "labels" / "semantic" / "0" / "c" / "1" / "0", how)
        _damage(out / "img" / "0" / "c" / "0" / "1", how)
    else:
        _damage(plan.markers("segment").path(3), how)
        _damage(plan.markers("ingest").path(0), how)
    resumed = segpipe_image.ImagePlan(spec, str(out), (128, 128), get_segmenter("otsu"))
    assert pipeline.run_image(client, resumed).objects == _reference(tifffile.imread(image)).max()
    _check_result(out, image)
    tally = zarr.open_group(str(out / "img"), mode="r").attrs["segpipe"]["blocks"]
    assert 0 < tally["segment"]["computed"] < tally["segment"]["blocks"]


def test_a_marker_damaged_after_this_process_saved_it_is_not_trusted(image, tmp_path) -> None:
    """Markers are read back from memory in the process that saved them (a packed image's
    stages), but only while the file is what it saved: one damaged since is recomputed."""
    from segpipe import image as segpipe_image
    from segpipe import lifecycle, pipeline, stages
    from segpipe.engine import Inline
    from segpipe.io.markers import read_marker
    from segpipe.io.readers import open_source
    from segpipe.io.store import open_output
    from segpipe.segmenters import get_segmenter

    out = tmp_path / "out.zarr"
    open_output(out, {"test": 1}).release()
    spec = open_source(str(image))
    plan = segpipe_image.ImagePlan(spec, str(out), (128, 128), get_segmenter("otsu"))
    assert lifecycle.begin(plan) == "fresh"
    raw = stages.ingest.ingest(Inline(), plan)
    stats = stages.statistics.statistics(Inline(), plan, raw)
    stages.segment.segment(Inline(), plan, stats)
    kept = plan.markers("segment").load(3)
    assert all(not a.flags.writeable for a in kept.values())  # shared: nobody changes them
    _damage(plan.markers("segment").path(3), "flip")
    _damage(plan.markers("ingest").path(0), "truncate")
    assert read_marker(plan.markers("ingest").path(0)) is None
    resumed = segpipe_image.ImagePlan(spec, str(out), (128, 128), get_segmenter("otsu"))
    assert pipeline.run_image(Inline(), resumed).objects == _reference(tifffile.imread(image)).max()
    _check_result(out, image)
    tally = zarr.open_group(str(out / "img"), mode="r").attrs["segpipe"]["blocks"]
    assert 0 < tally["segment"]["computed"] < tally["segment"]["blocks"]


def test_a_zarr_input_rewritten_in_place_is_segmented_again(run_cli, tmp_path) -> None:
    region = (slice(0, 256), slice(0, 256))
    first, second = (synthetic.render(region, seed=s)[0] for s in (1, 2))
    source = tmp_path / "in.zarr"
    arr = zarr.create_array(str(source), shape=first.shape, chunks=(128, 128), dtype=first.dtype)
    arr[:] = first
    out = tmp_path / "out.zarr"
    args = ("-i", str(source), "-o", str(out), "--tile", "128")
    assert run_cli(*args).exit_code == 0
    meta = (source / "zarr.json").stat()
    zarr.open_array(str(source), mode="r+")[:] = second  # chunks only
    os.utime(source / "zarr.json", ns=(meta.st_atime_ns, meta.st_mtime_ns))
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    labels = zarr.open_array(str(out / "in" / "labels" / "instances" / "0"))[:]
    assert same_up_to_renumbering(labels, _reference(second))


def test_an_input_deleted_mid_run_is_named(client, image, tmp_path) -> None:
    from segpipe import image as segpipe_image
    from segpipe import lifecycle, stages
    from segpipe.errors import InputReadError
    from segpipe.io.readers import open_source
    from segpipe.io.store import open_output
    from segpipe.segmenters import get_segmenter

    out = tmp_path / "out.zarr"
    open_output(out, {"test": 1}).release()
    plan = segpipe_image.ImagePlan(
        open_source(str(image)), str(out), (128, 128), get_segmenter("otsu")
    )
    lifecycle.begin(plan)
    image.unlink()
    with pytest.raises(InputReadError, match=r"img\.tif"):
        stages.ingest.ingest(client, plan)


def test_skip_fails_one_image_whatever_the_exception(run_cli, tmp_path, monkeypatch) -> None:
    """An exception nobody foresaw, in the stages of one image (of several blocks, so its
    stages run in this process), fails that image alone under --on-error skip."""
    folder = tmp_path / "scans"
    synthetic.write_tiff(folder / "a.tif", (200, 180), seed=1)
    synthetic.write_tiff(folder / "b.tif", (150, 170), seed=2)
    from segpipe import stages

    statistics = stages.statistics.statistics

    def flaky(client, plan, raw, progress=None):  # type: ignore[no-untyped-def]
        if plan.name == "a":
            raise RuntimeError("something unforeseen\nover two lines")
        return statistics(client, plan, raw, *(() if progress is None else (progress,)))

    monkeypatch.setattr(stages.statistics, "statistics", flaky)
    out = tmp_path / "out.zarr"
    result = run_cli("-i", str(folder), "-o", str(out), "--tile", "64", "--on-error", "skip")
    assert result.exit_code == 3, result.output
    assert "RuntimeError: something unforeseen over two lines" in " ".join(result.output.split())
    assert zarr.open_group(str(out / "b"), mode="r").attrs["segpipe"]["complete"] is True
    assert not zarr.open_group(str(out / "a"), mode="r").attrs["segpipe"]["complete"]


def _claim(out: str, start: Any, release: Any, answers: Any) -> None:
    """One of several processes racing for ``out``: hold it until ``release`` if won."""
    from segpipe.errors import OutputLockedError
    from segpipe.io.store import open_output

    start.wait()
    try:
        lock = open_output(out, {"test": 1})
    except OutputLockedError as err:
        answers.put(("lost", os.getpid(), str(err)))
        return
    answers.put(("won", os.getpid(), ""))
    release.wait(60)
    lock.release()


def test_of_processes_racing_for_one_output_exactly_one_holds_it(tmp_path: Path) -> None:
    """The local lock (an O_EXCL create): of four processes started at one barrier, one
    claims the store and each other is refused in one line naming the holder's pid."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "out.zarr"
    start, release, answers = ctx.Barrier(4), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(out), start, release, answers)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [answers.get(timeout=120) for _ in procs]
    release.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    won = [pid for what, pid, _ in got if what == "won"]
    lost = [text for what, _, text in got if what == "lost"]
    assert len(won) == 1 and len(lost) == 3, got
    for text in lost:
        assert "in use by another run" in text and f"pid {won[0]}" in text and "\n" not in text
    assert not (out / "_segpipe" / "lock.json").exists()  # released by its holder

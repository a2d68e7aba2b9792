"""Bad input through `segpipe run`: a clear message naming the file, non-zero exit,
and nothing that looks like a complete result."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from segpipe import synthetic
from tests.helpers import fill_disk, once_exists


def _no_complete_result(out: Path) -> None:
    """Nothing under ``out`` claims to be a finished image."""
    if not out.exists():
        return
    for group in out.iterdir():
        if group.name.startswith("_") or not (group / "zarr.json").exists():
            continue
        attrs = zarr.open_group(str(group), mode="r").attrs.asdict()
        assert not attrs.get("segpipe", {}).get("complete"), group


def _fails(result, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0
    text = " ".join(result.output.split())  # rich wraps long lines
    for needle in needles:
        assert needle in text, text


def test_missing_file(run_cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope.tif"
    result = run_cli("--input", str(missing), "--output", str(tmp_path / "o.zarr"))
    _fails(result, "nope.tif", "no such file")
    _no_complete_result(tmp_path / "o.zarr")


def test_glob_matching_nothing(run_cli, tmp_path: Path) -> None:
    result = run_cli("--input", str(tmp_path / "*.tif"), "--output", str(tmp_path / "o.zarr"))
    _fails(result, "*.tif", "matches no files")


def test_truncated_tiff(run_cli, tmp_path: Path) -> None:
    good = synthetic.write_tiff(tmp_path / "in" / "good.tif", (600, 600), seed=1)
    data = good.read_bytes()
    bad = tmp_path / "in" / "bad.tif"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.zarr"
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(out))
    _fails(result, "bad.tif", "truncated")
    # every input is checked before any compute: not even the good one was written
    assert not (out / "good").exists()
    _no_complete_result(out)


def test_corrupt_tiff(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.tif"
    bad.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    result = run_cli("--input", str(bad), "--output", str(tmp_path / "o.zarr"))
    _fails(result, "garbage.tif")


def test_corrupt_tile_found_during_read(run_cli, tmp_path: Path) -> None:
    """A TIFF whose header is fine but one tile's compressed data is garbage."""
    path = synthetic.write_tiff(tmp_path / "tile.tif", (512, 512), tile=256, seed=1)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[3]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    out = tmp_path / "o.zarr"
    result = run_cli("--input", str(path), "--output", str(out))
    _fails(result, "tile.tif", "failed to read")
    _no_complete_result(out)


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_])
def test_unsupported_dtype(run_cli, tmp_path: Path, dtype: type) -> None:
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.ones((64, 64), dtype=dtype))
    result = run_cli("--input", str(path), "--output", str(tmp_path / "o.zarr"))
    _fails(result, "odd.tif")
    assert "dtype" in result.output or "not a readable" in result.output


def test_zero_size_image(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "empty.zarr"
    zarr.create_array(str(path), shape=(0, 64), chunks=(16, 16), dtype="uint16")
    result = run_cli("--input", str(path), "--output", str(tmp_path / "o.zarr"))
    _fails(result, "empty.zarr", "zero-length")


def test_empty_file(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "zero.tif"
    path.write_bytes(b"")
    result = run_cli("--input", str(path), "--output", str(tmp_path / "o.zarr"))
    _fails(result, "zero.tif", "empty")


def test_nan_in_float_image(run_cli, tmp_path: Path) -> None:
    data = np.ones((300, 300), np.float32)
    data[200, 10] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, data)
    out = tmp_path / "o.zarr"
    result = run_cli("--input", str(path), "--output", str(out), "--tile", "128")
    _fails(result, "nan.tif", "NaN")
    _no_complete_result(out)


def test_output_holding_another_run(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (300, 300), seed=1)
    out = tmp_path / "o.zarr"
    assert run_cli("--input", str(path), "--output", str(out), "--segmenter", "otsu").exit_code == 0
    result = run_cli("--input", str(path), "--output", str(out), "--segmenter", "watershed")
    _fails(result, "o.zarr", "different run", "--overwrite")
    # the earlier result is untouched and still complete
    assert zarr.open_group(str(out / "a"), mode="r").attrs["segpipe"]["complete"] is True
    result = run_cli(
        "--input", str(path), "--output", str(out), "--segmenter", "watershed", "--overwrite"
    )
    assert result.exit_code == 0, result.output


def test_output_is_some_other_folder(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (300, 300), seed=1)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.docx").write_text("do not delete")
    result = run_cli("--input", str(path), "--output", str(out))
    _fails(result, "precious", "not a segpipe store")
    assert (out / "thesis.docx").exists()


def test_bad_segmenter_option(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (300, 300), seed=1)
    result = run_cli("--input", str(path), "--output", str(tmp_path / "o.zarr"), "--set", "sigm=2")
    _fails(result, "otsu", "sigm")
    result = run_cli(
        "--input", str(path), "--output", str(tmp_path / "o.zarr"), "--segmenter", "nope"
    )
    _fails(result, "unknown segmenter", "watershed")


def test_bad_config_file(run_cli, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("input: a.tif\noutput: o.zarr\ntile: -3\nfrobnicate: 1\n")
    result = run_cli("--config", str(config))
    _fails(result, "run.yaml", "tile", "frobnicate")


# -- every option checked before any compute (issue 15, part 4) ------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--halo", "-5"], ["halo", ">= 0"]),
        (["--halo", "[1,2,3]"], ["a.tif", "halo [1, 2, 3]", "2D image", "give one value or 2"]),
        (["--tile", "64,64,64"], ["a.tif", "tile [64, 64, 64]", "2D image"]),
        (["--set", "sigma=1e308"], ["a.tif", "sigma", "use sigma <= 75"]),
        (["--set", "sigma=.inf"], ["sigma", "finite"]),
        (["--set", "sigma=.nan"], ["sigma", "finite"]),
        (["--set", "sigma=-1"], ["sigma", ">= 0"]),
        (["--set", "sigma=[1,1,1]"], ["a.tif", "sigma [1.0, 1.0, 1.0]", "one per axis"]),
        (["-s", "local", "--set", "block_size=999"], ["a.tif", "block_size 999", "<= 451"]),
        (["-s", "watershed", "--set", "h=.nan"], ["watershed", "h", "finite"]),
        (["-s", "edges", "--set", "low=-.inf"], ["edges", "low", "finite"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("-") else "",
)
def test_bad_option_is_refused_before_any_compute(
    run_cli, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (300, 300), seed=1)
    out = tmp_path / "o.zarr"
    result = run_cli("--input", str(path), "--output", str(out), *args)
    _fails(result, *needles)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()  # refused before the output was even claimed


@pytest.mark.parametrize("value", ["5", "[otsu]", "{name: 5}"])
def test_segmenter_of_the_wrong_type_in_the_config_file(
    run_cli, tmp_path: Path, value: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"input: a.tif\noutput: o.zarr\nsegmenter: {value}\n")
    result = run_cli("--config", str(config))
    _fails(result, "run.yaml", "segmenter")
    assert len(result.output.strip().splitlines()) == 1, result.output


# -- one line for every error, everywhere in the CLI (part 5) --------------------------


def _one_error_line(text: str) -> str:
    """The only line of ``text`` (CLI output) that starts with ``error:``; no traceback."""
    assert "Traceback" not in text and "Logging error" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def test_output_below_a_regular_file(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (200, 200), seed=1)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    result = run_cli("--input", str(path), "--output", str(tmp_path / "notes.txt" / "o.zarr"))
    assert result.exit_code == 1
    assert "notes.txt" in _one_error_line(result.output)
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def test_config_file_that_is_not_text(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "a.tif", (64, 64), seed=1)
    result = run_cli("--config", str(path))
    assert result.exit_code == 1
    assert "a.tif: not a text file" in _one_error_line(result.output)


def test_input_deleted_mid_run(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "in" / "gone.tif", (1024, 1024), tile=64, seed=1)
    out = tmp_path / "o.zarr"

    # the image's group is made as its first stage starts
    watcher = once_exists(out / "gone", path.unlink)
    result = run_cli("--input", str(path), "--output", str(out), "--tile", "64")
    watcher.join()
    # A worker that already holds the file open reads on (the pixels are still there);
    # one that opens it after the deletion fails the image, naming the file.
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        assert "gone.tif" in _one_error_line(result.output)
        _no_complete_result(out)
    assert not (out / "_segpipe" / "lock.json").exists()


def test_input_cut_short_mid_run(run_cli, tmp_path: Path) -> None:
    path = synthetic.write_tiff(tmp_path / "in" / "cut.tif", (1024, 1024), tile=64, seed=1)
    out = tmp_path / "o.zarr"

    # header kept, tiles gone: whoever reads next fails
    watcher = once_exists(out / "cut", lambda: os.truncate(path, 4096))
    result = run_cli("--input", str(path), "--output", str(out), "--tile", "64")
    watcher.join()
    assert result.exit_code == 1, result.output
    assert "cut.tif" in _one_error_line(result.output)
    _no_complete_result(out)
    assert not (out / "_segpipe" / "lock.json").exists()


def test_disk_full_while_the_results_are_written(run_cli, tmpfs, tmp_path: Path) -> None:
    """The disk fills once the labels are being written: what follows (pyramids,
    Parquet tables, preview, the `complete` mark) finds no space."""
    path = synthetic.write_tiff(tmp_path / "a.tif", (1024, 1024), seed=1)
    disk = tmpfs("24m")
    out = disk / "o.zarr"

    watcher = once_exists(out / "a" / "labels", lambda: fill_disk(disk / "ballast"))
    result = run_cli("--input", str(path), "--output", str(out), "--tile", "256")
    watcher.join()
    assert result.exit_code == 1, result.output
    line = _one_error_line(result.output)
    assert "No space left on device" in line
    assert line.startswith(f"error: {out}/"), line  # the file it could not write
    _no_complete_result(out)


def test_disk_full_while_the_parquet_tables_are_written(
    run_cli, tmpfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills just as the first Parquet table is opened (the hook only picks
    the moment: the writes that fail are pyarrow's own, on a full tmpfs)."""
    import pyarrow.parquet as pq

    path = synthetic.write_tiff(tmp_path / "a.tif", (512, 512), seed=1)
    disk = tmpfs("16m")
    out = disk / "o.zarr"
    opened = pq.ParquetWriter.__init__

    def fill_then_open(self, where, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not (disk / "ballast").exists():
            fill_disk(disk / "ballast")
        opened(self, where, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "__init__", fill_then_open)
    # several blocks: the tables are written here, by the client (a one-block image is
    # segmented whole on a worker)
    result = run_cli("--input", str(path), "--output", str(out), "--tile", "256")
    assert (disk / "ballast").exists()  # the tables were reached
    assert result.exit_code == 1, result.output
    assert "No space left on device" in _one_error_line(result.output)
    _no_complete_result(out)
    assert not (out / "_segpipe" / "lock.json").exists()


def test_an_unexpected_error_is_one_line_and_a_private_log(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.cli

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setenv("SEGPIPE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(flows.cli, "execute", bug)
    path = synthetic.write_tiff(tmp_path / "a.tif", (64, 64), seed=1)
    result = run_cli("--input", str(path), "--output", str(tmp_path / "o.zarr"))
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert line.startswith("error: RuntimeError: a bug over two lines (traceback in ")
    log = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs"
    assert oct(log.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in bug" in text


def test_every_command_has_the_last_resort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import segpipe.inspect
    from flows.cli import app

    def bug(store: str) -> None:
        raise KeyError("lost")

    monkeypatch.setenv("SEGPIPE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(segpipe.inspect, "inspect_store", bug)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 1
    assert _one_error_line(result.output).startswith("error: KeyError: 'lost' (traceback in ")


def test_the_entry_point_prints_one_line(tmp_path: Path) -> None:
    """The installed ``segpipe`` as a process: one line on stderr, the traceback in the log."""
    import subprocess
    import sys

    code = (
        "import sys, flows.cli\n"
        "def bug(*a, **k): raise ZeroDivisionError('division by zero')\n"
        "flows.cli.execute = bug\n"
        "sys.argv = ['segpipe', 'run', '-i', 'a.tif', '-o', 'o.zarr']\n"
        "flows.cli.main()\n"
    )
    env = {**__import__("os").environ, "SEGPIPE_LOG_DIR": str(tmp_path / "logs")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ZeroDivisionError: division by zero (traceback in ")
    (log,) = (tmp_path / "logs").iterdir()
    assert "segpipe run -i a.tif -o o.zarr" in log.read_text()


# -- first use (part 6) ------------------------------------------------------------------


def test_version() -> None:
    from importlib.metadata import version

    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"segpipe {version('segpipe')}"


def test_run_help_lists_every_registered_segmenter() -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from segpipe.segmenters import available

    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert len(available()) >= 10  # the built-in ones at least
    for name in available():
        assert name in text, name


def test_the_cli_starts_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, flows.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

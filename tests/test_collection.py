"""Collections: a file, a Zarr store, a directory, a glob or a manifest become absolute
image paths whose output names are unique."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from segpipe.errors import ConfigError, InputNotFoundError, SegpipeError
from segpipe.io.collection import resolve_inputs


def _tif(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
    return path


def _raises(exc: type[SegpipeError], spec: str | Path, *words: str) -> str:
    with pytest.raises(exc) as info:
        resolve_inputs(spec)
    msg = str(info.value)
    for word in words:
        assert word in msg, msg
    return msg


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    for name in ["b.tif", "a.ome.tiff", "c.png", "d.JPG"]:
        _tif(d / name)  # contents do not matter to resolution
    zarr.create_array(d / "e.zarr", shape=(4, 4), dtype="u1")
    (d / "notes.txt").write_text("not an image\n")
    (d / "._b.tif").write_bytes(b"\0\5\26\7")  # macOS resource fork
    (d / ".hidden.tif").write_bytes(b"")
    (d / "sub").mkdir()
    _tif(d / "sub" / "f.tif")
    return d


def test_single_file_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tif(tmp_path / "one.tif")
    assert resolve_inputs(path) == [str(path)]
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs("one.tif") == [str(path)]


def test_zarr_store_is_one_image(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "vol.zarr", shape=(4, 4), dtype="u1")
    assert resolve_inputs(tmp_path / "vol.zarr") == [str(tmp_path / "vol.zarr")]
    assert resolve_inputs(f"{tmp_path / 'vol.zarr'}/") == [str(tmp_path / "vol.zarr")]
    zarr.create_array(tmp_path / "nosuffix", shape=(4, 4), dtype="u1")  # zarr.json marks it
    assert resolve_inputs(tmp_path / "nosuffix") == [str(tmp_path / "nosuffix")]
    zarr.create_array(tmp_path / "v2", shape=(4, 4), dtype="u1", zarr_format=2)
    assert resolve_inputs(tmp_path / "v2") == [str(tmp_path / "v2")]


def test_directory_lists_images_sorted(folder: Path) -> None:
    names = [Path(p).name for p in resolve_inputs(folder)]
    assert names == ["a.ome.tiff", "b.tif", "c.png", "d.JPG", "e.zarr"]
    assert all(Path(p).is_absolute() for p in resolve_inputs(folder))


def test_directory_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x")
    _raises(InputNotFoundError, tmp_path, str(tmp_path), "no images")


def test_missing_path(tmp_path: Path) -> None:
    msg = _raises(InputNotFoundError, tmp_path / "nope", str(tmp_path / "nope"), "no such file")
    assert msg.startswith(str(tmp_path))


def test_glob(folder: Path) -> None:
    got = resolve_inputs(str(folder / "*.tif*"))
    assert [Path(p).name for p in got] == ["a.ome.tiff", "b.tif"]
    recursive = resolve_inputs(str(folder / "**" / "*.tif"))
    assert [Path(p).name for p in recursive] == ["b.tif", "f.tif"]


def test_glob_matching_nothing_names_the_pattern(folder: Path) -> None:
    pattern = str(folder / "*.nd2")
    _raises(InputNotFoundError, pattern, pattern, "matches no files")


def test_glob_matching_only_non_images(folder: Path) -> None:
    pattern = str(folder / "*.txt")
    _raises(InputNotFoundError, pattern, pattern, "matches 1 paths but no image")


def test_name_with_glob_characters_is_taken_literally(tmp_path: Path) -> None:
    path = _tif(tmp_path / "well[1].tif")
    assert resolve_inputs(path) == [str(path)]


def test_txt_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tif(tmp_path / "data" / "z.tif")
    _tif(tmp_path / "data" / "sub" / "y.tif")
    elsewhere = _tif(tmp_path / "other" / "x.tif")
    manifest = tmp_path / "data" / "list.txt"
    manifest.write_text(
        f"# plate 1\n\nz.tif\n  sub/y.tif  \n   # indented comment\n{elsewhere}\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path / "other")  # relative to the manifest, not the working dir
    assert resolve_inputs(manifest) == [
        str(tmp_path / "data" / "z.tif"),  # manifest order is kept
        str(tmp_path / "data" / "sub" / "y.tif"),
        str(elsewhere),
    ]


def test_csv_manifest_with_header_and_columns(tmp_path: Path) -> None:
    _tif(tmp_path / "a, b.tif")
    _tif(tmp_path / "c.tif")
    manifest = tmp_path / "plate.csv"
    # Excel writes a byte order mark; the path column need not be the first.
    manifest.write_text(
        '\ufeffwell,Path,condition\n# skipped\nA1,"a, b.tif",ctrl\nA2,c.tif,drug\n',
        encoding="utf-8",
    )
    assert resolve_inputs(manifest) == [str(tmp_path / "a, b.tif"), str(tmp_path / "c.tif")]


def test_csv_manifest_without_header(tmp_path: Path) -> None:
    _tif(tmp_path / "a.tif")
    _tif(tmp_path / "b.tif")
    (tmp_path / "m.csv").write_text("b.tif,1\na.tif,2\n")
    assert resolve_inputs(tmp_path / "m.csv") == [str(tmp_path / "b.tif"), str(tmp_path / "a.tif")]


def test_manifest_missing_entry_is_named(tmp_path: Path) -> None:
    _tif(tmp_path / "a.tif")
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.tif\n\nlost.tif\nalso_lost.tif\n")
    _raises(
        InputNotFoundError,
        manifest,
        str(tmp_path / "lost.tif"),
        "line 3",
        "and 1 more",
        str(manifest),
    )


def test_empty_manifest(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path\n# nothing yet\n")
    _raises(ConfigError, tmp_path / "m.csv", "lists no images")


def test_csv_row_without_a_path(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,path\n1,\n")
    _raises(ConfigError, tmp_path / "m.csv", "line 2", "column 2")


def test_duplicate_output_names_are_refused(tmp_path: Path) -> None:
    _tif(tmp_path / "cells.tif")
    _tif(tmp_path / "cells.png")
    msg = _raises(ConfigError, tmp_path, "'cells'", "rename one")
    assert str(tmp_path / "cells.tif") in msg and str(tmp_path / "cells.png") in msg


def test_duplicate_names_ignore_case(tmp_path: Path) -> None:
    _tif(tmp_path / "Cells.tif")
    _tif(tmp_path / "cells.ome.tif")
    _raises(ConfigError, tmp_path, "rename one")


def test_same_name_from_two_folders_in_a_manifest(tmp_path: Path) -> None:
    _tif(tmp_path / "day1" / "well.tif")
    _tif(tmp_path / "day2" / "well.tif")
    (tmp_path / "m.txt").write_text("day1/well.tif\nday2/well.tif\n")
    _raises(ConfigError, tmp_path / "m.txt", "'well'")


def test_errors_are_builtin_kinds_too(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_inputs(tmp_path / "nope.tif")
    _tif(tmp_path / "a.tif")
    _tif(tmp_path / "a.tiff")
    with pytest.raises(ValueError):
        resolve_inputs(tmp_path)

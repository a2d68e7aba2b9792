"""Readers against real files: every read is checked against tifffile/imagecodecs/zarr
reading the whole file, and every bad input must fail with a SegpipeError naming it."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagecodecs
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from segpipe.errors import (
    ConfigError,
    InputNotFoundError,
    InputReadError,
    SegpipeError,
    UnsupportedImageError,
)
from segpipe.io import readers
from segpipe.io.readers import SourceSpec, image_name, open_source, read_region

RNG = np.random.default_rng(42)


def _data(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return RNG.normal(100, 30, shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _full(spec: SourceSpec) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in spec.shape)


def _read(spec: SourceSpec, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """read_region, checking the contract every caller relies on."""
    out = read_region(spec, _full(spec) if region is None else region)
    region = _full(spec) if region is None else region
    assert out.shape == tuple(s.stop - s.start for s in region)
    assert out.dtype == spec.out_dtype
    assert out.dtype.isnative
    return out


def _expect(exc: type[SegpipeError], path: Path | str, *words: str, **kwargs: Any) -> str:
    """open_source(path) fails with ``exc``, naming the file and saying the problem."""
    with pytest.raises(exc) as info:
        open_source(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


def _tags(path: Path) -> dict[int, int]:
    with tifffile.TiffFile(path) as tif:
        return {t.code: t.valueoffset for t in tif.pages[0].tags.values()}


def _patch_long(path: Path, offsets: list[int], value: int) -> None:
    with open(path, "r+b") as fh:
        for off in offsets:
            fh.seek(off)
            fh.write(struct.pack("<I", value))


# -- TIFF -----------------------------------------------------------------------------


LAYOUTS = {
    "strip": {},
    "strips-zlib": {"compression": "zlib", "rowsperstrip": 16},
    "tiled-zlib": {"compression": "zlib", "tile": (32, 48)},
    "tiled-zstd-predictor": {"compression": "zstd", "tile": (32, 32), "predictor": True},
}


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tiff_2d_matches_tifffile(tmp_path: Path, dtype: str, layout: str) -> None:
    data = _data((100, 130), dtype)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, data, **LAYOUTS[layout])
    spec = open_source(path)
    assert (spec.format, spec.shape, spec.dtype, spec.name) == ("tiff", (100, 130), dtype, "img")
    whole = tifffile.imread(path)
    np.testing.assert_array_equal(_read(spec), whole)
    for region in [
        (slice(7, 71), slice(33, 129)),
        (slice(99, 100), slice(0, 1)),
        (slice(0, 0), slice(0, 5)),
    ]:
        np.testing.assert_array_equal(_read(spec, region), whole[region])


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
@pytest.mark.parametrize("layout", ["strip", "tiled-zlib"])
def test_big_endian_tiff_reads_like_little_endian(tmp_path: Path, dtype: str, layout: str) -> None:
    data = _data((64, 80), dtype)
    little, big = tmp_path / "little.tif", tmp_path / "big.tif"
    tifffile.imwrite(little, data, byteorder="<", **LAYOUTS[layout])
    tifffile.imwrite(big, data, byteorder=">", **LAYOUTS[layout])
    with tifffile.TiffFile(big) as tif:
        assert tif.byteorder == ">"
    s_little, s_big = open_source(little), open_source(big)
    assert (s_big.data_offset is not None) == (layout == "strip")  # memory map or Zarr store
    assert s_big.dtype == s_little.dtype == dtype
    assert s_big.out_dtype.isnative
    region = (slice(5, 50), slice(10, 77))
    np.testing.assert_array_equal(_read(s_big), data)
    np.testing.assert_array_equal(_read(s_big, region), _read(s_little, region))


def test_uncompressed_tiff_reads_through_a_memory_map(tmp_path: Path) -> None:
    data = _data((5, 200, 150), np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data)  # one strip per plane: a region must not decode whole planes
    spec = open_source(path)
    assert spec.data_offset is not None and spec.chunks == (1, 1, 1)
    region = (slice(1, 4), slice(190, 200), slice(0, 20))
    np.testing.assert_array_equal(_read(spec, region), data[region])


@pytest.mark.parametrize("layout", ["strip", "tiled-zlib"])
def test_a_small_region_of_a_large_tiff_reads_little(tmp_path: Path, layout: str) -> None:
    # 64 MiB on disk; the region is 64 KiB. A single-strip file must not be decoded whole.
    path = tmp_path / "large.tif"
    big = np.zeros((8192, 8192), np.uint8)
    big[4000:4256, 4000:4256] = _data((256, 256), np.uint8)
    opts = {"tile": (256, 256), "compression": "zlib"} if layout != "strip" else {}
    tifffile.imwrite(path, big, **opts)
    spec = open_source(path)
    region = (slice(4000, 4256), slice(4000, 4256))
    tracemalloc.start()
    try:
        out = _read(spec, region)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, big[region])
    assert peak < 8 * 2**20


def test_tiff_chunks_report_the_tile(tmp_path: Path) -> None:
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, _data((100, 130), np.uint8), tile=(32, 48), compression="zlib")
    assert open_source(path).chunks == (32, 48)


@pytest.fixture(params=["tiled-zlib", "strip"])
def rgb_tiff(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, np.ndarray]:
    data = _data((60, 70, 3), np.uint8)
    path = tmp_path / "rgb.tif"
    opts = {"tile": (32, 32), "compression": "zlib"} if request.param == "tiled-zlib" else {}
    tifffile.imwrite(path, data, photometric="rgb", **opts)
    assert (open_source(path, channel=0).data_offset is None) == (request.param == "tiled-zlib")
    return path, data


def test_rgb_tiff_needs_a_channel_choice(rgb_tiff: tuple[Path, np.ndarray]) -> None:
    path, _ = rgb_tiff
    msg = _expect(UnsupportedImageError, path, "3 channels", "channel: N", "mean|max|sum")
    assert "0 to 2" in msg
    _expect(UnsupportedImageError, path, "channel 3", channel=3)


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_rgb_tiff_channel_selection(rgb_tiff: tuple[Path, np.ndarray], channel: int) -> None:
    path, data = rgb_tiff
    spec = open_source(path, channel=channel)
    assert spec.axes == "YXC" and spec.shape == (60, 70)
    region = (slice(10, 50), slice(20, 65))
    np.testing.assert_array_equal(_read(spec, region), data[region][..., channel])


@pytest.mark.parametrize(
    ("channel", "reduce"),
    [
        ("mean", lambda d, a: d.mean(axis=a, dtype=np.float64).astype(np.float32)),
        ("max", lambda d, a: d.max(axis=a)),
        ("sum", lambda d, a: d.sum(axis=a, dtype=np.float64).astype(np.float32)),
    ],
)
def test_rgb_tiff_channel_reduction(
    rgb_tiff: tuple[Path, np.ndarray], channel: str, reduce: Any
) -> None:
    path, data = rgb_tiff
    spec = open_source(path, channel=channel)
    out = _read(spec, (slice(3, 40), slice(0, 70)))
    assert out.dtype == (np.uint8 if channel == "max" else np.float32)
    np.testing.assert_array_equal(out, reduce(data[3:40], -1))


def test_planar_rgb_tiff(tmp_path: Path) -> None:
    data = _data((3, 40, 50), np.uint16)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate", rowsperstrip=8)
    spec = open_source(path, channel=2)
    assert spec.axes == "CYX"
    np.testing.assert_array_equal(_read(spec, (slice(5, 30), slice(1, 2))), data[2, 5:30, 1:2])


def test_cyx_ome_tiff(tmp_path: Path) -> None:
    data = _data((4, 50, 60), np.uint16)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})
    _expect(UnsupportedImageError, path, "4 channels")
    spec = open_source(path, channel=3)
    assert (spec.name, spec.axes, spec.shape) == ("cells", "CYX", (50, 60))
    np.testing.assert_array_equal(_read(spec), data[3])
    np.testing.assert_array_equal(
        _read(open_source(path, channel="max"), (slice(0, 10), slice(40, 60))),
        data[:, :10, 40:].max(axis=0),
    )


def test_zcyx_ome_tiff(tmp_path: Path) -> None:
    data = _data((5, 2, 40, 30), np.uint8)
    path = tmp_path / "stack.ome.tiff"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "ZCYX"}, tile=(16, 16))
    spec = open_source(path, channel=1)
    assert (spec.axes, spec.shape) == ("ZCYX", (5, 40, 30))
    region = (slice(1, 4), slice(10, 33), slice(5, 30))
    np.testing.assert_array_equal(_read(spec, region), data[1:4, 1, 10:33, 5:30])
    mean = _read(open_source(path, channel="mean"), region)
    np.testing.assert_allclose(mean, data[1:4, :, 10:33, 5:30].mean(axis=1), rtol=1e-6)


def test_singleton_axes_are_dropped(tmp_path: Path) -> None:
    data = _data((1, 1, 1, 30, 40), np.uint8)
    path = tmp_path / "tczyx.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCZYX"})
    spec = open_source(path, channel=0)  # channel 0 of a one-channel image is fine
    assert spec.shape == (30, 40)
    np.testing.assert_array_equal(_read(spec), data[0, 0, 0])
    _expect(UnsupportedImageError, path, "channel 1", "has 1", channel=1)


def test_time_series_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "movie.ome.tif"
    tifffile.imwrite(path, _data((3, 20, 20), np.uint8), ome=True, metadata={"axes": "TYX"})
    _expect(UnsupportedImageError, path, "axis 'T'")


def test_zyx_tiff(tmp_path: Path) -> None:
    data = _data((6, 40, 50), np.float32)
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, data, compression="zlib", tile=(16, 16))
    spec = open_source(path)
    assert (spec.axes, spec.shape) == ("ZYX", (6, 40, 50))
    region = (slice(2, 5), slice(15, 40), slice(0, 17))
    np.testing.assert_array_equal(_read(spec, region), tifffile.imread(path)[region])


def test_axes_override_for_a_multipage_tiff(tmp_path: Path) -> None:
    data = _data((5, 20, 30), np.uint8)
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, data)
    assert open_source(path).axes == "ZYX"  # tifffile's 'Q' (unknown) is taken as planes
    spec = open_source(path, axes="CYX", channel=1)
    assert spec.shape == (20, 30)
    np.testing.assert_array_equal(_read(spec), data[1])
    _expect(UnsupportedImageError, path, "'YX'", "2 axes", axes="YX")


def test_pyramidal_ome_tiff_reads_level_0(tmp_path: Path) -> None:
    data = _data((256, 320), np.uint16)
    path = tmp_path / "pyramid.ome.tif"
    opts = {"tile": (64, 64), "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(data, subifds=2, metadata={"axes": "YX"}, **opts)
        tif.write(data[::2, ::2], subfiletype=1, **opts)
        tif.write(data[::4, ::4], subfiletype=1, **opts)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 3
    spec = open_source(path)
    assert spec.shape == (256, 320)
    region = (slice(60, 200), slice(100, 320))
    np.testing.assert_array_equal(_read(spec, region), data[region])


@pytest.fixture
def two_series(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """A plain (non-OME) TIFF holding two different images: tifffile makes each a series."""
    images = [_data((90, 70), np.uint16), _data((40, 130), np.float32)]
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(images[0], tile=(32, 32), compression="zlib")
        tif.write(images[1])
    with tifffile.TiffFile(path) as tif:
        assert [s.shape for s in tif.series] == [(90, 70), (40, 130)]
    return path, images


def test_tiff_with_two_series_is_refused_listing_them(
    two_series: tuple[Path, list[np.ndarray]],
) -> None:
    path, _ = two_series
    msg = _expect(UnsupportedImageError, path, "2 image series", "--series N")
    assert "0: (90, 70) uint16" in msg and "1: (40, 130) float32" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("series", [0, 1])
def test_tiff_series_chosen_is_read(two_series: tuple[Path, list[np.ndarray]], series: int) -> None:
    path, images = two_series
    spec = open_source(path, series=series)
    assert (spec.series, spec.shape, spec.dtype) == (
        series,
        images[series].shape,
        str(images[series].dtype),
    )
    np.testing.assert_array_equal(_read(spec), tifffile.imread(path, series=series))
    np.testing.assert_array_equal(_read(spec), images[series])
    # a worker reads through its own copy of the spec
    again = pickle.loads(pickle.dumps(spec))
    np.testing.assert_array_equal(
        _read(again, (slice(5, 33), slice(7, 61))), images[series][5:33, 7:61]
    )


def test_tiff_series_out_of_range_is_refused(two_series: tuple[Path, list[np.ndarray]]) -> None:
    path, _ = two_series
    msg = _expect(UnsupportedImageError, path, "series 2 requested", "choose 0 to 1", series=2)
    assert "1: (40, 130) float32" in msg


def test_series_of_single_image_inputs(tmp_path: Path) -> None:
    data = _data((20, 30), np.uint8)
    tifffile.imwrite(tmp_path / "one.tif", data)
    Image.fromarray(data).save(tmp_path / "one.png")
    zarr.create_array(tmp_path / "one.zarr", data=data, chunks=(8, 8))
    for name in ("one.tif", "one.png", "one.zarr"):
        np.testing.assert_array_equal(_read(open_source(tmp_path / name, series=0)), data)
    _expect(UnsupportedImageError, tmp_path / "one.tif", "series 1 requested", series=1)
    _expect(UnsupportedImageError, tmp_path / "one.png", "series 1", "one image", series=1)
    _expect(UnsupportedImageError, tmp_path / "one.zarr", "series 1", "one image", series=1)


@pytest.mark.parametrize("series", [-1, True, 1.5, "1"])
def test_bad_series_value(tmp_path: Path, series: Any) -> None:
    tifffile.imwrite(tmp_path / "a.tif", _data((8, 8), np.uint8))
    with pytest.raises(ConfigError, match="series"):
        open_source(tmp_path / "a.tif", series=series)


@pytest.mark.parametrize("layout", ["strip", "tiled-zlib", "zarr"])
def test_float16_reads_as_float32(tmp_path: Path, layout: str) -> None:
    """float16 is stored and segmented as float32 (every float16 is exact there)."""
    data = _data((50, 70), np.float16)
    if layout == "zarr":
        path = tmp_path / "half.zarr"
        zarr.create_array(path, data=data, chunks=(16, 16))
    else:
        path = tmp_path / "half.tif"
        tifffile.imwrite(path, data, **LAYOUTS[layout])
    spec = open_source(path)
    assert (spec.dtype, spec.out_dtype) == ("float16", np.float32)
    out = _read(spec)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data.astype(np.float32))


def test_read_region_is_thread_safe(tmp_path: Path) -> None:
    data = _data((256, 256), np.uint16)
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(path, data, tile=(32, 32), compression="zlib")
    spec = open_source(path)
    regions = [
        (slice(y, y + 40), slice(x, x + 40)) for y in range(0, 256, 40) for x in range(0, 256, 40)
    ]
    regions = [
        (slice(y.start, min(y.stop, 256)), slice(x.start, min(x.stop, 256))) for y, x in regions
    ]
    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(lambda r: (r, read_region(spec, r)), regions * 3))
    for region, part in parts:
        np.testing.assert_array_equal(part, data[region])


def test_spec_is_picklable_and_reads_in_a_fresh_cache(tmp_path: Path) -> None:
    data = _data((30, 40, 3), np.uint8)
    path = tmp_path / "rgb.tiff"
    tifffile.imwrite(path, data, photometric="rgb", tile=(16, 16), compression="zlib")
    spec = open_source(path, channel=1)
    _read(spec)
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec
    readers._open_tiff.cache_clear()
    readers._tiff_plane.cache_clear()
    np.testing.assert_array_equal(_read(copy), data[..., 1])


@pytest.mark.parametrize(
    "layout",
    [
        {"tile": (32, 48), "compression": "zlib"},
        {"tile": (32, 32), "compression": "lzw", "predictor": True},
        {"tile": (32, 32), "compression": "zstd"},
        {"tile": (32, 32)},
        {"rowsperstrip": 13, "compression": "zlib"},
        {"tile": (32, 32), "compression": "zlib", "byteorder": ">"},
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_plain_planes_are_decoded_tile_by_tile_as_tifffile_reads_them(
    tmp_path: Path, layout: dict[str, Any], dtype: Any
) -> None:
    """Tiled and stripped single-plane TIFFs take `tiff_tiles` (not tifffile's Zarr
    store); any region equals tifffile's whole-image read, edge tiles included."""
    data = _data((101, 157), dtype)
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, data, **layout)
    spec = open_source(path)
    readers._tiff_plane.cache_clear()
    rng = np.random.default_rng(7)
    for _ in range(25):
        y0, x0 = int(rng.integers(0, 100)), int(rng.integers(0, 156))
        region = (
            slice(y0, int(rng.integers(y0 + 1, 102))),
            slice(x0, int(rng.integers(x0 + 1, 158))),
        )
        np.testing.assert_array_equal(read_region(spec, region), tifffile.imread(path)[region])
    assert readers._tiff_plane.cache_info().currsize == 1
    assert readers._tiff_plane(spec, _stamp(path)) is not None


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def test_stacks_and_samples_go_through_tifffiles_store(tmp_path: Path) -> None:
    stack = _data((3, 40, 50), np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, tile=(16, 16), compression="zlib")
    rgb = _data((40, 50, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", tile=(16, 16))
    for name, data, options in (
        ("stack.tif", stack, {"axes": "ZYX"}),
        ("rgb.tif", rgb[..., 2], {"channel": 2}),
    ):
        spec = open_source(tmp_path / name, **options)
        assert readers._tiff_plane(spec, _stamp(tmp_path / name)) is None
        np.testing.assert_array_equal(_read(spec), data)


def test_read_region_sees_a_rewritten_file(tmp_path: Path) -> None:
    path = tmp_path / "img.tif"
    first, second = _data((40, 40), np.uint16), _data((40, 40), np.uint16)
    tifffile.imwrite(path, first, tile=(16, 16), compression="zlib")
    spec = open_source(path)
    np.testing.assert_array_equal(_read(spec), first)
    path.unlink()  # a new inode, as a re-export would give
    tifffile.imwrite(path, second, tile=(16, 16), compression="zlib")
    np.testing.assert_array_equal(_read(spec), second)


def test_read_region_checks_the_region(tmp_path: Path) -> None:
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, _data((20, 30), np.uint8))
    spec = open_source(path)
    for bad in [(slice(0, 5),), (slice(0, 21), slice(0, 5)), (slice(0, 5), slice(0, 30, 2))]:
        with pytest.raises(ValueError, match="region"):
            read_region(spec, bad)


# -- PNG and JPEG -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((40, 50), "uint8"), ((40, 50), "uint16"), ((40, 50, 3), "uint8"), ((40, 50, 4), "uint8")],
)
def test_png_written_by_imageio(tmp_path: Path, shape: tuple[int, ...], dtype: str) -> None:
    data = _data(shape, dtype)
    path = tmp_path / "img.png"
    iio.imwrite(path, data)
    spec = open_source(path, channel=None if len(shape) == 2 else 1)
    assert (spec.format, spec.shape, spec.dtype, spec.whole_file) == ("pil", (40, 50), dtype, True)
    expected = data if len(shape) == 2 else data[..., 1]
    np.testing.assert_array_equal(_read(spec), expected)
    region = (slice(3, 39), slice(10, 11))
    np.testing.assert_array_equal(_read(spec, region), expected[region])


@pytest.mark.parametrize("samples", [3, 4])
def test_16_bit_colour_png_keeps_16_bits(tmp_path: Path, samples: int) -> None:
    # Pillow (and imageio through it) silently read these as 8-bit.
    data = _data((30, 20, samples), np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(imagecodecs.png_encode(data))
    spec = open_source(path, channel="max")
    assert spec.dtype == "uint16"
    np.testing.assert_array_equal(_read(spec), data.max(axis=-1))
    assert _read(spec).max() > 255


def test_palette_and_transparency_png(tmp_path: Path) -> None:
    gray = _data((30, 40), np.uint8)
    palette, alpha = tmp_path / "palette.png", tmp_path / "gray_trns.png"
    Image.fromarray(gray).convert("P").save(palette)
    Image.fromarray(gray).save(alpha, transparency=5)
    spec = open_source(palette, channel=0)
    assert spec.stored_shape == (30, 40, 3)
    np.testing.assert_array_equal(
        _read(spec), np.asarray(Image.open(palette).convert("RGB"))[..., 0]
    )
    spec = open_source(alpha, channel=0)
    assert spec.stored_shape == (30, 40, 2)  # tRNS becomes an alpha channel
    np.testing.assert_array_equal(_read(spec), gray)


def test_bilevel_png_reads_as_0_255(tmp_path: Path) -> None:
    mask = _data((20, 30), np.uint8) > 128
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    spec = open_source(path)
    np.testing.assert_array_equal(_read(spec), mask.astype(np.uint8) * 255)


@pytest.mark.parametrize("shape", [(48, 64), (48, 64, 3)])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg(tmp_path: Path, shape: tuple[int, ...], progressive: bool) -> None:
    path = tmp_path / "photo.jpeg"
    Image.fromarray(_data(shape, np.uint8)).save(path, quality=90, progressive=progressive)
    spec = open_source(path, channel=None if len(shape) == 2 else 2)
    assert spec.shape == (48, 64)
    decoded = np.asarray(Image.open(path))
    expected = decoded if len(shape) == 2 else decoded[..., 2]
    got = _read(spec).astype(int)
    assert np.abs(got - expected).max() <= 1  # libjpeg IDCT rounding may differ by one


def test_cmyk_jpeg_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.fromarray(_data((20, 20, 4), np.uint8), "CMYK").save(path)
    _expect(UnsupportedImageError, path, "4 components")


def test_axes_for_png_must_fit_its_fixed_layout(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    iio.imwrite(path, _data((10, 12, 3), np.uint8))
    assert open_source(path, axes="YXS", channel=0).shape == (10, 12)
    _expect(UnsupportedImageError, path, "do not fit", axes="ZYX", channel=0)
    _expect(UnsupportedImageError, path, "'YX'", axes="YX", channel=0)


# -- Zarr and OME-Zarr ----------------------------------------------------------------


def test_plain_zarr_2d_and_3d(tmp_path: Path) -> None:
    data2, data3 = _data((50, 60), np.uint16), _data((8, 50, 60), np.float32)
    zarr.create_array(tmp_path / "a.zarr", data=data2, chunks=(16, 16))
    zarr.create_array(tmp_path / "v.zarr", data=data3, chunks=(2, 16, 16))
    spec = open_source(tmp_path / "a.zarr")
    assert (spec.format, spec.axes, spec.chunks) == ("zarr", "YX", (16, 16))
    np.testing.assert_array_equal(_read(spec, (slice(10, 40), slice(3, 60))), data2[10:40, 3:])
    spec = open_source(tmp_path / "v.zarr")
    assert spec.axes == "ZYX"
    region = (slice(3, 8), slice(0, 1), slice(20, 50))
    np.testing.assert_array_equal(_read(spec, region), data3[region])


def test_plain_zarr_axes_given_or_from_dimension_names(tmp_path: Path) -> None:
    data = _data((3, 40, 50), np.uint8)
    zarr.create_array(tmp_path / "cyx.zarr", data=data, chunks=(1, 16, 16))
    zarr.create_array(
        tmp_path / "named.zarr", data=data, chunks=(1, 16, 16), dimension_names=["c", "y", "x"]
    )
    spec = open_source(tmp_path / "cyx.zarr", axes="CYX", channel=2)
    np.testing.assert_array_equal(_read(spec), data[2])
    _expect(UnsupportedImageError, tmp_path / "named.zarr", "3 channels")
    spec = open_source(tmp_path / "named.zarr", channel="sum")
    np.testing.assert_array_equal(_read(spec), data.sum(axis=0, dtype=np.float32))


def test_plain_zarr_that_looks_like_rgb_needs_axes(tmp_path: Path) -> None:
    data = _data((40, 50, 3), np.uint8)
    zarr.create_array(tmp_path / "rgb.zarr", data=data, chunks=(16, 16, 3))
    _expect(UnsupportedImageError, tmp_path / "rgb.zarr", "set `axes`")
    spec = open_source(tmp_path / "rgb.zarr", axes="YXC", channel=0)
    np.testing.assert_array_equal(_read(spec), data[..., 0])


def test_zarr_v2_array(tmp_path: Path) -> None:
    data = _data((30, 40), np.uint16)
    z = zarr.create_array(
        tmp_path / "v2.zarr", shape=data.shape, chunks=(8, 8), dtype=">u2", zarr_format=2
    )
    z[:] = data
    assert json.loads((tmp_path / "v2.zarr" / ".zarray").read_text())["dtype"] == ">u2"
    spec = open_source(tmp_path / "v2.zarr")
    assert spec.dtype == "uint16"
    assert spec.array_path == str(tmp_path / "v2.zarr")
    np.testing.assert_array_equal(_read(spec), data)


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((70, 90), {"dimension_separator": "/", "compressor": None}),
        ((70, 90), {"order": "F", "filters": [{"id": "delta", "dtype": "<u2"}]}),
        ((5, 40, 33), {"dimension_separator": "."}),
    ],
)
def test_zarr_v2_layouts_read_as_zarr_reads_them(
    tmp_path: Path, shape: tuple[int, ...], options: dict[str, Any]
) -> None:
    data = _data(shape, np.uint16)
    path = tmp_path / "v2.zarr"
    chunks = tuple(min(n, 16) for n in shape)
    z = zarr.open_array(
        path, mode="w", shape=shape, chunks=chunks, dtype="<u2", zarr_format=2, **options
    )
    z[:] = data
    assert (path / ".zarray").is_file() and not (path / "zarr.json").exists()
    spec = open_source(path)
    assert (spec.array_path, spec.shape, spec.chunks) == (str(path), shape, chunks)
    np.testing.assert_array_equal(_read(spec), data)
    region = tuple(slice(n // 3, n - 1) for n in shape)
    np.testing.assert_array_equal(_read(spec, region), data[region])


def test_ngff_04_written_by_ome_zarr_with_levels(tmp_path: Path, ome_writer: Any) -> None:
    """NGFF 0.4 (Zarr v2: .zgroup/.zattrs/.zarray, "/" chunk keys): level 0 is read."""
    write_image, ome_format = ome_writer
    data = _data((3, 100, 80), np.float32)
    path = tmp_path / "cells.ome.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=2)
    write_image(
        data, root, axes="zyx", fmt=ome_format.FormatV04(), storage_options={"chunks": (1, 32, 32)}
    )
    attrs = json.loads((path / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4"
    level0 = attrs["multiscales"][0]["datasets"][0]["path"]
    assert len(attrs["multiscales"][0]["datasets"]) > 1
    spec = open_source(path)
    assert (spec.name, spec.axes, spec.shape) == ("cells", "ZYX", (3, 100, 80))
    assert spec.array_path == str(path / level0) and (path / level0 / ".zarray").is_file()
    np.testing.assert_array_equal(_read(spec), data)
    np.testing.assert_array_equal(
        _read(spec, (slice(1, 3), slice(30, 70), slice(5, 77))), data[1:3, 30:70, 5:77]
    )


def test_hand_written_ngff_04(tmp_path: Path) -> None:
    """The NGFF 0.4 layout written by hand: multiscales in the group's .zattrs."""
    data = _data((2, 50, 60), np.uint8)
    path = tmp_path / "hand.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=(1, 25, 25))
    root.create_array("1", data=data[:, ::2, ::2], chunks=(1, 25, 25))
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    datasets = [
        {"path": p, "coordinateTransformations": [{"type": "scale", "scale": [1.0, s, s]}]}
        for p, s in (("0", 1.0), ("1", 2.0))
    ]
    (path / ".zattrs").write_text(
        json.dumps({"multiscales": [{"version": "0.4", "axes": axes, "datasets": datasets}]})
    )
    spec = open_source(path, channel=1)
    assert (spec.axes, spec.shape, spec.array_path) == ("CYX", (50, 60), str(path / "0"))
    np.testing.assert_array_equal(_read(spec), data[1])


@pytest.fixture
def ome_writer() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr import format as ome_format
        from ome_zarr.writer import write_image
    return write_image, ome_format


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_image(tmp_path: Path, ome_writer: Any, version: str) -> None:
    write_image, ome_format = ome_writer
    data = _data((2, 6, 64, 48), np.uint16)
    path = tmp_path / "image.ome.zarr"
    if version == "0.5":
        root = zarr.open_group(path, mode="w")
        write_image(data, root, axes="czyx", scale_factors=(2,))
    else:
        root = zarr.open_group(path, mode="w", zarr_format=2)
        write_image(data, root, axes="czyx", scale_factors=(2,), fmt=ome_format.FormatV04())
    _expect(UnsupportedImageError, path, "2 channels")
    spec = open_source(path, channel=1)
    assert (spec.name, spec.axes, spec.shape, spec.array_path) == (
        "image",
        "CZYX",
        (6, 64, 48),
        str(path / "s0"),
    )
    region = (slice(2, 6), slice(30, 64), slice(0, 20))
    np.testing.assert_array_equal(_read(spec, region), data[1, 2:6, 30:64, 0:20])


def _ngff_05(path: Path, data: np.ndarray, axes: list[dict[str, str]], **attrs: Any) -> None:
    root = zarr.open_group(path, mode="w")
    root.create_array("full", data=data, chunks=data.shape)
    root.create_array("half", data=data[..., ::2, ::2], chunks=data.shape)
    datasets = [
        {"path": p, "coordinateTransformations": [{"type": "scale", "scale": [1.0] * data.ndim}]}
        for p in ("full", "half")
    ]
    root.attrs.update(
        {"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}, **attrs}
    )


def test_hand_written_ngff_05(tmp_path: Path) -> None:
    data = _data((1, 3, 40, 30), np.uint8)
    axes = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    _ngff_05(tmp_path / "hand.zarr", data, axes)
    spec = open_source(tmp_path / "hand.zarr", channel=2)
    assert (spec.axes, spec.shape) == ("1CYX", (40, 30))
    assert spec.array_path == str(tmp_path / "hand.zarr" / "full")
    np.testing.assert_array_equal(_read(spec), data[0, 2])


def test_bioformats2raw_layout(tmp_path: Path) -> None:
    data = _data((20, 30), np.uint16)
    root = zarr.open_group(tmp_path / "plate.zarr", mode="w")
    root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    _ngff_05(tmp_path / "plate.zarr" / "0", data, axes)
    spec = open_source(tmp_path / "plate.zarr")
    assert spec.array_path == str(tmp_path / "plate.zarr" / "0" / "full")
    np.testing.assert_array_equal(_read(spec), data)


def test_zarr_group_without_multiscales(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "g.zarr", mode="w").create_array("a", shape=(4, 4), dtype="u1")
    _expect(InputReadError, tmp_path / "g.zarr", "multiscales", "path of the array")


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"ome": "junk"}, ["without OME-Zarr multiscales"]),
        ({"ome": {"multiscales": [{"datasets": []}]}}, ["malformed", "multiscales"]),
        ({"multiscales": "s0"}, ["malformed"]),
        (
            {"ome": {"multiscales": [{"datasets": [{"path": "../elsewhere"}]}]}},
            ["leaves the store"],
        ),
        ({"ome": {"multiscales": [{"datasets": [{"path": "missing"}]}]}}, ["not a Zarr store"]),
    ],
)
def test_malformed_ome_zarr_metadata(
    tmp_path: Path, attrs: dict[str, Any], words: list[str]
) -> None:
    path = tmp_path / "bad.ome.zarr"
    zarr.open_group(path, mode="w").attrs.update(attrs)
    _expect(InputReadError, path, *words)


def test_unparsable_zarr_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.zarr"
    path.mkdir()
    (path / "zarr.json").write_text("{ not json")
    _expect(InputReadError, path, "unreadable Zarr metadata")


def test_directory_that_is_not_zarr(tmp_path: Path) -> None:
    (tmp_path / "nothing.zarr").mkdir()
    _expect(InputReadError, tmp_path / "nothing.zarr", "not a Zarr store")


def _pickle_canary(flag: Path) -> bytes:
    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(flag), "w"))

    return pickle.dumps(np.array([Boom()] * 4, dtype=object))


def _object_zarr_v2(path: Path, filters: list[dict[str, Any]]) -> None:
    """A 2x2 Zarr v2 array of Python objects, encoded by ``filters``."""
    path.mkdir()
    zarray = {
        "zarr_format": 2,
        "shape": [2, 2],
        "chunks": [2, 2],
        "dtype": "|O",
        "compressor": None,
        "fill_value": None,
        "order": "C",
        "filters": filters,
    }
    (path / ".zarray").write_text(json.dumps(zarray))


def test_object_dtype_with_pickle_is_never_unpickled(tmp_path: Path) -> None:
    path, flag = tmp_path / "obj.zarr", tmp_path / "pwned"
    _object_zarr_v2(path, [{"id": "pickle", "protocol": 5}])
    (path / "0.0").write_bytes(_pickle_canary(flag))
    _expect(UnsupportedImageError, path, "pickle")
    assert not flag.exists()


def test_object_dtype_without_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.zarr"
    _object_zarr_v2(path, [{"id": "vlen-utf8"}])
    _expect(UnsupportedImageError, path, "object")


def test_pickle_codec_on_numbers_is_refused(tmp_path: Path) -> None:
    import numcodecs

    path = tmp_path / "pk.zarr"
    z = zarr.create_array(
        path,
        shape=(4, 4),
        chunks=(2, 2),
        dtype="u1",
        zarr_format=2,
        filters=[numcodecs.Pickle()],
        compressors=None,
    )
    z[:] = 1
    _expect(UnsupportedImageError, path, "pickle")


def test_string_zarr_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: strings have no stable v3 specification
        zarr.create_array(path, data=np.array([["a", "b"], ["c", "d"]], dtype=str))
    _expect(UnsupportedImageError, path, "unsupported dtype")


def test_zero_length_axis(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "empty.zarr", shape=(0, 10), chunks=(1, 10), dtype="u1")
    _expect(UnsupportedImageError, tmp_path / "empty.zarr", "zero-length")


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_unsupported_dtypes(tmp_path: Path, dtype: str) -> None:
    data = np.zeros((20, 20), dtype)
    zarr.create_array(tmp_path / "a.zarr", data=data)
    _expect(UnsupportedImageError, tmp_path / "a.zarr", "unsupported dtype", dtype)
    tifffile.imwrite(tmp_path / "a.tif", data)
    _expect(UnsupportedImageError, tmp_path / "a.tif", "unsupported dtype", dtype)


# -- bad inputs --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.tif"
    msg = _expect(InputNotFoundError, path, "no such file")
    with pytest.raises(FileNotFoundError):  # also the builtin it refines
        open_source(path)
    assert msg.startswith(str(path))


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tifffile.imwrite(tmp_path / "rel.tif", _data((8, 8), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert open_source("rel.tif").path == str(tmp_path / "rel.tif")


@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.touch()
    _expect(InputReadError, path, "empty", "0 bytes")


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "image.xyz"
    tifffile.imwrite(path, _data((8, 8), np.uint8))
    _expect(UnsupportedImageError, path, "unknown image type", ".tif")


def test_content_that_does_not_match_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "actually_png.tif"
    iio.imwrite(path, _data((8, 8), np.uint8), extension=".png")
    _expect(InputReadError, path, "named like a TIFF", "PNG file")


@pytest.mark.parametrize("layout", ["tiled-zlib", "strip", "strips-zlib"])
def test_truncated_tiff(tmp_path: Path, layout: str) -> None:
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, _data((128, 128), np.uint16), **LAYOUTS[layout])
    blob = whole.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(blob[: len(blob) // 2])
    _expect(InputReadError, path, "truncated")


@pytest.mark.parametrize("keep", [4, 8, 12])
def test_tiff_cut_inside_its_header(tmp_path: Path, keep: int) -> None:
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, _data((16, 16), np.uint8))
    path = tmp_path / "cut.tif"
    path.write_bytes(whole.read_bytes()[:keep])
    _expect(InputReadError, path)


def test_random_bytes_named_tiff(tmp_path: Path) -> None:
    path = tmp_path / "noise.tif"
    path.write_bytes(RNG.bytes(4096))
    _expect(InputReadError, path, "not an image")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("header", [b"II*\x00\x08\x00\x00\x00", b"MM\x00*\x00\x00\x00\x08"])
def test_garbage_behind_a_tiff_header(tmp_path: Path, seed: int, header: bytes) -> None:
    path = tmp_path / "garbage.tif"
    path.write_bytes(header + np.random.default_rng(seed).bytes(2000))
    try:
        spec = open_source(path)
    except SegpipeError as err:
        assert str(path) in str(err)
        return
    try:  # the rare garbage that parses must still fail cleanly, or read
        read_region(spec, _full(spec))
    except SegpipeError as err:
        assert str(path) in str(err)


def test_corrupt_tile_fails_on_read_naming_the_file(tmp_path: Path) -> None:
    data = _data((128, 128), np.uint16)
    path = tmp_path / "bad_tile.tif"
    tifffile.imwrite(path, data, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    with open(path, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(RNG.bytes(count - 4))
    spec = open_source(path)  # headers are intact: only decoding can tell
    with pytest.raises(InputReadError, match="failed to read pixels") as info:
        read_region(spec, _full(spec))
    assert str(path) in str(info.value)
    good = (slice(0, 64), slice(0, 128))  # tiles 0 and 1 are fine and still readable
    np.testing.assert_array_equal(_read(spec, good), data[good])


def test_file_deleted_after_open(tmp_path: Path) -> None:
    path = tmp_path / "gone.tif"
    tifffile.imwrite(path, _data((16, 16), np.uint8))
    spec = open_source(path)
    path.unlink()
    readers._open_tiff.cache_clear()
    with pytest.raises(InputReadError, match=r"gone\.tif"):
        read_region(spec, _full(spec))


def _peak_bytes(fn: Any) -> int:
    """Peak Python memory allocated while ``fn()`` runs."""
    tracemalloc.start()
    try:
        fn()
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def test_tiff_decompression_bomb_is_refused_without_allocating(tmp_path: Path) -> None:
    # A 300-byte file whose single compressed strip claims 10^6 x 10^6 pixels.
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="zlib", metadata=None)
    tags = _tags(path)
    _patch_long(path, [tags[256], tags[257], tags[278]], 10**6)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape == (10**6, 10**6)
    assert (
        _peak_bytes(lambda: _expect(UnsupportedImageError, path, "decompression bomb")) < 20 * 2**20
    )


def test_tiled_tiff_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), tile=(16, 16), compression="zlib")
    tags = _tags(path)
    _patch_long(path, [tags[256], tags[257]], 10**6)
    _expect(InputReadError, path, "corrupt", "16 strip/tile offsets")


def test_huge_tiff_chunk_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "onestrip.tif"
    tifffile.imwrite(path, _data((64, 64), np.uint16), compression="zlib")
    monkeypatch.setattr(readers, "MAX_CHUNK_BYTES", 1000)
    _expect(UnsupportedImageError, path, "one stored chunk", "tiled")


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def test_png_decompression_bomb_is_refused(tmp_path: Path) -> None:
    # Valid CRCs throughout; only the IHDR's size is absurd for the data present.
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    assert (
        _peak_bytes(lambda: _expect(UnsupportedImageError, path, "decompression bomb")) < 20 * 2**20
    )


def test_png_too_large_to_decode_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    iio.imwrite(path, _data((40, 40), np.uint8))
    monkeypatch.setattr(readers, "MAX_WHOLE_PIXELS", 1000)
    _expect(UnsupportedImageError, path, "too large to decode whole", "tiled TIFF")


@pytest.fixture
def png_bytes(tmp_path: Path) -> bytes:
    iio.imwrite(tmp_path / "ok.png", _data((64, 64), np.uint16))
    return (tmp_path / "ok.png").read_bytes()


def test_truncated_png(tmp_path: Path, png_bytes: bytes) -> None:
    path = tmp_path / "cut.png"
    for keep in (len(png_bytes) // 2, len(png_bytes) - 12, 20):
        path.write_bytes(png_bytes[:keep])
        _expect(InputReadError, path, "truncated")


def test_corrupt_png(tmp_path: Path, png_bytes: bytes) -> None:
    path = tmp_path / "flipped.png"
    blob = bytearray(png_bytes)
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    _expect(InputReadError, path, "corrupt", "CRC")
    path.write_bytes(png_bytes[:8] + RNG.bytes(3000))
    _expect(InputReadError, path, "PNG")


def test_truncated_jpeg(tmp_path: Path) -> None:
    whole = tmp_path / "whole.jpg"
    Image.fromarray(_data((64, 64, 3), np.uint8)).save(whole)
    blob = whole.read_bytes()
    path = tmp_path / "cut.jpg"
    for keep in (len(blob) // 2, len(blob) - 2, 300):
        path.write_bytes(blob[:keep])
        _expect(InputReadError, path, "truncated")


def test_jpeg_truncated_after_open_fails_on_read(tmp_path: Path) -> None:
    path = tmp_path / "shrinking.jpg"
    Image.fromarray(_data((64, 64), np.uint8)).save(path)
    spec = open_source(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(InputReadError, match="truncated") as info:
        read_region(spec, _full(spec))
    assert str(path) in str(info.value)


def test_png_replaced_by_another_size_fails_on_read(tmp_path: Path) -> None:
    path = tmp_path / "changed.png"
    iio.imwrite(path, _data((20, 20), np.uint8))
    spec = open_source(path)
    iio.imwrite(path, _data((30, 20), np.uint8))
    with pytest.raises(InputReadError, match="decoded shape"):
        read_region(spec, _full(spec))


_PERMISSION_PROBE = """
import os, sys
from segpipe.io.readers import open_source
path = sys.argv[1]
for mode in (0o000, None):
    if mode is None:  # the file is readable, its folder cannot be searched
        os.chmod(path, 0o644)
        os.chmod(os.path.dirname(path), 0o000)
    else:
        os.chmod(path, mode)
    try:
        open_source(path)
        print("opened")
    except Exception as err:
        print(type(err).__name__, err)
os.chmod(os.path.dirname(path), 0o755)
"""


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.tif"
    tifffile.imwrite(path, _data((8, 8), np.uint8))
    if not hasattr(os, "geteuid"):
        pytest.skip("POSIX file modes only")
    if os.geteuid() != 0:
        command = [sys.executable, "-c", _PERMISSION_PROBE, str(path)]
    elif shutil.which("capsh"):
        # root ignores file modes; without these capabilities it obeys them like anyone
        probe = shlex.join([sys.executable, "-c", _PERMISSION_PROBE, str(path)])
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", probe]
    else:
        pytest.skip("running as root, which reads files whatever their mode, and no capsh")
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.splitlines()
    assert lines == [
        f"InputReadError {path}: permission denied; make it readable.",
        f"InputReadError {path}: permission denied on a parent directory.",
    ], out.stderr


def test_permission_denied_branch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too: the reader's own open() is made to fail as chmod 000 would.
    path = tmp_path / "locked.tif"
    tifffile.imwrite(path, _data((8, 8), np.uint8))

    def denied(file: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(readers, "open", denied, raising=False)
    _expect(InputReadError, path, "permission denied")


def test_non_ascii_paths_work(tmp_path: Path) -> None:
    folder = tmp_path / "données Ünïcødé 細胞 🧫"
    folder.mkdir()
    data = _data((20, 30), np.uint16)
    tifffile.imwrite(folder / "échantillon_β.ome.tif", data, tile=(16, 16), compression="zlib")
    iio.imwrite(folder / "クロップ.png", data)
    zarr.create_array(folder / "体积.zarr", data=data, chunks=(8, 8))
    for name, stem in [
        ("échantillon_β.ome.tif", "échantillon_β"),
        ("クロップ.png", "クロップ"),
        ("体积.zarr", "体积"),
    ]:
        spec = open_source(folder / name)
        assert spec.name == stem
        np.testing.assert_array_equal(_read(spec), data)


def test_very_long_paths_work(tmp_path: Path, ome_writer: Any) -> None:
    folder = tmp_path
    for i in range(3):
        folder = folder / (f"{i}" + "d" * 249)
    folder.mkdir(parents=True)
    assert len(str(folder)) > 750
    data = _data((20, 30), np.uint8)
    tif = folder / ("t" * 246 + ".tif")
    tifffile.imwrite(tif, data, tile=(16, 16), compression="zlib")
    np.testing.assert_array_equal(_read(open_source(tif)), data)
    write_image, _ = ome_writer
    ome = folder / ("o" * 242 + ".ome.zarr")
    write_image(data, zarr.open_group(ome, mode="w"), axes="yx", scale_factors=(2,))
    np.testing.assert_array_equal(_read(open_source(ome)), data)


def test_path_component_too_long_is_a_read_error(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 300 + ".tif")
    with pytest.raises(SegpipeError) as info:
        open_source(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("channel", ["avg", True, -1, 1.5])
def test_bad_channel_values(tmp_path: Path, channel: Any) -> None:
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, _data((8, 8), np.uint8))
    with pytest.raises(ConfigError, match="channel"):
        open_source(path, channel=channel)


def test_image_name() -> None:
    assert image_name("/a/b/cells.ome.tif") == "cells"
    assert image_name("/a/b/Cells.OME.TIFF") == "Cells"
    assert image_name("/a/b/plate.ome.zarr/") == "plate"
    assert image_name("/a/b/sample.1.png") == "sample.1"
    assert image_name("/a/b/.tif") == ".tif"
    # would land on the output store's own zarr.json: the suffix stays
    assert image_name("/a/b/zarr.json.tif") == "zarr.json.tif"
    assert image_name("/a/b/ZARR.JSON.png") == "ZARR.JSON.png"


def test_tiff_named_zarr_json_reads_as_a_tiff(tmp_path: Path) -> None:
    data = _data((30, 40), np.uint16)
    tifffile.imwrite(tmp_path / "zarr.json.tif", data, tile=(16, 16))
    spec = open_source(tmp_path / "zarr.json.tif")
    assert (spec.format, spec.name) == ("tiff", "zarr.json.tif")
    np.testing.assert_array_equal(_read(spec), data)


@pytest.mark.parametrize(
    ("data", "options"),
    [
        (np.zeros((1000, 700), "u2"), {"tile": (256, 256)}),
        (np.zeros((1000, 700), "u2"), {"rowsperstrip": 64, "compression": "zlib"}),
        (np.zeros((5, 300, 200), "u1"), {"tile": (64, 64)}),
        (np.zeros((300, 200, 3), "u1"), {"tile": (64, 64), "photometric": "rgb"}),
        (
            np.zeros((3, 300, 200), "u1"),
            {"tile": (64, 64), "photometric": "rgb", "planarconfig": "separate"},
        ),
        (np.zeros((8, 128, 128), "f4"), {"tile": (4, 64, 64)}),
        (np.zeros((2, 4, 96, 80), "u2"), {"tile": (32, 32), "compression": "zstd"}),
        (np.zeros((300, 200, 1), "u1"), {"tile": (64, 64), "photometric": "minisblack"}),
        (np.zeros((64, 64), "u1"), {}),
    ],
)
def test_tiff_chunks_are_those_zarr_sees_through_tifffile(
    tmp_path: Path, data: np.ndarray, options: dict[str, Any]
) -> None:
    import zarr

    from segpipe.io.readers import tiff_chunks

    path = tmp_path / "a.tif"
    tifffile.imwrite(path, data, **options)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert tiff_chunks(series) == zarr.open_array(series.aszarr(), mode="r").chunks


def test_tiff_chunks_of_a_pyramid_level_are_those_zarr_sees(tmp_path: Path) -> None:
    import zarr

    from segpipe.io.readers import tiff_chunks

    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((512, 384), "u2"), tile=(128, 128), subifds=1)
        tif.write(np.zeros((256, 192), "u2"), tile=(64, 64), subfiletype=1)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert len(series.levels) == 2
        for level in (0, 1):
            found = zarr.open_array(series.aszarr(level=level), mode="r").chunks
            assert tiff_chunks(series, level) == found

"""Whole-chunk reads and writes beside zarr-python: what one writes the other reads, bit
for bit, for every codec segpipe uses, edge chunks and never-written chunks included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from segpipe.blocks import BlockGrid
from segpipe.io import chunks, omezarr

CASES = [  # dtype, create_array options
    (np.uint16, {}),  # image: lz4 + shuffle
    (np.uint32, {"labels": True}),  # labels: lz4, no shuffle
    (np.uint64, {"labels": True}),
    (np.uint8, {"labels": True}),
    (np.float32, {"compress": False}),  # scratch: raw bytes
]


def _data(dtype: type, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize(("dtype", "options"), CASES)
@pytest.mark.parametrize(("shape", "tile"), [((50, 70), (16, 32)), ((5, 20, 30), (2, 8, 16))])
def test_chunks_round_trip_with_zarr(
    tmp_path: Path, dtype: type, options: dict, shape: tuple, tile: tuple
) -> None:
    path = tmp_path / "a"
    omezarr.create_array(path, shape=shape, chunks=tile, dtype=dtype, **options)
    assert omezarr._layout(str(path), omezarr._stamp(path)) is not None
    image = _data(dtype, shape, 0)
    blocks = [b.core for b in BlockGrid.build(shape, tile=tile, halo=0)]
    for k, region in enumerate(blocks):  # every other chunk here, the rest through zarr
        if k % 2:
            omezarr.write_block(path, region, image[region])
        else:
            zarr.open_array(path, mode="r+")[region] = image[region]
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], image)
    for region in blocks:
        got = omezarr.read_block(path, region)
        assert got.dtype == np.dtype(dtype) and got.flags.writeable
        np.testing.assert_array_equal(got, image[region])


def test_unwritten_chunk_reads_as_fill_and_unaligned_regions_go_through_zarr(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a"
    omezarr.create_array(path, shape=(40, 40), chunks=(16, 16), dtype=np.uint32, labels=True)
    np.testing.assert_array_equal(omezarr.read_block(path, (slice(32, 40), slice(0, 16))), 0)
    data = np.arange(400, dtype=np.uint32).reshape(20, 20)
    omezarr.write_block(path, (slice(10, 30), slice(5, 25)), data)  # spans four chunks
    np.testing.assert_array_equal(zarr.open_array(path)[10:30, 5:25], data)
    np.testing.assert_array_equal(omezarr.read_block(path, (slice(10, 30), slice(5, 25))), data)
    lay = omezarr._layout(str(path), omezarr._stamp(path))
    assert lay is not None
    assert lay.index((slice(16, 32), slice(32, 40))) == (1, 2)  # the edge chunk, cut
    assert lay.index((slice(16, 32), slice(32, 48))) is None  # past the end
    assert lay.index((slice(8, 24), slice(0, 16))) is None  # not on the grid
    with pytest.raises(ValueError, match="expected data of shape"):
        chunks.write_chunk(lay, (0, 0), np.zeros((4, 4), np.uint32))


def test_other_codecs_are_left_to_zarr(tmp_path: Path) -> None:
    path = tmp_path / "z"
    zarr.create_array(
        store=str(path),
        shape=(32, 32),
        chunks=(16, 16),
        dtype=np.uint16,
        compressors=ZstdCodec(level=1),
        zarr_format=3,
    )
    assert chunks.layout(zarr.open_array(path)) is None
    data = np.arange(256, dtype=np.uint16).reshape(16, 16)
    omezarr.write_block(path, (slice(0, 16), slice(16, 32)), data)
    np.testing.assert_array_equal(zarr.open_array(path)[0:16, 16:32], data)


@pytest.mark.parametrize(
    ("shape", "src_chunks", "dst_chunks"),
    [
        ((50, 70), (16, 32), (16, 32)),
        ((51, 69), (8, 8), (16, 16)),  # level 1 in half tiles; odd sizes
        ((33, 45), (7, 9), (5, 11)),  # odd chunks: chunks start at odd coordinates
        ((5, 41, 37), (2, 8, 16), (3, 16, 16)),  # volumes keep Z
    ],
)
def test_downsample_block_is_every_second_pixel(
    tmp_path: Path, shape: tuple, src_chunks: tuple, dst_chunks: tuple
) -> None:
    image = _data(np.uint64, shape, 1)
    src, dst = tmp_path / "k", tmp_path / "k1"
    omezarr.create_array(src, shape=shape, chunks=src_chunks, dtype=np.uint64, labels=True)
    zarr.open_array(src, mode="r+")[...] = image
    half = (*shape[:-2], *(-(-n // 2) for n in shape[-2:]))
    omezarr.create_array(dst, shape=half, chunks=dst_chunks, dtype=np.uint64, labels=True)
    for b in BlockGrid.build(half, tile=dst_chunks, halo=0):
        omezarr.downsample_block(str(src), str(dst), b.core)
    np.testing.assert_array_equal(zarr.open_array(dst)[...], image[..., ::2, ::2])


def test_a_cut_short_raw_chunk_is_an_error_not_zeros(tmp_path: Path) -> None:
    path = tmp_path / "raw"
    omezarr.create_array(path, shape=(16, 16), chunks=(16, 16), dtype=np.float32, compress=False)
    omezarr.write_block(path, (slice(0, 16), slice(0, 16)), np.ones((16, 16), np.float32))
    chunk = path / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match="chunk shorter than 1024 bytes"):
        omezarr.read_block(path, (slice(0, 16), slice(0, 16)))

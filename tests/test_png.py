"""segpipe.io.png against PNG decoders of other projects (libpng through imagecodecs, Pillow)."""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from segpipe.io import png


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (333, 1024), (7, 5, 3), (512, 301, 3)])
def test_pictures_decode_to_themselves(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    picture = rng.integers(0, 256, shape, dtype=np.uint8)
    picture[: shape[0] // 2] //= 16  # long runs as well as noise
    data = png.encode(picture)
    assert np.array_equal(imagecodecs.png_decode(data), picture)
    with Image.open(io.BytesIO(data)) as pil:
        pil.load()  # checks every chunk's CRC and the zlib stream's checksum
        assert pil.mode == ("RGB" if picture.ndim == 3 else "L")
        assert np.array_equal(np.asarray(pil), picture)


@pytest.mark.parametrize("colours", [1, 7, 256])
def test_palette_pictures_decode_to_their_colours(colours: int) -> None:
    rng = np.random.default_rng(colours)
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    indices = rng.integers(0, colours, (301, 517), dtype=np.uint8)
    data = png.encode(indices, palette)
    assert np.array_equal(imagecodecs.png_decode(data), palette[indices])
    with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        assert pil.mode == "P"
        assert np.array_equal(np.asarray(pil), indices)
        assert np.array_equal(np.asarray(pil.convert("RGB")), palette[indices])


def test_without_libdeflate_zlib_writes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    picture = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3)
    monkeypatch.setattr(imagecodecs.DEFLATE, "available", False)
    assert np.array_equal(imagecodecs.png_decode(png.encode(picture)), picture)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)]
)
def test_other_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected"):
        png.encode(bad)


@pytest.mark.parametrize(
    ("picture", "palette"),
    [
        (np.zeros((4, 4, 3), np.uint8), np.zeros((2, 3), np.uint8)),  # RGB with a palette
        (np.full((4, 4), 2, np.uint8), np.zeros((2, 3), np.uint8)),  # an index past it
        (np.zeros((4, 4), np.uint8), np.zeros((257, 3), np.uint8)),  # too many colours
        (np.zeros((4, 4), np.uint8), np.zeros((2, 4), np.uint8)),  # not RGB
    ],
)
def test_bad_palettes_are_refused(picture: np.ndarray, palette: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected"):
        png.encode(picture, palette)

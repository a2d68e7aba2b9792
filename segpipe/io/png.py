"""PNG files of 8-bit grey, RGB or palette pictures, written fast.

Rows go unfiltered and the image data is compressed by libdeflate at level 1
(imagecodecs' ``deflate_encode``), which takes half the time of libpng's zlib
at the same level for a 1024² preview (``bench/collection.py``: the preview
was the largest cost of a small field). Where imagecodecs lacks libdeflate,
`encode` compresses with zlib, with the same settings. imagecodecs' own PNG
encoder writes no palette pictures; this module can go when it does and uses
libdeflate or zlib-ng.
"""

from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np
from numpy.typing import NDArray

__all__ = ["encode"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {2: 0, 3: 2}  # array dimensions: grey, RGB
_PALETTE_TYPE = 3


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode(picture: NDArray[np.uint8], palette: NDArray[np.uint8] | None = None) -> bytes:
    """The PNG file of ``picture``.

    Parameters
    ----------
    picture : (M, N) or (M, N, 3) ndarray of uint8
        Grey or RGB; with ``palette``, (M, N) indices into it.
    palette : (K, 3) ndarray of uint8, optional
        At most 256 RGB colours.

    Returns
    -------
    bytes
        A PNG file: 8 bits per sample (or index), no interlace, every row unfiltered.

    Examples
    --------
    >>> png = encode(np.zeros((2, 3, 3), np.uint8))
    >>> png[:8] == _SIGNATURE, imagecodecs.png_decode(png).shape
    (True, (2, 3, 3))
    """
    if picture.dtype != np.uint8 or picture.ndim not in _COLOUR_TYPE:
        raise ValueError(f"expected (M, N) or (M, N, 3) uint8, got {picture.dtype} {picture.shape}")
    if picture.ndim == 3 and picture.shape[2] != 3:
        raise ValueError(f"expected 3 colour samples, got {picture.shape[2]}")
    colour = _COLOUR_TYPE[picture.ndim]
    extra = []
    if palette is not None:
        if picture.ndim != 2 or palette.dtype != np.uint8 or palette.shape[1:] != (3,):
            raise ValueError(
                f"expected (M, N) indices and a (K, 3) uint8 palette, got {picture.shape} "
                f"and {palette.dtype} {palette.shape}"
            )
        if not 0 < len(palette) <= 256 or int(picture.max(initial=0)) >= len(palette):
            raise ValueError(f"expected indices below {len(palette)} (at most 256)")
        colour = _PALETTE_TYPE
        extra.append(_chunk(b"PLTE", np.ascontiguousarray(palette).tobytes()))
    rows, columns = picture.shape[:2]
    scanlines = np.zeros((rows, 1 + picture[0].size), np.uint8)  # a 0 (no filter) per row
    scanlines[:, 1:] = picture.reshape(rows, -1)
    header = struct.pack(">IIBBBBB", columns, rows, 8, colour, 0, 0, 0)
    raw = scanlines.tobytes()
    if imagecodecs.DEFLATE.available:
        data = bytes(imagecodecs.deflate_encode(raw, level=1))
    else:
        data = zlib.compress(raw, 1)
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            *extra,
            _chunk(b"IDAT", data),
            _chunk(b"IEND", b""),
        )
    )

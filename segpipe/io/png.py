"""PNG files of 8-bit grey or RGB pictures, written fast.

Rows go unfiltered and the image data is compressed by libdeflate at level 1
(imagecodecs' ``deflate_encode``), which takes half the time of libpng's zlib
at the same level for a 1024² preview (``bench/collection.py``: the preview
was the largest cost of a small field). Where imagecodecs lacks libdeflate,
`encode` falls back to its libpng encoder, with the same settings. This module
can go when imagecodecs' own PNG encoder uses libdeflate or zlib-ng.
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


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode(picture: NDArray[np.uint8]) -> bytes:
    """The PNG file of ``picture``.

    Parameters
    ----------
    picture : (M, N) or (M, N, 3) ndarray of uint8
        Grey or RGB.

    Returns
    -------
    bytes
        A PNG file: 8 bits per sample, no interlace, every row unfiltered.

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
    if not imagecodecs.DEFLATE.available:
        return bytes(imagecodecs.png_encode(picture, level=1, filter=imagecodecs.PNG.FILTER.NONE))
    rows, columns = picture.shape[:2]
    scanlines = np.zeros((rows, 1 + picture[0].size), np.uint8)  # a 0 (no filter) per row
    scanlines[:, 1:] = picture.reshape(rows, -1)
    header = struct.pack(">IIBBBBB", columns, rows, 8, _COLOUR_TYPE[picture.ndim], 0, 0, 0)
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", bytes(imagecodecs.deflate_encode(scanlines.tobytes(), level=1))),
            _chunk(b"IEND", b""),
        )
    )

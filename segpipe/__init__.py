"""segpipe: distributed segmentation of image collections too large for one machine.

The library: block functions, Dask stages and I/O. Orchestration (Prefect)
lives in the separate ``flows`` package.
"""

from __future__ import annotations

from segpipe.errors import SegpipeError
from segpipe.segmenters import available, get_segmenter

__version__ = "0.1.0"
__all__ = ["SegpipeError", "__version__", "available", "get_segmenter"]

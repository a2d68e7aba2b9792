"""Where and how each segment block ran: worker, device, seconds, batch, network tiles.

Each segment block keeps its record in its marker (plain arrays: strings as
fixed-width unicode, so markers load without pickle and a resumed run keeps
the records of the blocks it did not recompute). At the end of the image the
records become one small Parquet table, ``OUT/_segpipe/provenance/<image>.parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segpipe.io import storage
from segpipe.io.storage import Location, Where

PREFIX = "prov_"
COLUMNS = ("block", "region", "worker", "device", "seconds", "batch", "tiles", "run")


@dataclass(frozen=True)
class Record:
    """How one block was segmented."""

    worker: str
    device: str
    seconds: float
    batch: int
    tiles: int


def worker_address() -> str:
    """Address of the Dask worker running this task ("" outside a worker)."""
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:  # not in a worker task (a local call)
        return ""


def encode(record: Record) -> dict[str, NDArray[Any]]:
    """Marker arrays of ``record`` (no object arrays: they would need pickle)."""
    return {
        PREFIX + "worker": np.array(record.worker, dtype=np.str_),
        PREFIX + "device": np.array(record.device, dtype=np.str_),
        PREFIX + "seconds": np.array(record.seconds, np.float64),
        PREFIX + "batch": np.array(record.batch, np.int64),
        PREFIX + "tiles": np.array(record.tiles, np.int64),
    }


def decode(arrays: dict[str, NDArray[Any]]) -> Record | None:
    """The record in a marker, or None for a marker written without one."""
    if PREFIX + "worker" not in arrays:
        return None
    return Record(
        str(arrays[PREFIX + "worker"]),
        str(arrays[PREFIX + "device"]),
        float(arrays[PREFIX + "seconds"]),
        int(arrays[PREFIX + "batch"]),
        int(arrays[PREFIX + "tiles"]),
    )


def write_table(path: Where, rows: Sequence[tuple[int, str, Record, str]]) -> Location:
    """Write ``(block id, region, record, run)`` rows as Parquet, whole
    (`segpipe.io.storage.put`).

    Parameters
    ----------
    path : str, Path or URL
        Destination ``.parquet`` file; its folder is created.
    rows : sequence of (int, str, Record, str)
        One per block, in block order.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "block": pa.array([r[0] for r in rows], pa.int64()),
            "region": pa.array([r[1] for r in rows], pa.string()),
            "worker": pa.array([r[2].worker for r in rows], pa.string()),
            "device": pa.array([r[2].device for r in rows], pa.string()),
            "seconds": pa.array([r[2].seconds for r in rows], pa.float64()),
            "batch": pa.array([r[2].batch for r in rows], pa.int64()),
            "tiles": pa.array([r[2].tiles for r in rows], pa.int64()),
            "run": pa.array([r[3] for r in rows], pa.string()),
        }
    )
    where = storage.location(path)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.put(where, sink.getvalue())
    return where


def read_table(path: Where) -> dict[str, list[Any]]:
    """The provenance table at ``path`` as columns of Python values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = storage.location(path).read_bytes()
    out: dict[str, list[Any]] = pq.read_table(pa.BufferReader(data)).to_pydict()
    return out

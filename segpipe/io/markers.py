"""Per-block completion markers: what makes a rerun resume.

A block task writes its chunks first and its marker last, atomically
(temporary file, then rename), so a marker means the block's output is
whole. The marker also carries the block's small result (extrema, a
histogram, object count and neighbour views) as plain arrays, loaded
without pickle: a rerun reads it instead of recomputing the block.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

Arrays = dict[str, NDArray[Any]]
RUN_KEY = "__run"


class Markers:
    """Markers of one stage of one image, under ``OUT/_segpipe/blocks/<image>/<stage>/``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, block_id: int) -> Path:
        return self.directory / f"{block_id}.npz"

    def done(self, block_id: int) -> bool:
        return self.path(block_id).exists()

    def count(self) -> int:
        if not self.directory.exists():
            return 0
        return sum(1 for p in self.directory.iterdir() if p.suffix == ".npz")

    def save(self, block_id: int, arrays: Arrays, *, run: str = "") -> None:
        """Write the marker of ``block_id`` atomically (call after its chunks are written).

        ``run`` names the run that computed the block, so a resumed run can say
        how many blocks it recomputed.
        """
        arrays = {**arrays, RUN_KEY: np.array(run)}
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{block_id}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path(block_id))

    def load(self, block_id: int) -> Arrays:
        with np.load(self.path(block_id), allow_pickle=False) as data:
            return {k: data[k] for k in data.files if k != RUN_KEY}

    def tally(self, run: str) -> tuple[int, int]:
        """(blocks computed by ``run``, blocks marked) in this stage."""
        mine = total = 0
        if self.directory.exists():
            for p in self.directory.glob("*.npz"):
                total += 1
                with np.load(p, allow_pickle=False) as data:
                    mine += RUN_KEY in data.files and str(data[RUN_KEY]) == run
        return mine, total

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def clean_leftovers(self) -> int:
        """Remove temporary files of writes that were interrupted; return how many."""
        if not self.directory.exists():
            return 0
        stale = [p for p in self.directory.iterdir() if p.name.endswith(".tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

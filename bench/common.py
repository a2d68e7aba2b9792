"""Shared helpers for benchmarks: machine description and process-tree memory sampling."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version

import psutil


def machine() -> str:
    """One line: CPU count, memory, Python and library versions."""
    libs = ["numpy", "scikit-image", "dask", "distributed", "zarr", "prefect", "tifffile"]
    vers = ", ".join(f"{lib} {version(lib)}" for lib in libs)
    mem = psutil.virtual_memory().total / 2**30
    py = platform.python_version()
    return f"{platform.node()}: {psutil.cpu_count()} cores, {mem:.0f} GiB, Python {py}; {vers}"


@dataclass
class TreeRun:
    seconds: float
    peak_rss: int  # bytes, summed over the process and all its descendants
    returncode: int
    output: str


def run_tree(
    cmd: Sequence[str], *, interval: float = 0.1, env: dict[str, str] | None = None
) -> TreeRun:
    """Run ``cmd``; sample the RSS of its whole process tree every ``interval`` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    done.set()
    thread.join()
    return TreeRun(time.perf_counter() - t0, peak, proc.returncode, output)

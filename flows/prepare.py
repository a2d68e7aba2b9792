"""A run checked before any compute: inputs opened, the output claimed, plans made.

Free of Prefect, so that the command line checks a run while Prefect imports
beside it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from segpipe.config import RunConfig, check_image_options
from segpipe.errors import InputsError, NoSpaceError, SegpipeError
from segpipe.image import ImagePlan, check_tile
from segpipe.io import physical, storage
from segpipe.io.collection import resolve_inputs
from segpipe.io.readers import SourceSpec, open_source
from segpipe.io.store import (
    OutputLock,
    check_apart,
    check_name,
    image_state,
    open_output,
)
from segpipe.panoptic import catalogue_for
from segpipe.plan import halo_for, image_disk, run_disk, tile_for
from segpipe.segmenters import Segmenter, get_segmenter

__all__ = [
    "Prepared",
    "check_space",
    "free_space",
    "hand_over",
    "in_process",
    "make_plan",
    "prepare_run",
    "take_over",
    "unsized",
]


@dataclass(frozen=True)
class Prepared:
    """A checked run: inputs opened (bad ones listed), the output claimed, the segmenter built."""

    config: RunConfig
    sources: list[SourceSpec]
    bad: list[tuple[str, str]]  # (path, problem) of inputs skipped under on_error=skip
    segmenter: Segmenter
    lock: OutputLock


def prepare_run(config: RunConfig, *, resume: bool | None = None) -> Prepared:
    """Check everything before heavy compute: segmenter valid, every input readable,
    output ours (and locked).

    Raises
    ------
    SegpipeError
        The segmenter or output problem; or, under ``on_error: fail``, every bad
        input, one per line.
    """
    storage.location(config.input)  # a URL of another scheme is refused in one line
    storage.location(config.output)
    storage.configure(config.storage)
    config = config.resolved()
    segmenter = get_segmenter(config.segmenter.name, **config.segmenter.options())
    catalogue_for(segmenter, config.classes)  # a bad catalogue fails before any compute
    paths = resolve_inputs(config.input, missing_ok=config.on_error == "skip", output=config.output)
    sources: list[SourceSpec] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        try:
            spec = open_source(
                p,
                channel=config.channel,
                axes=config.axes,
                series=config.series,
                level=config.level,
            )
            check_apart(p, config.output)
            check_name(config.output, spec.name, p)
            check_image_options(config, segmenter, spec)
            check_tile(spec, tile_for(config, spec, segmenter))
            if config.pixel_size is not None:  # the settings' size over the input's own
                size = physical.given(config.pixel_size, config.pixel_unit, len(spec.shape), p)
                spec = replace(spec, pixel=size)
            sources.append(spec)
        except SegpipeError as err:
            bad.append((p, str(err)))
    if bad and config.on_error == "fail":
        if len(bad) == 1:
            raise InputsError(bad[0][1])
        lines = "\n  ".join(msg for _, msg in bad)
        raise InputsError(f"{len(bad)} of {len(paths)} inputs are bad:\n  {lines}")
    check_space(config, sources, segmenter)
    lock = open_output(
        config.output,
        {**config.run_settings(), **segmenter.identity()},
        overwrite=config.overwrite,
        # --full recomputes every image of a store of these settings: it may reuse it.
        resume=(config.resume or config.full) if resume is None else resume,
    )
    return Prepared(config, sources, bad, segmenter, lock)


_handed: list[tuple[dict[str, Any], Prepared]] = []


def hand_over(prepared: Prepared, params: dict[str, Any]) -> None:
    """Leave ``prepared`` for the flow run that this process starts with ``params``:
    `segpipe run` checks a run before its cluster starts, and the flow need not check
    it again (every input opened: seconds for a plate of thousands of fields)."""
    _handed[:] = [(params, prepared)]


def take_over(params: dict[str, Any]) -> Prepared | None:
    """The `Prepared` handed over for exactly ``params`` (once), if its output is still
    locked by this process; otherwise None, and the flow checks the run itself."""
    if not _handed:
        return None
    ((handed, prepared),) = _handed
    _handed.clear()
    return prepared if handed == params and prepared.lock.held() else None


IN_FLIGHT = 8
"""Images whose scratch the free-space check counts at once (the largest ones)."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def free_space(path: str) -> tuple[Path, int]:
    """The folder nearest ``path`` that exists (``path`` itself when it does), and the
    bytes free on its file system."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where, shutil.disk_usage(where).free


def check_space(config: RunConfig, sources: list[SourceSpec], segmenter: Segmenter) -> None:
    """Refuse the run in one line when the output's file system has less free space than
    its planned peak on disk (`segpipe.plan.run_disk`: every image not yet complete in
    the store, and the scratch of the `IN_FLIGHT` largest), unless ``space_check`` is off.

    Raises
    ------
    NoSpaceError
        Naming the output, the space needed and the space free.
    """
    if not config.space_check or storage.is_url(config.output):
        return  # object storage has no free space to run out of
    pending = [s for s in sources if not image_state(Path(config.output) / s.name).get("complete")]
    disks = [
        image_disk(
            s,
            tile_for(config, s, segmenter),
            segmenter,
            halo_for(config, len(s.shape)),
        )
        for s in pending
    ]
    need = run_disk(disks, IN_FLIGHT)
    where, free = free_space(config.output)
    if need.peak > free:
        raise NoSpaceError(
            f"{config.output}: the run needs about {_gib(need.peak)} free at its peak "
            f"({len(pending)} image(s), {_gib(need.final)} when done), and the file system "
            f"of {where} has {_gib(free)} free: free some space or choose another output "
            "(--no-space-check, or space_check: false in run.yaml, starts anyway)."
        )


def unsized(prepared: Prepared) -> str | None:
    """One line naming the inputs that state no pixel size (their scales and tables are
    in pixels: none is invented), or None when every input states one."""
    missing = [spec.path for spec in prepared.sources if spec.pixel is None]
    if not missing:
        return None
    more = f" and {len(missing) - 1} more input(s)" if len(missing) > 1 else ""
    return (
        f"{missing[0]}{more}: no pixel size stated; scales and tables are in pixels "
        "(--pixel-size or pixel_size: in run.yaml gives one)"
    )


def make_plan(prepared: Prepared, spec: SourceSpec) -> ImagePlan:
    ndim = len(spec.shape)
    tiles = tile_for(prepared.config, spec, prepared.segmenter)
    halos = halo_for(prepared.config, ndim)
    catalogue = catalogue_for(prepared.segmenter, prepared.config.classes)
    inner = prepared.config.viewer_chunk
    return ImagePlan(
        spec,
        prepared.config.output,
        tiles,
        prepared.segmenter,
        halos,
        catalogue=catalogue,
        viewer_chunk=tuple(inner) if isinstance(inner, list) else inner,
    )


def in_process(prepared: Prepared) -> bool:
    """Whether the run needs no cluster: ``cluster: local`` and one image of one block.

    Such a run is one task wherever it runs; a LocalCluster would add its start, its
    workers' imports and its close (seconds) to a run of a fraction of one.
    """
    sources = prepared.sources
    return (
        prepared.config.cluster == "local"
        and len(sources) == 1
        and len(make_plan(prepared, sources[0]).grid()) == 1
    )

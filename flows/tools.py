"""``segpipe evaluate`` and ``segpipe inspect``: typer commands, registered by `register`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from flows.console import console, fail, out
from flows.options import numbers
from segpipe.errors import SegpipeError

EVALUATE_EXAMPLES = """
[b]Examples[/b]

  segpipe evaluate out.zarr/plate-a truth/plate-a.tif
  segpipe evaluate out.zarr/plate-a/labels/panoptic truth.zarr/plate-a --json scores.json
  segpipe evaluate pred.tif truth.tif --divisor 1000 --ignore 4 --cluster local
"""


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _tile(text: str | None) -> int | list[int] | None:
    if text is None:
        return None
    return numbers(
        text,
        int,
        lambda: typer.BadParameter(f"--tile {text!r}: expected an int or comma-separated ints."),
    )


def evaluate(
    pred: Annotated[
        str,
        typer.Argument(
            help="Prediction: an image of OUT.zarr, a label Zarr array/OME-Zarr label image, "
            "or a TIFF label image."
        ),
    ],
    gt: Annotated[str, typer.Argument(help="Ground truth, in any of the same forms.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write every score to this JSON file.")
    ] = None,
    ignore: Annotated[
        list[int] | None,
        typer.Option("--ignore", help="Void class id (left out of every score); repeatable."),
    ] = None,
    divisor: Annotated[
        int | None,
        typer.Option(help="Read arrays without a recorded divisor as panoptic with this divisor."),
    ] = None,
    tile: Annotated[
        str | None, typer.Option(help="Block shape: 2048, or one per axis: 64,512,512.")
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(help="'local' or tcp://host:port to run blocks on Dask (default: threads)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Threads without --cluster.")] = None,
) -> None:
    """PQ, SQ, RQ per class and overall, AP@[.50:.95] and pixel IoU of PRED against GT."""
    from segpipe import evaluate as ev

    try:
        kwargs: dict[str, Any] = {
            "ignore": tuple(ignore or ()),
            "divisor": divisor,
            "tile": _tile(tile),
            "threads": threads,
        }
        if cluster is None:
            metrics = ev.evaluate(pred, gt, **kwargs)
        else:
            from segpipe.cluster import connect

            with connect(cluster) as client:
                metrics = ev.evaluate(pred, gt, client=client, **kwargs)
    except SegpipeError as err:
        fail(err)
    except typer.BadParameter as err:
        fail(err, 2)
    table = Table(
        title=f"segpipe evaluate: {Path(pred).name} vs {Path(gt).name}",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    for col in ("class", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN", "AP", "IoU"):
        left = col in ("class", "kind")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for c in metrics.classes:
        table.add_row(
            f"{c.id} {c.name}",
            "thing" if c.thing else "stuff",
            _fmt(c.pq),
            _fmt(c.sq),
            _fmt(c.rq),
            str(c.tp),
            str(c.fp),
            str(c.fn),
            _fmt(c.ap),
            _fmt(c.iou),
        )
    table.add_section()
    table.add_row(
        "all",
        "",
        _fmt(metrics.pq),
        _fmt(metrics.sq),
        _fmt(metrics.rq),
        str(sum(c.tp for c in metrics.classes)),
        str(sum(c.fp for c in metrics.classes)),
        str(sum(c.fn for c in metrics.classes)),
        _fmt(metrics.ap),
        _fmt(metrics.miou),
    )
    out.print(table)
    out.print(
        f"PQ {_fmt(metrics.pq)} (things {_fmt(metrics.pq_things)}, stuff "
        f"{_fmt(metrics.pq_stuff)}) · AP@[.50:.95] {_fmt(metrics.ap)} (AP50 "
        f"{_fmt(metrics.ap50)}, AP75 {_fmt(metrics.ap75)}) · mIoU {_fmt(metrics.miou)}"
        + (f" · void classes {list(metrics.ignored)}" if metrics.ignored else ""),
        highlight=False,
    )
    matched = metrics.extra.get("matched", [])
    out.print(
        "Classes matched by id: "
        + (
            ", ".join(
                f"{m['id']} {m['prediction']}"
                + ("" if m["prediction"] == m["truth"] else f" = {m['truth']}")
                for m in matched
            )
            or "none"
        ),
        highlight=False,
        soft_wrap=True,
    )
    for line in metrics.extra.get("mapped", []):
        out.print(f"Read {line}.", highlight=False, soft_wrap=True)
    for line in metrics.extra.get("warnings", []):
        console.print(f"[yellow]Warning:[/] {line}", highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.write_text(json.dumps(metrics.to_dict(), indent=2) + "\n", encoding="utf-8")
        out.print(f"Scores: {json_out}", highlight=False, soft_wrap=True)


def inspect(
    store: Annotated[str, typer.Argument(help="An output store, e.g. out.zarr.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report to this JSON file.")
    ] = None,
) -> None:
    """List a store's images, arrays, classes, object counts, tables and previews."""
    from segpipe.inspect import inspect_store

    try:
        info = inspect_store(store)
    except SegpipeError as err:
        fail(err)
    run = info.run.get("run", {})
    orphaned = sum(image.orphaned for image in info.images)
    out.print(
        f"[b]{info.path}[/b]  segmenter {run.get('segmenter', '?')} "
        f"{run.get('options', {}) or ''} · {len(info.images)} image(s)"
        + (
            f", [yellow]{orphaned} orphaned[/]"
            if (orphaned := sum(i.orphaned for i in info.images))
            else ""
        )
        + (f" · [yellow]in use by pid {info.locked_by.get('pid')}[/]" if info.locked_by else ""),
        highlight=False,
        soft_wrap=True,
    )
    for image in info.images:
        state = "complete" if image.complete else "[red]incomplete[/]"
        shape = "×".join(map(str, image.shape or ()))
        out.print(
            f"\n[b]{image.name}[/b]  {shape + '  ' if shape else ''}{state}  objects: "
            f"{image.objects if image.objects is not None else '?'}"
            + (f"  [red]{image.error}[/]" if image.error else "")
            + (
                f"  [yellow]orphaned: its input {image.source} is gone[/] "
                "(`segpipe run --prune` removes it)"
                if image.orphaned
                else ""
            ),
            highlight=False,
            soft_wrap=True,
        )
        if image.arrays:
            arrays = Table(show_edge=False, box=None, pad_edge=False)
            for col in ("array", "levels", "shape", "dtype", "chunks"):
                arrays.add_column(col)
            for a in image.arrays:
                arrays.add_row(
                    a.path,
                    str(a.levels),
                    "×".join(map(str, a.shape)),
                    a.dtype,
                    "×".join(map(str, a.chunks))
                    + ("" if a.shards is None else f" in shards of {'×'.join(map(str, a.shards))}"),
                )
            out.print(arrays)
        if image.classes:
            parts = []
            for c in image.classes:
                kind = "" if "thing" not in c else (" thing" if c["thing"] else " stuff")
                count = image.objects_per_class.get(c["name"])
                parts.append(
                    f"{c['id']} {c['name']}{kind}" + (f": {count} objects" if count else "")
                )
            out.print(
                "classes: "
                + "; ".join(parts)
                + (f"  (panoptic divisor {image.divisor})" if image.divisor else ""),
                highlight=False,
                soft_wrap=True,
            )
        for name, t in image.tables.items():
            rows = "?" if t["rows"] is None else t["rows"]
            out.print(f"table {name}: {t['path']} ({rows} rows)", highlight=False, soft_wrap=True)
        for p in image.previews:
            out.print(f"preview: {p}", highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` and ``inspect`` to the ``segpipe`` app."""
    app.command("evaluate", epilog=EVALUATE_EXAMPLES)(evaluate)
    app.command("inspect")(inspect)

"""``segpipe export``: a segpipe model as a bioimage.io package; registered by `register`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.console import fail, out
from segpipe.errors import SegpipeError

__all__ = ["export", "register", "write_package"]

EXPORT_EXAMPLES = """
[b]Examples[/b]

  segpipe export --model unet --format bioimageio --out unet.zip
  segpipe export --model runs/cells.pt --format bioimageio --out cells.zip
  segpipe run -i images/ -o out.zarr -s unet --set model=unet.zip   # and back in
"""


def write_package(model: str, out_path: Path) -> None:
    """Export ``model`` to ``out_path`` and say where it went (one line)."""
    from segpipe.deep.export import export_bioimageio

    exported = export_bioimageio(model, out_path)
    out.print(
        f"bioimage.io package: {exported.path} ({', '.join(exported.weights)} weights; "
        f"test image {'×'.join(map(str, exported.test_shape))})",
        highlight=False,
        soft_wrap=True,
    )


def export(
    model: Annotated[
        str, typer.Option(help="A shipped model (unet, segnet, fcn) or a model file (.pt).")
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="The package to write (.zip).")],
    fmt: Annotated[str, typer.Option("--format", help="bioimageio (the only format).")] = (
        "bioimageio"
    ),
) -> None:
    """Write a deep model as a bioimage.io model package (spec 0.5), its model card as its
    documentation; bioimageio.core's test_model passes on it."""
    if fmt != "bioimageio":
        fail(typer.BadParameter(f"--format {fmt!r}: expected bioimageio."), 2)
    try:
        write_package(model, out_path)
    except SegpipeError as err:
        fail(err)


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""
    app.command("export", epilog=EXPORT_EXAMPLES)(export)

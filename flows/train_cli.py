"""``segpipe train``: registered on the CLI by `register`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.console import console, fail, out
from segpipe.errors import SegpipeError

TRAIN_EXAMPLES = """
[b]Examples[/b]

  segpipe train --arch unet --data synthetic --steps 250 --patch 96 --out unet.pt
  segpipe train --arch unet --synthetic render --no-augment --out plain.pt   # the simple nuclei
  segpipe train --arch fcn --data images/ --annotations masks/ --patch 256 --batch 4
  segpipe train --arch unet --ndim 3 --patch 32,64,64 --batch 2 --out unet3d.pt
  segpipe train --arch unet --steps 250 --patch 96 --out unet.pt --resume   # after a stop
  segpipe train --arch unet --steps 250 --patch 96 --out unet.pt --bioimageio unet.zip
  segpipe train --arch forest --data images/ --annotations scribbles/ --out forest.npz
  segpipe train --arch forest --data images/ --annotations scribbles/ --out cells.npz \
      --classes '[background, nucleus, debris]' --features gaussian_1,sobel_2,log_4,std_2
"""


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError as err:
        raise typer.BadParameter(
            f"{option} {text!r}: expected an int or comma-separated ints."
        ) from err
    if not values:
        raise typer.BadParameter(f"{option} {text!r}: expected an int or comma-separated ints.")
    return values


def _floats(text: str, option: str) -> tuple[float, float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError as err:
        raise typer.BadParameter(f"{option} {text!r}: expected two numbers, e.g. 1,99.8.") from err
    if len(values) != 2:
        raise typer.BadParameter(f"{option} {text!r}: expected two numbers, e.g. 1,99.8.")
    return values[0], values[1]


def _format_validation(val: dict[str, object]) -> list[str]:
    lines = []
    for who in ("model", "watershed"):
        s = val[who]
        assert isinstance(s, dict)
        n = s["nuclei"]
        lines.append(
            f"{who:>9}: PQ {s['pq']:.3f} SQ {s['sq']:.3f} RQ {s['rq']:.3f} · nuclei PQ "
            f"{n['pq']:.3f} SQ {n['sq']:.3f} RQ {n['rq']:.3f} (TP {n['tp']}, FP {n['fp']}, "
            f"FN {n['fn']})"
        )
    return lines


def train(
    arch: Annotated[
        str, typer.Option(help="unet, segnet or fcn; forest: a random forest from scribbles.")
    ] = "unet",
    ndim: Annotated[int, typer.Option(help="2 (planes) or 3 (volumes; unet only).")] = 2,
    data: Annotated[
        str, typer.Option(help="'synthetic' (generated nuclei) or a folder of TIFF/Zarr images.")
    ] = "synthetic",
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="Folder of annotations (label masks or one-hot stacks), paired by file name."
        ),
    ] = None,
    synthetic: Annotated[
        str | None,
        typer.Option(
            help="Synthetic generator: 'nuclei' (varied sizes, staining, noise; 2D default) "
            "or 'render' (uniform round nuclei; 3D default)."
        ),
    ] = None,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment/--no-augment",
            help="Random zoom, turns, elastic and intensity changes (else flips only).",
        ),
    ] = True,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    patch: Annotated[
        str, typer.Option(help="Patch edge in pixels: 128, or one per axis: 32,64,64.")
    ] = "128",
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Adam learning rate (cosine decay to 1 %).")] = 2e-3,
    seed: Annotated[
        int, typer.Option(help="Decides weights and patches: same seed, same model.")
    ] = 0,
    depth: Annotated[int, typer.Option(help="Levels (2× downsamplings).")] = 3,
    width: Annotated[int, typer.Option(help="Channels of the first level.")] = 16,
    normalise: Annotated[
        str, typer.Option(help="Percentiles of each whole image mapped to 0 and 1.")
    ] = "1,99.8",
    min_size: Annotated[int, typer.Option(help="Smallest interior seed kept, in pixels.")] = 20,
    out_path: Annotated[
        Path,
        typer.Option("--out", "-o", help="Model file (.pt); sidecar .json and card .md beside."),
    ] = Path("model.pt"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint beside --out.")
    ] = False,
    bioimageio: Annotated[
        Path | None,
        typer.Option(help="Also write the trained model as a bioimage.io package (.zip)."),
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
    val_images: Annotated[
        int, typer.Option(help="Held-out synthetic images scored at the end (0: none).")
    ] = 4,
    val_size: Annotated[int, typer.Option(help="Edge of each validation image.")] = 512,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    classes: Annotated[
        str | None,
        typer.Option(
            help="forest: the catalogue, as run.yaml's classes: (YAML, names, or a file); "
            "scribble value k is class k. Default: 1 background (stuff), 2 foreground (thing)."
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(help="forest: comma-separated features (default: 24 at σ 0.5-16)."),
    ] = None,
    trees: Annotated[int, typer.Option(help="forest: number of trees.")] = 100,
    max_depth: Annotated[int, typer.Option(help="forest: deepest split (0: no limit).")] = 12,
) -> None:
    """Train a segmentation network (background / interior / boundary) or a random forest
    (from scribbles), and write its model card."""
    if bioimageio is not None:  # refused before training, not after
        if arch == "forest":
            fail(typer.BadParameter("--bioimageio: a forest has no bioimage.io form."), 2)
        from segpipe.deep.export import require

        try:
            require("--bioimageio", bioimageio)
        except SegpipeError as err:
            fail(err)
    if arch == "forest":
        _train_forest(
            ndim=ndim,
            data=data,
            annotations=annotations,
            classes=classes,
            features=features,
            trees=trees,
            max_depth=max_depth,
            seed=seed,
            normalise=normalise,
            val_images=val_images,
            val_size=val_size,
            out_path=out_path,
        )
        return
    from segpipe.deep.train import TrainConfig, checkpoint_path, command_line
    from segpipe.deep.train import train as run_training

    try:
        config = TrainConfig.model_validate(
            {
                "arch": arch,
                "ndim": ndim,
                "depth": depth,
                "width": width,
                "data": data,
                "annotations": None if annotations is None else str(annotations),
                "synthetic": synthetic,
                "augment": augment,
                "steps": steps,
                "patch": _ints(patch, "--patch"),
                "batch": batch,
                "lr": lr,
                "seed": seed,
                "normalise": _floats(normalise, "--normalise"),
                "min_size": min_size,
                "checkpoint_every": checkpoint_every,
                "val_images": val_images,
                "val_size": val_size,
                "out": str(out_path),
            }
        )
    except ValidationError as err:
        problem = err.errors()[0]
        where = "--" + "-".join(str(p) for p in problem["loc"][:1]).replace("_", "-")
        fail(typer.BadParameter(f"{where}: {problem['msg']}."), 2)
    except typer.BadParameter as err:
        fail(err, 2)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    task = progress.add_task(f"train {config.arch}", total=config.steps, loss="–")

    def report(step: int, total: int, loss: float) -> None:
        progress.update(task, completed=step, total=total, loss=f"{loss:.4f}")

    try:
        with progress:
            result = run_training(
                config, resume=resume, progress=report, command=command_line(config, resume=resume)
            )
    except SegpipeError as err:
        fail(err)
    except KeyboardInterrupt:
        ckpt = checkpoint_path(config.out)
        # training checkpoints its last whole step when interrupted; before the first
        # step there is nothing to continue from
        console.print(
            f"[red]interrupted[/]; continue from {ckpt} with the same options and --resume"
            if ckpt.is_file()
            else "[red]interrupted[/] before the first step; no checkpoint was written",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    card = result.meta.card
    out.print(
        f"Model: {result.path} (+ {result.path.with_suffix('.json').name}, "
        f"{result.card_path.name}) after {card['steps']} steps in {card['seconds']:.0f} s, "
        f"final loss {result.loss:.4f}",
        highlight=False,
        soft_wrap=True,
    )
    if "validation" in card:
        val = card["validation"]
        out.print(
            f"Validation on {val['images']} held-out synthetic image(s) "
            f"{'×'.join(map(str, val['shape']))}:",
            highlight=False,
        )
        for line in _format_validation(val):
            out.print(line, highlight=False)
    for name, res in card.get("held_out", {}).items():
        model, ws = (
            "–" if v is None else f"{v:.3f}"
            for v in (res["model"]["nuclei"]["pq"], res["watershed"]["nuclei"]["pq"])
        )
        out.print(f"Held-out {name}: nuclei PQ model {model}, watershed {ws}", highlight=False)
    if bioimageio is not None:
        from flows.export_cli import write_package

        try:
            write_package(str(result.path), bioimageio)
        except SegpipeError as err:
            fail(err)


def _train_forest(
    *,
    ndim: int,
    data: str,
    annotations: Path | None,
    classes: str | None,
    features: str | None,
    trees: int,
    max_depth: int,
    seed: int,
    normalise: str,
    val_images: int,
    val_size: int,
    out_path: Path,
) -> None:
    """``segpipe train --arch forest``: fit, write the model and its card, print the scores."""
    from segpipe.features import default_features
    from segpipe.forest.train import ForestTrainConfig, parse_classes, train_forest

    try:
        if out_path == Path("model.pt"):  # the networks' default
            out_path = Path("forest.npz")
        if out_path.suffix != ".npz":
            raise typer.BadParameter(f"--out {out_path}: a forest is an .npz file.")
        options: dict[str, object] = {
            "data": data,
            "annotations": None if annotations is None else str(annotations),
            "out": str(out_path),
            "features": default_features(ndim) if features is None else features.split(","),
            "trees": trees,
            "max_depth": max_depth or None,
            "seed": seed,
            "ndim": ndim,
            "normalise": None if normalise == "none" else _floats(normalise, "--normalise"),
            "val_images": val_images,
            "val_size": val_size,
        }
        if classes is not None:
            options["classes"] = parse_classes(classes)
        config = ForestTrainConfig.model_validate(options)
    except ValidationError as err:
        problem = err.errors()[0]
        where = "--" + "-".join(str(p) for p in problem["loc"][:1]).replace("_", "-")
        fail(typer.BadParameter(f"{where}: {problem['msg']}."), 2)
    except typer.BadParameter as err:
        fail(err, 2)
    except SegpipeError as err:
        fail(err, 2)
    try:
        with console.status("training the forest", spinner="dots"):
            result = train_forest(config)
    except SegpipeError as err:
        fail(err)
    card = result.model.meta.card
    oob = card["oob"]
    out.print(
        f"Model: {result.path} (+ {result.card_path.name}): {card['trees']} trees, "
        f"{card['nodes']} nodes, {len(result.model.meta.features)} features, trained on "
        f"{sum(card['scribbled_pixels'].values())} scribbled pixels in {card['seconds']:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"Out-of-bag accuracy {oob['accuracy']:.4f}; IoU per class: "
        + ", ".join(f"{name} {s['iou']:.4f}" for name, s in oob["classes"].items()),
        highlight=False,
        soft_wrap=True,
    )
    val = card.get("validation")
    if val:
        out.print(
            f"Held-out synthetic images ({val['images']} × "
            f"{'×'.join(map(str, val['shape']))}): foreground IoU "
            + ", ".join(f"{v:.4f}" for v in val["foreground_iou"]),
            highlight=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""
    app.command("train", epilog=TRAIN_EXAMPLES)(train)

"""Train a U-Net, SegNet or FCN to predict background/interior/boundary, reproducibly.

One seed decides everything (initial weights, patches, flips): the same
configuration gives the same weights on the CPU. A checkpoint (weights,
optimiser, step, random states) is written every ``checkpoint_every`` steps,
and a resumed run continues exactly where the checkpoint left off. The
finished model is written by `segpipe.deep.checkpoint.save` with a model card
(data, seed, command, time, validation scores on held-out synthetic nuclei
beside the default watershed's) in its sidecar and in a Markdown file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import pickle
import platform
import shlex
import signal
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segpipe import synthetic
from segpipe.deep import synth
from segpipe.deep.augment import Augmentation
from segpipe.deep.checkpoint import ModelMeta, save
from segpipe.deep.data import (
    FolderSource,
    Generator,
    Source,
    SyntheticSource,
    class_frequencies,
    read_pairs,
)
from segpipe.deep.nets import Arch, NetSpec, build
from segpipe.deep.postprocess import (
    BOUNDARY,
    CLASSES,
    image_stats,
    instances_from_classes,
    normalise,
    percentile_range,
)
from segpipe.errors import (
    ConfigError,
    InputNotFoundError,
    ModelFileError,
    TrainingDivergedError,
)
from segpipe.evaluate import Metrics, score

ProgressFn = Callable[[int, int, float], None]
VAL_SEED0 = 10_000
"""Validation image ``i`` is ``synthetic.render`` with seed ``VAL_SEED0 + i`` (never trained on)."""
CHECKPOINT_FORMAT = "segpipe-train-checkpoint/1"
# Options that decide the weights: a resumed run must keep them.
_FIXED_ON_RESUME = (
    "arch",
    "ndim",
    "depth",
    "width",
    "data",
    "annotations",
    "patch",
    "batch",
    "lr",
    "seed",
    "normalise",
    "generator",
    "augment",
)
# What a checkpoint written before these options existed trained with.
_LEGACY_DEFAULTS = {"synthetic": "render", "augment": False}


class TrainConfig(BaseModel):
    """Everything a training run depends on; stored in checkpoints and model cards."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    arch: Arch = "unet"
    ndim: Literal[2, 3] = 2
    depth: int = Field(3, ge=1, le=6)
    width: int = Field(16, ge=1)
    data: str = "synthetic"
    """``synthetic`` or a folder of images."""
    annotations: str | None = None
    """Folder of annotations, paired with ``data`` by file name stem."""
    synthetic: Generator | None = None
    """Generator of synthetic data: ``nuclei`` (varied, 2D; the default in 2D) or ``render``
    (uniform round nuclei; the default in 3D)."""
    augment: bool = True
    """Random zoom, turns, elastic and intensity changes (else crops and flips only)."""
    steps: int = Field(1000, ge=1)
    patch: tuple[int, ...] = (128,)
    """Patch edge in pixels: one value, or one per axis."""
    batch: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    """Adam's learning rate at the start; it decays to 1 % of it along a cosine."""
    seed: int = Field(0, ge=0)
    normalise: tuple[float, float] = (1.0, 99.8)
    min_size: int = Field(20, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    val_images: int = Field(4, ge=0)
    val_size: int = Field(512, ge=16)
    out: str = "model.pt"

    @field_validator("normalise")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"Expected two percentiles 0 <= low < high <= 100, got {v} instead.")
        return v

    @property
    def spec(self) -> NetSpec:
        return NetSpec.model_validate(
            {"arch": self.arch, "ndim": self.ndim, "depth": self.depth, "width": self.width}
        )

    @property
    def generator(self) -> Generator:
        """The synthetic generator this configuration trains on."""
        if self.synthetic is not None:
            return self.synthetic
        return "nuclei" if self.ndim == 2 else "render"

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return self.patch * self.ndim if len(self.patch) == 1 else self.patch


@dataclass(frozen=True)
class TrainResult:
    """Where the model went, what describes it, and the final training loss."""

    path: Path
    card_path: Path
    meta: ModelMeta
    loss: float


# -- configuration checks ------------------------------------------------------------------


def _check(config: TrainConfig) -> NetSpec:
    try:
        spec = config.spec
    except ValidationError as err:
        raise ConfigError(f"network: {err.errors()[0]['msg']}") from err
    if config.ndim == 3 and config.arch != "unet":
        raise ConfigError(f"--arch {config.arch} is 2D only; use unet for volumes (--ndim 3).")
    patch = config.patch_shape
    if len(patch) != config.ndim:
        raise ConfigError(
            f"--patch: Expected one value or {config.ndim}, got {','.join(map(str, config.patch))}."
        )
    bad = [p for p in patch if p <= 0 or p % spec.multiple]
    if bad:
        raise ConfigError(
            f"--patch {','.join(map(str, config.patch))}: every edge must be a positive multiple "
            f"of {spec.multiple} (2**depth with depth {config.depth})."
        )
    if config.data == "synthetic" and config.annotations is not None:
        raise ConfigError(
            f"--annotations {config.annotations}: synthetic data bring their own labels; "
            "give --data DIR to train on annotated images."
        )
    if config.data != "synthetic" and config.synthetic is not None:
        raise ConfigError(
            f"--synthetic {config.synthetic}: only for --data synthetic, not {config.data}."
        )
    if config.generator == "nuclei" and config.ndim != 2:
        raise ConfigError("--synthetic nuclei is 2D only; use --synthetic render for volumes.")
    if config.data != "synthetic" and config.annotations is None:
        raise ConfigError(
            f"--data {config.data}: training from a folder needs --annotations DIR (the "
            "annotation of each image, matched by file name)."
        )
    return spec


def _source(config: TrainConfig) -> Source:
    augment = Augmentation() if config.augment else None
    if config.data == "synthetic":
        return SyntheticSource(
            ndim=config.ndim,
            percentiles=config.normalise,
            generator=config.generator,
            augment=augment,
        )
    assert config.annotations is not None
    images = os.path.abspath(config.data)
    annotations = os.path.abspath(config.annotations)
    pairs = read_pairs(images, annotations, ndim=config.ndim, percentiles=config.normalise)
    return FolderSource(tuple(pairs), images, annotations, augment)


def command_line(config: TrainConfig, *, resume: bool = False) -> str:
    """The ``segpipe train`` command that reproduces ``config`` (every option spelled out)."""
    args = ["segpipe", "train", "--arch", config.arch, "--ndim", str(config.ndim)]
    args += ["--depth", str(config.depth), "--width", str(config.width), "--data", config.data]
    if config.annotations is not None:
        args += ["--annotations", config.annotations]
    if config.data == "synthetic":
        args += ["--synthetic", config.generator]
    args += ["--augment" if config.augment else "--no-augment"]
    args += ["--steps", str(config.steps), "--patch", ",".join(map(str, config.patch))]
    args += ["--batch", str(config.batch), "--lr", f"{config.lr:g}", "--seed", str(config.seed)]
    args += ["--normalise", ",".join(f"{p:g}" for p in config.normalise)]
    args += ["--min-size", str(config.min_size), "--checkpoint-every", str(config.checkpoint_every)]
    args += ["--val-images", str(config.val_images), "--val-size", str(config.val_size)]
    args += ["--out", config.out] + (["--resume"] if resume else [])
    return shlex.join(args)


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    """Where training keeps its checkpoint for the model ``out``: ``model.pt`` → ``model.ckpt``."""
    return Path(out).with_suffix(".ckpt")


def card_path(out: str | os.PathLike[str]) -> Path:
    """The Markdown model card beside ``out``: ``model.pt`` → ``model.md``."""
    return Path(out).with_suffix(".md")


# -- checkpoints ---------------------------------------------------------------------------


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint whole


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise InputNotFoundError(
            f"{path}: no checkpoint to resume from (it is written every --checkpoint-every steps)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ModelFileError(f"{path}: not a readable training checkpoint ({err}).") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: not a segpipe training checkpoint.")
    return state


def _check_resume(path: Path, saved: TrainConfig, config: TrainConfig) -> None:
    changed = [k for k in _FIXED_ON_RESUME if getattr(saved, k) != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"{k} {getattr(saved, k)!r} → {getattr(config, k)!r}" for k in changed)
        raise ConfigError(
            f"{path}: cannot resume with other training options ({diffs}); "
            "give the options of the interrupted run."
        )


# -- inference and validation --------------------------------------------------------------


def predict(
    net: Any, image: NDArray[Any], meta: ModelMeta
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Classes (argmax) and boundary probability (softmax) of a whole image.

    The image is normalised by its own whole-image percentiles (``meta.normalise``),
    mirrored up to a multiple of ``meta.spec.multiple`` and run in one piece.

    Parameters
    ----------
    net : torch.nn.Module
        In eval mode.
    image : (M, N[, P]) ndarray
        Raw intensities.
    meta : ModelMeta
        Architecture and normalisation.
    """
    import torch

    raw = np.asarray(image, np.float32)
    lo, hi = percentile_range(image_stats(raw), *meta.normalise)
    x = normalise(raw, lo, hi)
    m = meta.spec.multiple
    pad = [(0, -n % m) for n in x.shape]
    x = np.pad(x, pad, mode="symmetric")
    with torch.no_grad():
        logits = net(torch.from_numpy(np.ascontiguousarray(x))[None, None])[0]
        probs = torch.softmax(logits, dim=0).numpy()
    core = tuple(slice(0, n) for n in raw.shape)
    classes = probs.argmax(axis=0).astype(np.uint8)[core]
    return classes, probs[BOUNDARY][core].astype(np.float32)


def segment_image(net: Any, image: NDArray[Any], meta: ModelMeta) -> NDArray[np.int32]:
    """Instances of a whole image: `predict`, then `instances_from_classes`."""
    classes, boundary = predict(net, image, meta)
    return instances_from_classes(classes, boundary, min_size=meta.min_size)


def watershed_image(image: NDArray[Any]) -> NDArray[np.integer]:
    """The default ``watershed`` segmenter on a whole image (its filter, global threshold)."""
    from segpipe.segmenters import get_segmenter

    seg = get_segmenter("watershed")
    smoothed = seg.preprocess(np.asarray(image, np.float32))
    instances = seg.segment(smoothed, seg.prepare(image_stats(smoothed))).instances
    assert instances is not None
    return instances


def validation_shape(ndim: int, size: int) -> tuple[int, ...]:
    """Shape of a validation image: ``size``² planes, or ``32 × (size/4)²`` volumes."""
    return (size, size) if ndim == 2 else (32, max(size // 4, 16), max(size // 4, 16))


def validation_set(
    n: int, shape: Sequence[int], seed0: int = VAL_SEED0
) -> list[tuple[NDArray[np.uint16], NDArray[np.uint32]]]:
    """Held-out synthetic images (seeds ``seed0 .. seed0 + n - 1``) with their truth."""
    region = tuple(slice(0, s) for s in shape)
    return [synthetic.render(region, seed=seed0 + i) for i in range(n)]


def score_instances(
    preds: Sequence[NDArray[np.integer]], truths: Sequence[NDArray[np.integer]]
) -> Metrics:
    """PQ/SQ/RQ over several images at once (matches counted over all of them)."""
    pred_all, truth_all = [], []
    p_off = t_off = 0
    for p, t in zip(preds, truths, strict=True):
        p64, t64 = p.astype(np.int64), t.astype(np.int64)
        # distinct ids per image, so one table scores the set as `segpipe evaluate` would
        pred_all.append(np.where(p64 > 0, p64 + p_off, 0))
        truth_all.append(np.where(t64 > 0, t64 + t_off, 0))
        p_off += int(p64.max(initial=0))
        t_off += int(t64.max(initial=0))
    pred = np.concatenate(pred_all, axis=0)
    truth = np.concatenate(truth_all, axis=0)
    return score((pred > 0).astype(np.uint8), pred, (truth > 0).astype(np.uint8), truth)


def _summary(m: Metrics) -> dict[str, Any]:
    nuclei = next(c for c in m.classes if c.thing)
    return {
        "pq": m.pq,
        "sq": m.sq,
        "rq": m.rq,
        "nuclei": {
            "pq": nuclei.pq,
            "sq": nuclei.sq,
            "rq": nuclei.rq,
            "tp": nuclei.tp,
            "fp": nuclei.fp,
            "fn": nuclei.fn,
        },
        "background": {c.name: c.pq for c in m.classes if not c.thing},
        "ap": m.ap,
    }


def validate(net: Any, meta: ModelMeta, *, images: int, size: int) -> dict[str, Any]:
    """Scores of the network and of the default watershed on held-out synthetic nuclei.

    Returns
    -------
    dict
        ``images``, ``shape``, ``seeds``, ``model`` and ``watershed`` (each with
        overall ``pq``/``sq``/``rq`` as `segpipe evaluate` reports them and the
        ``nuclei`` class's own).
    """
    shape = validation_shape(meta.spec.ndim, size)
    data = validation_set(images, shape)
    truths = [t for _, t in data]
    net.eval()
    model = score_instances([segment_image(net, im, meta) for im, _ in data], truths)
    ws = score_instances([watershed_image(im) for im, _ in data], truths)
    return {
        "images": images,
        "shape": list(shape),
        "seeds": [VAL_SEED0, VAL_SEED0 + images - 1],
        "generator": "segpipe.synthetic.render (default density and noise)",
        "model": _summary(model),
        "watershed": _summary(ws),
    }


def validate_held_out(net: Any, meta: ModelMeta, *, images: int, size: int) -> dict[str, Any]:
    """Scores of the network and of the default watershed on each `synth.HELD_OUT` set.

    Returns
    -------
    dict
        Per set name: ``images``, ``shape``, ``model`` and ``watershed`` as in `validate`.
    """
    shape = (size, size)
    net.eval()
    out: dict[str, Any] = {}
    for name in synth.HELD_OUT:
        data = synth.held_out_set(name, images, shape)
        truths = [t for _, t in data]
        out[name] = {
            "images": images,
            "shape": list(shape),
            "model": _summary(
                score_instances([segment_image(net, im, meta) for im, _ in data], truths)
            ),
            "watershed": _summary(score_instances([watershed_image(im) for im, _ in data], truths)),
        }
    return out


# -- the model card ------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def card_markdown(name: str, card: dict[str, Any]) -> str:
    """The human-readable model card."""
    cfg = card["config"]
    lines = [
        f"# {name}: {cfg['arch']} ({cfg['ndim']}D, depth {cfg['depth']}, width {cfg['width']})",
        "",
        "Predicts background / interior / boundary per pixel; instances are the interior's",
        "connected components grown over interior and boundary by a watershed on the",
        "boundary probability (`segpipe.deep.postprocess.instances_from_classes`).",
        "",
        "## Training",
        "",
        f"- command: `{card['command']}`",
        f"- data: {json.dumps(card['data'])}",
        f"- seed: {cfg['seed']}; steps: {card['steps']}; batch {cfg['batch']} of "
        f"{'×'.join(map(str, card['patch']))} px patches with "
        + (
            "random zoom, turns, flips, elastic deformation, intensity scale, offset and gamma "
            "(`segpipe.deep.augment`)"
            if cfg.get("augment", False)
            else "random flips"
        ),
        f"- loss: class-weighted cross entropy, weights {card['class_weights']} "
        f"({', '.join(CLASSES)}); Adam, lr {cfg['lr']:g} with cosine decay",
        f"- input: each whole image mapped from its {cfg['normalise'][0]:g}–"
        f"{cfg['normalise'][1]:g} percentiles to 0–1",
        f"- parameters: {card['parameters']}; final loss {card['final_loss']:.4f}",
        f"- time: {card['seconds']:.0f} s on {card['threads']} CPU thread(s), "
        f"torch {card['torch']}, finished {card['finished']}",
    ]
    val = card.get("validation")
    if val:
        lines += [
            "",
            "## Validation",
            "",
            f"{val['images']} held-out synthetic images of {'×'.join(map(str, val['shape']))} "
            f"px (seeds {val['seeds'][0]}–{val['seeds'][1]}, never used in training), scored "
            "with `segpipe.evaluate` (matches at IoU > 0.5). *Overall* averages the "
            "background (stuff) and nuclei (thing) classes, as `segpipe evaluate` reports it.",
            "",
            "| segmenter | PQ | SQ | RQ | nuclei PQ | nuclei SQ | nuclei RQ | TP | FP | FN |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for who, label in (("model", name), ("watershed", "watershed (default options)")):
            s = val[who]
            n = s["nuclei"]
            lines.append(
                f"| {label} | {_fmt(s['pq'])} | {_fmt(s['sq'])} | {_fmt(s['rq'])} | "
                f"{_fmt(n['pq'])} | {_fmt(n['sq'])} | {_fmt(n['rq'])} | {n['tp']} | {n['fp']} | "
                f"{n['fn']} |"
            )
    held = card.get("held_out")
    if held:
        first = next(iter(held.values()))
        lines += [
            "",
            "## Held-out synthetic sets",
            "",
            f"{first['images']} images of {'×'.join(map(str, first['shape']))} px per set from "
            "`segpipe.deep.synth.held_out_set` (seeds never used in training): the training "
            "distribution, then nuclei up to 1.5× larger than any trained on (*large*), nuclei "
            "barely brighter than the background (*low-contrast*) and fewer photons than any "
            "trained on, with more read noise (*noisy*). Nuclei PQ (matches at IoU > 0.5), "
            "TP/FP/FN in brackets.",
            "",
            f"| set | {name} | watershed (default options) |",
            "|---|---|---|",
        ]
        for set_name, res in held.items():
            cells = []
            for who in ("model", "watershed"):
                n = res[who]["nuclei"]
                cells.append(f"{_fmt(n['pq'])} ({n['tp']}/{n['fp']}/{n['fn']})")
            lines.append(f"| {set_name} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "## Use",
        "",
        "Trained on synthetic fluorescent nuclei only: check it on a few annotated images of "
        "your own (`segpipe evaluate`) and fine-tune (`segpipe train --data DIR "
        "--annotations DIR`) where it falls short.",
        "",
    ]
    return "\n".join(lines)


# -- training ------------------------------------------------------------------------------


def _lr_at(config: TrainConfig, step: int) -> float:
    """Cosine decay from ``lr`` to ``lr / 100`` over the run (a function of the step alone)."""
    t = step / max(config.steps, 1)
    return config.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def _class_weights(frequencies: Sequence[float]) -> list[float]:
    """Median-frequency balancing: rare classes (the boundary) weigh more."""
    f = np.maximum(np.asarray(frequencies, np.float64), 1e-6)
    return [round(float(w), 4) for w in np.median(f) / f]


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train a network and write it with its model card.

    Parameters
    ----------
    config : TrainConfig
        What to train on and how; ``config.out`` names the model file.
    resume : bool
        Continue from the checkpoint beside ``config.out`` (same options; ``steps``
        may grow).
    progress : callable, optional
        Called as ``progress(step, steps, loss)`` after every step.
    command : str, optional
        The command line to record; default: `command_line` of ``config``.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        Inconsistent options, or a resume with other options.
    TrainingDataError, InputNotFoundError, InputReadError
        Bad or unpaired training files (named), or annotations lacking a class.
    TrainingDivergedError
        A loss that is not finite (no model is written).
    KeyboardInterrupt
        After a Ctrl-C, once the step under way ends and is checkpointed.
    """
    import torch

    spec = _check(config)
    source = _source(config)
    out = Path(config.out).expanduser().absolute()
    ckpt = checkpoint_path(out)
    patch = config.patch_shape
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: SegNet's max_unpool2d has no "deterministic" flag, although on the CPU it
    # scatters to distinct indices and gives the same result every time.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic")
            return _train(config, spec, source, out, ckpt, patch, resume, progress, command)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


@contextlib.contextmanager
def _interrupt_between_steps() -> Iterator[threading.Event]:
    """A Ctrl-C (SIGINT) sets the event instead of stopping a step halfway (an optimiser
    step that updated half the weights); the loop checkpoints and stops between steps.
    Off the main thread a Ctrl-C is not delivered here: nothing changes."""
    interrupted = threading.Event()
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    except ValueError:  # not the main thread
        yield interrupted
        return
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _train(
    config: TrainConfig,
    spec: NetSpec,
    source: Source,
    out: Path,
    ckpt: Path,
    patch: tuple[int, ...],
    resume: bool,
    progress: ProgressFn | None,
    command: str | None,
) -> TrainResult:
    import torch

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = build(spec)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    weights = _class_weights(
        class_frequencies(source, np.random.default_rng([config.seed, 1]), patch)
    )
    step, seconds, loss_value = 0, 0.0, float("nan")
    if resume:
        state = _load_checkpoint(ckpt)
        saved = {**_LEGACY_DEFAULTS, **json.loads(state["config"])}
        _check_resume(ckpt, TrainConfig.model_validate(saved), config)
        net.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        step, seconds, loss_value = int(state["step"]), float(state["seconds"]), state["loss"]
        weights = list(state["class_weights"])
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    net.train()
    start = time.perf_counter() - seconds

    def checkpoint() -> None:
        _save_checkpoint(
            ckpt,
            {
                "format": CHECKPOINT_FORMAT,
                "config": config.model_dump_json(),
                "step": step,
                "seconds": time.perf_counter() - start,
                "loss": loss_value,
                "model": net.state_dict(),
                "optimiser": optimiser.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": json.dumps(rng.bit_generator.state),
                "class_weights": weights,
            },
        )

    with _interrupt_between_steps() as interrupted:
        while step < config.steps:
            if interrupted.is_set():  # the weights of the last whole step, kept
                checkpoint()
                raise KeyboardInterrupt
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(config, step)
            x, y = source.batch(rng, patch, config.batch)
            loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
            if not math.isfinite(float(loss.item())):
                raise TrainingDivergedError(
                    f"{out}: training diverged at step {step + 1} (loss {float(loss.item())}); "
                    "no model written. Lower --lr, or check the annotations."
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            loss_value = float(loss.item())
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint()
            if progress is not None:
                progress(step, config.steps, loss_value)
    seconds = time.perf_counter() - start
    net.eval()
    meta = ModelMeta(spec=spec, normalise=config.normalise, min_size=config.min_size)
    card: dict[str, Any] = {
        "name": out.stem,
        "command": command or command_line(config, resume=resume),
        "config": config.model_dump(mode="json"),
        "data": source.describe(),
        "seed": config.seed,
        "steps": step,
        "patch": list(patch),
        "class_weights": weights,
        "final_loss": loss_value,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "parameters": sum(p.numel() for p in net.parameters()),
        "finished": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "checkpoint": ckpt.name,
    }
    if config.val_images:
        card["validation"] = validate(net, meta, images=config.val_images, size=config.val_size)
        if config.ndim == 2:
            card["held_out"] = validate_held_out(
                net, meta, images=config.val_images, size=config.val_size
            )
    meta = meta.model_copy(update={"card": card})
    path = save(out, net, meta)
    md = card_path(out)
    md.write_text(card_markdown(out.stem, card), encoding="utf-8")
    return TrainResult(path, md, meta, loss_value)

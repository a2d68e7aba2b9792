"""Do the shipped deep models generalise? Nuclei PQ on held-out synthetic sets, beside the
default watershed.

Usage: python -m bench.generalise [--label after] [--weights DIR] [--images 4] [--size 512]
                                  [--json bench/generalise.json]

Sets: `segpipe.deep.synth.HELD_OUT` (the training distribution with new seeds; nuclei up
to 1.5× larger than any trained on; nuclei barely brighter than the background; fewer
photons than any trained on) and ``basic`` (`segpipe.synthetic.render`, the simple round
nuclei the models were first trained on). Every image is segmented whole by each model in
``--weights`` (`segpipe.deep.train.segment_image`) and by the default watershed
(`segpipe.deep.train.watershed_image`), and scored per set with `segpipe.evaluate`
(`score_instances`); torchmetrics' PanopticQuality scores the same arrays as a check.
Results are merged into ``--json`` under ``--label``; the table printed holds every label
stored there. ``--cards`` also writes each model's rows (every label, and the watershed)
into its model card in ``--weights`` (the section below ``CARD_HEADING``, replaced on rerun).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench.common import machine
from segpipe import synthetic
from segpipe.deep import synth
from segpipe.segmenters.deep import WEIGHTS

MODELS = ("unet", "segnet", "fcn")
CARD_HEADING = "## Generalisation (python -m bench.generalise)"
BASIC_SEED0 = 40_000  # below the training seeds, apart from the model cards' and the tests'
Pair = tuple[NDArray[np.uint16], NDArray[np.uint32]]


def held_out(images: int, size: int) -> dict[str, list[Pair]]:
    """Every set, ``images`` images of ``size``² each."""
    sets = {name: synth.held_out_set(name, images, (size, size)) for name in synth.HELD_OUT}
    region = (slice(0, size), slice(0, size))
    sets["basic"] = [synthetic.render(region, seed=BASIC_SEED0 + i) for i in range(images)]
    return sets


def _stacked(arrays: Sequence[NDArray[np.integer]]) -> NDArray[np.int64]:
    """Images one below the other with distinct ids, as `score_instances` joins them."""
    out, offset = [], 0
    for a in arrays:
        a64 = a.astype(np.int64)
        out.append(np.where(a64 > 0, a64 + offset, 0))
        offset += int(a64.max(initial=0))
    return np.concatenate(out, axis=0)


def torchmetrics_pq(
    preds: Sequence[NDArray[np.integer]], truths: Sequence[NDArray[np.integer]]
) -> float:
    """Nuclei PQ by torchmetrics (thing class 1, stuff class 0), an independent check."""
    import torch
    from torchmetrics.detection import PanopticQuality

    def tensor(instances: NDArray[np.int64]) -> Any:
        sem = (instances > 0).astype(np.int64)
        return torch.from_numpy(np.stack([sem, instances], axis=-1)[None])

    metric = PanopticQuality(
        things={1}, stuffs={0}, return_per_class=True, allow_unknown_preds_category=True
    )
    per_class = metric(tensor(_stacked(preds)), tensor(_stacked(truths))).numpy().ravel()
    return float(per_class[0])  # torchmetrics orders things before stuffs


def _scores(preds: list[NDArray[np.integer]], truths: list[NDArray[np.uint32]]) -> dict[str, Any]:
    from segpipe.deep.train import score_instances

    m = score_instances(preds, truths)
    nuclei = next(c for c in m.classes if c.thing)
    return {
        "nuclei_pq": nuclei.pq,
        "nuclei_sq": nuclei.sq,
        "nuclei_rq": nuclei.rq,
        "tp": nuclei.tp,
        "fp": nuclei.fp,
        "fn": nuclei.fn,
        "pq": m.pq,
        "torchmetrics_nuclei_pq": torchmetrics_pq(preds, truths),
    }


def _segment_with(net: Any, meta: Any, image: Any) -> Any:
    from segpipe.deep.train import segment_image

    return segment_image(net, image, meta)


def _segmenters(weights: Path, models: list[str]) -> dict[str, Callable[[Any], Any]]:
    from segpipe.deep import checkpoint
    from segpipe.deep.train import watershed_image

    out: dict[str, Callable[[Any], Any]] = {}
    for name in models:
        loaded = checkpoint.load(weights / f"{name}.pt")
        net, meta = loaded.net.eval(), loaded.meta
        out[name] = partial(_segment_with, net, meta)
    out["watershed"] = watershed_image
    return out


def evaluate(weights: Path, models: list[str], images: int, size: int) -> dict[str, Any]:
    """Scores of every model in ``weights`` and the watershed on every set."""
    sets = held_out(images, size)
    segmenters = _segmenters(weights, models)
    results: dict[str, Any] = {}
    for set_name, data in sets.items():
        truths = [t for _, t in data]
        results[set_name] = {}
        for who, fn in segmenters.items():
            t0 = time.perf_counter()
            preds = [fn(image) for image, _ in data]
            results[set_name][who] = _scores(preds, truths)
            results[set_name][who]["seconds"] = round(time.perf_counter() - t0, 2)
            r = results[set_name][who]
            print(
                f"{set_name:>16} {who:>9}: nuclei PQ {r['nuclei_pq']:.3f} "
                f"(torchmetrics {r['torchmetrics_nuclei_pq']:.3f}), TP {r['tp']} FP {r['fp']} "
                f"FN {r['fn']}",
                flush=True,
            )
    return {
        "weights": {
            m: hashlib.sha256((weights / f"{m}.pt").read_bytes()).hexdigest()[:16] for m in models
        },
        "images": images,
        "size": size,
        "results": results,
    }


def table(stored: dict[str, Any]) -> str:
    """Markdown table: one row per set, a column per (label, model) and the watershed."""
    labels = list(stored["runs"])
    first = stored["runs"][labels[0]]["results"]
    sets = list(first)
    columns: list[tuple[str, str]] = []
    for label in labels:
        models = [m for m in stored["runs"][label]["results"][sets[0]] if m != "watershed"]
        columns += [(label, m) for m in models]
    columns.append((labels[-1], "watershed"))
    head = ["set"] + [f"{m} ({label})" if m != "watershed" else m for label, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sets:
        cells = [s]
        for label, m in columns:
            r = stored["runs"][label]["results"][s][m]
            cells.append(f"{r['nuclei_pq']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def card_section(stored: dict[str, Any], model: str) -> str:
    """The model card's section: nuclei PQ of ``model`` under every stored label, and the
    watershed's, per set."""
    labels = [
        k for k, run in stored["runs"].items() if model in next(iter(run["results"].values()))
    ]
    last = stored["runs"][labels[-1]]
    head = ["set"] + [f"{model} ({label})" for label in labels] + ["watershed"]
    lines = [
        CARD_HEADING,
        "",
        f"Nuclei PQ on {last['images']} held-out images of {last['size']}² px per set "
        "(`bench/generalise.json`; *basic* is `segpipe.synthetic.render`, the simple round "
        "nuclei earlier models were trained on). Labels: *before* the weights this card "
        "replaced, *after* these.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for s in last["results"]:
        cells = [s] + [
            f"{stored['runs'][label]['results'][s][model]['nuclei_pq']:.3f}" for label in labels
        ]
        cells.append(f"{last['results'][s]['watershed']['nuclei_pq']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_card(path: Path, section: str) -> None:
    """Put ``section`` into the card at ``path``, before its ``## Use``, replacing an old one."""
    text = path.read_text(encoding="utf-8")
    if CARD_HEADING in text:
        start = text.index(CARD_HEADING)
        end = text.find("\n## ", start + len(CARD_HEADING))
        text = text[:start] + text[end + 1 :] if end >= 0 else text[:start]
    use = text.find("## Use")
    text = text + "\n" + section if use < 0 else text[:use] + section + "\n" + text[use:]
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", default="after", help="key of this run in --json")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="folder of <model>.pt/.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=4, help="images per set")
    parser.add_argument("--size", type=int, default=512, help="image edge")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument("--note", default="", help="stored with the run (e.g. the weights' commit)")
    parser.add_argument("--cards", action="store_true", help="write the table into the cards")
    args = parser.parse_args(argv)
    import torch

    print(machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average before: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    run = evaluate(args.weights, args.models.split(","), args.images, args.size)
    run["note"] = args.note
    stored: dict[str, Any] = (
        json.loads(args.json.read_text()) if args.json.is_file() else {"runs": {}}
    )
    stored["sets"] = {name: "segpipe.deep.synth.held_out_set" for name in synth.HELD_OUT} | {
        "basic": f"segpipe.synthetic.render, seeds {BASIC_SEED0}.."
    }
    stored["runs"][args.label] = run
    args.json.write_text(json.dumps(stored, indent=1) + "\n")
    print(f"\nNuclei PQ ({args.images} images of {args.size}² per set; {args.json}):\n")
    print(table(stored))
    if args.cards:
        for model in args.models.split(","):
            write_card(args.weights / f"{model}.md", card_section(stored, model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
